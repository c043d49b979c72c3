"""The `codellm` command line, run as a user would."""
import os
import subprocess
import sys

import pytest

from codellm.cli import split_at


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "codellm.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_complete_at_file_line_col(bundle_path, tmp_path):
    script = tmp_path / "s.sh"
    script.write_text('#!/bin/bash\nif [ -z "$1" ]; then\n    \nfi\n')
    r = run("complete", f"{script}:3:5", "--model", str(bundle_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")


def test_complete_from_stdin(bundle_path):
    r = run("complete", "-:1:5", "--model", str(bundle_path), "--mode", "line", stdin="echo\n")
    assert r.returncode == 0, r.stderr
    assert "\n" not in r.stdout.rstrip("\n")


def test_complete_rejects_bad_positions_and_bytes(bundle_path, tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("echo hi\n")
    r = run("complete", f"{script}:9:1", "--model", str(bundle_path))
    assert r.returncode == 2 and "line 9 is outside" in r.stderr
    bad = tmp_path / "bad.sh"
    bad.write_bytes(b"echo \xff\xfe\n")
    r = run("complete", f"{bad}:1:1", "--model", str(bundle_path))
    assert r.returncode == 2 and "not UTF-8" in r.stderr


def test_generate_with_seed_is_repeatable(bundle_path):
    args = ("generate", "--prompt", r"#!/bin/bash\n# Create a backup script", "--max-length", "20", "--seed", "3",
            "--model", str(bundle_path))
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("#!/bin/bash\n# Create a backup script")


def test_info_prints_parameter_counts(bundle_path):
    r = run("info", "--model", str(bundle_path))
    assert r.returncode == 0, r.stderr
    for preset in ("tiny", "small", "medium"):
        assert preset in r.stdout
    assert "parameters" in r.stdout
    assert "decode steps on CPU: " in r.stdout
    from codellm.bundle import load_bundle
    bundle = load_bundle(bundle_path)
    assert f"({bundle.config.n_layer} layers, d_model {bundle.config.d_model})" in r.stdout
    assert f"stored as {bundle.storage_dtype}," in r.stdout


def test_corrupt_model_is_a_clear_error(tmp_path):
    r = run("complete", "-:1:1", "--model", str(tmp_path), stdin="x\n")
    assert r.returncode == 2 and "no model bundle in this folder" in r.stderr  # a folder of other things
    (tmp_path / "config.json").write_text("{}")
    r = run("complete", "-:1:1", "--model", str(tmp_path), stdin="x\n")
    assert r.returncode == 2 and "missing file" in r.stderr  # part of a bundle


def test_split_at():
    assert split_at("ab\ncd\n", 2, 2) == ("ab\nc", "d\n")
    assert split_at("ab\ncd\n", 3, 1) == ("ab\ncd\n", "")
    assert split_at("ab\r\ncd\r\n", 1, 3) == ("ab", "\r\ncd\r\n")  # the line's end is before its CR
    with pytest.raises(ValueError, match="1-3"):
        split_at("ab\r\ncd\r\n", 1, 4)
    with pytest.raises(ValueError):
        split_at("ab\n", 1, 9)


def test_an_install_without_numpy_prints_no_warning(bundle_path, tmp_path):
    blocked = tmp_path / "numpy"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "codellm.cli", "complete", "-:2:1", "--model", str(bundle_path)],
                       input="#!/bin/sh\n\n", capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]


def test_info_reads_a_card_of_odd_shape_without_failing(bundle_path, tmp_path):
    import shutil
    import msgpack
    odd = tmp_path / "odd"
    shutil.copytree(bundle_path, odd)
    (odd / "data.msgpack").write_bytes(msgpack.packb({"stages": {"a": "text", "b": {"tokens": "many", "steps": 3}}}))
    r = run("info", "--model", str(odd))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "stage a: ?" in r.stdout and "stage b: ?M tokens, 3 steps" in r.stdout


def test_attention_without_matplotlib_says_what_to_install(bundle_path, tmp_path):
    blocked = tmp_path / "blocked" / "matplotlib"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(blocked.parent), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "codellm.cli", "attention", "--model", str(bundle_path), "--prompt",
                        "echo hi", "--out", str(tmp_path / "a.png")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "pip install matplotlib" in r.stderr and "Traceback" not in r.stderr


def test_complete_can_apply_the_editors_confidence_thresholds(bundle_path):
    shown = run("complete", "-:2:1", "--model", str(bundle_path), "--mode", "line", stdin="#!/bin/sh\n\n")
    hidden = run("complete", "-:2:1", "--model", str(bundle_path), "--mode", "line", "--min-confidence", "1",
                 stdin="#!/bin/sh\n\n")
    assert shown.returncode == hidden.returncode == 0 and shown.stdout.strip()
    assert hidden.stdout == "\n"  # below the threshold: nothing, as the editor would show
    assert "nothing shown" in hidden.stderr and "--min-confidence 1" in hidden.stderr and "nothing" not in shown.stderr
    assert run("complete", "-:2:1", "--cut-confidence", "x", stdin="\n").returncode == 2
    named = run("complete", "-:2:1", "--model", "default", "--mode", "line", stdin="#!/bin/sh\n\n")
    assert named.returncode == 0 and named.stdout == run("complete", "-:2:1", "--mode", "line",
                                                           stdin="#!/bin/sh\n\n").stdout  # `default`: the shipped model


def test_a_missing_file_is_named_plainly(tmp_path):
    r = run("complete", f"{tmp_path / 'nofile.sh'}:1:1")
    assert r.returncode == 2 and r.stderr.strip() == f"codellm: error: {tmp_path / 'nofile.sh'}: no such file or directory"


def test_arguments_with_bytes_that_are_not_utf8_are_read_not_refused(bundle_path):
    """Python hands such bytes of argv over as lone surrogates; generate and tokenize read them as U+FFFD."""
    args = [b"tokenize", b"--plain", b"--model", os.fsencode(bundle_path), b"a\xffb"]
    r = subprocess.run([sys.executable.encode(), b"-m", b"codellm.cli", *args], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"3 characters, 5 bytes" in r.stdout  # a, U+FFFD (3 bytes), b
    args = [b"generate", b"--model", os.fsencode(bundle_path), b"--prompt", b"echo \xff", b"--max-length", b"4",
            b"--temperature", b"0"]
    r = subprocess.run([sys.executable.encode(), b"-m", b"codellm.cli", *args], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("flags", [["generate", "--prompt", "x", "--temperature", "nan"],
                                   ["generate", "--prompt", "x", "--top-k", "-5"],
                                   ["generate", "--prompt", "x", "--top-p", "2"],
                                   ["generate", "--prompt", "x", "--max-length", "0"],
                                   ["bench", "--repeats", "0"]])
def test_sampling_and_bench_numbers_that_mean_nothing_are_refused_at_once(flags):
    r = run(*flags)
    assert r.returncode == 2 and f"argument {flags[-2]}: " in r.stderr and "Traceback" not in r.stderr


def test_info_on_a_broken_model_it_was_given_fails(tmp_path):
    r = run("info", "--model", str(tmp_path))
    assert r.returncode == 2 and "no model bundle in this folder" in r.stderr and "presets" in r.stdout
