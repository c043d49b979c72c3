"""codellm-train never deletes what the user owns, resumes from a kill at any point, keeps metrics one
line per step, and says in one line when the disk is full."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import codellm

from conftest import ENGLISH_SAMPLES, SHELL_SAMPLES

TRAIN = [sys.executable, "-m", "codellm.train.cli"]
SMALL = ["--model-size", "test", "--context-length", "64", "--batch-size", "4", "--precision", "fp32",
         "--warmup-steps", "2"]


def scripts(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        for j, sample in enumerate(SHELL_SAMPLES):
            (folder / f"s{i}_{j}.sh").write_text(sample.replace("FILE", f"FILE{i}"))
    return folder


def train(*args, timeout=300):
    return subprocess.run(TRAIN + list(args), capture_output=True, text=True, timeout=timeout)


def test_out_holding_the_users_files_is_refused_then_overwritten_only_where_asked(tmp_path):
    mine = scripts(tmp_path / "mine")
    (mine / "notes.txt").write_text("my notes")
    before = sorted(p.name for p in mine.iterdir())
    r = train("code", "--code-data", str(mine), "--out", str(mine), "--max-steps", "2", *SMALL)
    assert r.returncode == 2 and "not empty" in r.stderr and "--overwrite" in r.stderr
    assert sorted(p.name for p in mine.iterdir()) == before  # nothing touched
    assert "Traceback" not in r.stderr

    afile = tmp_path / "file.txt"
    afile.write_text("keep")
    r = train("code", "--code-data", str(mine), "--out", str(afile), "--max-steps", "2", *SMALL)
    assert r.returncode == 2 and afile.read_text() == "keep"

    r = train("code", "--code-data", str(mine), "--out", str(mine), "--max-steps", "2", "--overwrite", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (mine / "notes.txt").read_text() == "my notes"  # the user's files stay
    assert set(before) <= {p.name for p in mine.iterdir()}
    assert isinstance(codellm.load(str(mine), device="cpu").complete("echo ", "", "line"), str)


def test_a_trained_bundle_is_replaced_only_with_overwrite_and_never_the_from_bundle(tmp_path):
    mine = scripts(tmp_path / "mine")
    out = tmp_path / "model"
    r = train("code", "--code-data", str(mine), "--out", str(out), "--max-steps", "2", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = (out / "model.safetensors").read_bytes()
    r = train("code", "--code-data", str(mine), "--out", str(out), "--max-steps", "2", "--seed", "9", *SMALL)
    assert r.returncode != 0 and "a bundle is there already" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    assert (out / "model.safetensors").read_bytes() == trained  # the first run's model is kept
    r = train("code", "--code-data", str(mine), "--from", str(out), "--out", str(out), "--max-steps", "2",
              "--overwrite", *SMALL[2:])
    assert r.returncode != 0 and "--from bundle" in r.stderr and "Traceback" not in r.stderr
    assert (out / "model.safetensors").read_bytes() == trained  # even --overwrite never replaces the parent
    r = train("code", "--code-data", str(mine), "--out", str(out), "--max-steps", "2", "--seed", "9",
              "--overwrite", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() != trained
    # --out through a link: the bundle goes where the link points, and the link stays a link
    link = tmp_path / "link"
    link.symlink_to(out)
    before = (out / "model.safetensors").read_bytes()
    r = train("code", "--code-data", str(mine), "--out", str(link), "--max-steps", "2", "--seed", "5",
              "--overwrite", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert link.is_symlink() and (out / "model.safetensors").read_bytes() != before
    assert not (tmp_path / "link.code-run").exists() and (tmp_path / "model.code-run").is_dir()


def test_kill_during_the_english_corpus_step_then_resume(tmp_path):
    code = scripts(tmp_path / "scripts")
    english = tmp_path / "english.txt"
    os.mkfifo(english)  # reading it waits for a writer: the run is held inside the English step
    out = tmp_path / "model"
    command = ["all", "--code-data", str(code), "--language-data", str(english), "--out", str(out),
               "--max-steps", "4", *SMALL]
    proc = subprocess.Popen(TRAIN + command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    corpus = tmp_path / "model.work" / "corpus"
    deadline = time.monotonic() + 120
    while not (corpus / "shell.msgpack").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (corpus / "english.msgpack").exists()

    def feed():  # the same command again, the English text arriving this time
        with open(english, "w") as f:
            f.write("<|endoftext|>".join(ENGLISH_SAMPLES * 10))

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    r = train(*command, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    model = codellm.load(str(out), device="cpu")
    assert isinstance(model.complete("echo ", "", "line"), str)
    assert set(model.bundle.card["stages"]) == {"code"}  # by default, shell from the start


def test_metrics_keep_one_line_per_step_after_a_resume(tmp_path):
    code = scripts(tmp_path / "scripts")
    out = tmp_path / "model"
    common = ["code", "--code-data", str(code), "--out", str(out), "--max-steps", "16", "--checkpoint-every", "5",
              *SMALL]
    r = train(*common, "--stop-after", "8")  # stops as a kill would: logged to step 8, checkpoint at 5
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoint = tmp_path / "model.code-run" / "checkpoint.safetensors"
    saved = checkpoint.read_bytes()
    r = train(*common)  # a new run without --resume would replace the unfinished run's checkpoint
    assert r.returncode != 0 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert checkpoint.read_bytes() == saved
    r = train(*common, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / "model.code-run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 17))


def test_a_full_disk_is_one_clear_line(tmp_path):
    """A 1 MB tmpfs holds the run: the checkpoint (written by the safetensors library) fills it."""
    code = scripts(tmp_path / "scripts")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        r = train("code", "--code-data", str(code), "--corpus", str(tmp_path / "corpus"), "--out",
                  str(disk / "model"), "--max-steps", "3", "--checkpoint-every", "1", *SMALL)
        half_written = sorted(p.name for p in disk.rglob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("codellm-train: error: no space left") and "--resume" in last
    assert half_written == []  # the partial checkpoint is removed, not left filling the disk


def card_of(path):
    import msgpack
    return msgpack.unpackb((path / "data.msgpack").read_bytes(), raw=False)


def write_card(path, card):
    import msgpack
    (path / "data.msgpack").write_bytes(msgpack.packb(card, use_bin_type=True))


def test_a_damaged_card_on_from_is_refused_before_any_training(bundle_path, tmp_path):
    import shutil
    code = scripts(tmp_path / "scripts")
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle_path, damaged)
    card = card_of(damaged)
    card.setdefault("stages", {})["code-2"] = {"corpus": "feedfacefeedface"}
    card["corpus_changes"] = {"feedfacefeedface": {"base": "feedfacefeedface", "added": [], "removed": {}}}
    write_card(damaged, card)
    r = train("code", "--from", str(damaged), "--code-data", str(code), "--out", str(tmp_path / "m"),
              "--max-steps", "2", *SMALL[4:])
    assert r.returncode == 2 and "damaged data card" in r.stderr and str(damaged) in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "m.code-run").exists()  # refused before training


def test_a_fine_tune_keeps_no_figures_of_its_parent_and_a_resume_of_a_finished_run_keeps_its_loss(bundle_path, tmp_path):
    import math
    import shutil
    code = scripts(tmp_path / "scripts")
    parent = tmp_path / "parent"
    shutil.copytree(bundle_path, parent)
    write_card(parent, {**card_of(parent), "eval": {"val": {"shell_loss": 1.0}}})
    command = ["code", "--from", str(parent), "--code-data", str(code), "--out", str(tmp_path / "m"),
               "--max-steps", "2", *SMALL[4:]]
    r = train(*command)
    assert r.returncode == 0, r.stderr[-3000:]
    card = card_of(tmp_path / "m")
    assert "eval" not in card  # the parent's held-out figures are not this model's
    stage = list(card["stages"])[-1]
    loss = card["stages"][stage]["train_loss"]
    r = train(*command, "--resume")  # nothing left to do: the bundle is written again with the same figures
    assert r.returncode == 0, r.stderr[-3000:]
    again = card_of(tmp_path / "m")["stages"][stage]["train_loss"]
    assert math.isfinite(again) and again == pytest.approx(loss, abs=1e-5)


def test_from_is_checked_before_any_work_and_default_names_the_shipped_model(tmp_path, monkeypatch):
    from codellm.defaults import PACKAGED_BUNDLE
    from codellm.train.cli import bundle_arg
    code = scripts(tmp_path / "scripts")
    r = train("code", "--from", str(tmp_path / "no-model"), "--code-data", str(code), "--out", str(tmp_path / "m"),
              "--max-steps", "1", *SMALL[4:])
    assert r.returncode == 2 and "no model bundle there" in r.stderr and "--from default" in r.stderr
    assert not (tmp_path / "m.work").exists()  # refused before the corpus was built
    monkeypatch.chdir(tmp_path)
    assert bundle_arg("default") == PACKAGED_BUNDLE
    (tmp_path / "default").mkdir()  # a folder of that name here is what the user means
    assert bundle_arg("default").resolve() == tmp_path / "default"


def test_missing_training_extras_are_named_with_how_to_install_them(tmp_path):
    blocked = tmp_path / "blocked"
    (blocked / "datasketch").mkdir(parents=True)
    (blocked / "datasketch" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'datasketch'\", "
                                                        "name='datasketch')\n")
    code = scripts(tmp_path / "scripts")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(blocked), os.environ.get("PYTHONPATH")])))
    r = subprocess.run(TRAIN + ["corpus", "--code-data", str(code), "--corpus", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "datasketch" in r.stderr and ".[train]" in r.stderr and "Traceback" not in r.stderr


def test_scripts_held_out_by_the_user_stay_out_of_training_and_evaluate_a_fine_tune(bundle_path, tmp_path):
    mine, kept = scripts(tmp_path / "mine"), tmp_path / "kept"
    kept.mkdir()
    for k in range(3):
        (kept / f"deploy{k}.sh").write_text(f"#!/bin/sh\nset -eu\nrsync -a build/ host{k}:/srv/app/\n"
                                            f"ssh host{k} systemctl restart app{k}\n")
    (mine / "copy.sh").write_text((kept / "deploy0.sh").read_text())  # the same text in the training folder too
    out = tmp_path / "m"
    r = train("code", "--from", str(bundle_path), "--code-data", str(mine), "--heldout-data", str(kept),
              "--out", str(out), "--max-steps", "2", *SMALL[4:])
    assert r.returncode == 0, r.stderr[-3000:]
    from codellm.train.corpus import read_records
    records = list(read_records(tmp_path / "m.work" / "corpus" / "shell.msgpack"))
    held = {r["text"] for r in records if r["split"] == "val_user"}
    assert len(held) == 3 and not held & {r["text"] for r in records if r["split"] == "train"}
    r = train("eval", str(out), "--corpus", str(tmp_path / "m.work" / "corpus"), "--samples", "3", "--pairs", "0",
              "--blocks", "0", "--scripts", "0", "--keystrokes", "0", "--cross-file", "0", "--no-card",
              "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["splits"]["val_user"]["heldout_files"] == 3
    assert "held-out split val_user (your held-out scripts (--heldout-data), 3 files)" in r.stdout


def test_a_from_bundle_the_options_do_not_fit_is_refused_before_the_corpus(bundle_path, tmp_path):
    code = scripts(tmp_path / "scripts")
    r = train("code", "--from", str(bundle_path), "--code-data", str(code), "--out", str(tmp_path / "m"),
              "--context-length", "8", "--max-steps", "1")
    assert r.returncode == 2 and "a context can only grow" in r.stderr
    assert not (tmp_path / "m.work").exists()
    from codellm.tokenizer import Tokenizer
    other = tmp_path / "other-tokenizer.json"
    Tokenizer.train(["#!/bin/sh\necho hello world\n"] * 50, vocab_size=300).save(other)
    r = train("code", "--from", str(bundle_path), "--code-data", str(code), "--out", str(tmp_path / "m"),
              "--tokenizer", str(other), "--max-steps", "1")
    assert r.returncode == 2 and "its tokenizer is not the one given" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m.work").exists()

    for bad in (tmp_path / "missing.json", tmp_path, code / "s0_0.sh"):  # no file, a folder, not a tokenizer
        r = train("code", "--from", str(bundle_path), "--code-data", str(code), "--out", str(tmp_path / "m"),
                  "--tokenizer", str(bad), "--max-steps", "1")
        assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_run_resumed_from_another_from_bundle_of_the_same_shape_is_refused(tmp_path):
    code = scripts(tmp_path / "scripts")
    corpus = ["--code-data", str(code), "--corpus", str(tmp_path / "corpus")]
    for name, seed in (("a", "1"), ("b", "2")):  # two bundles of one shape and tokenizer, different weights
        r = train("code", *corpus, "--out", str(tmp_path / name), "--max-steps", "2", "--seed", seed, *SMALL)
        assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "child"
    common = ["code", "--corpus", str(tmp_path / "corpus"), "--out", str(out), "--max-steps", "6",
              "--checkpoint-every", "2", *SMALL[2:]]
    r = train(*common, "--from", str(tmp_path / "a"), "--stop-after", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoint = tmp_path / "child.code-run" / "checkpoint.safetensors"
    # a checkpoint written before the parent was recorded resumes, and records it from then on
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(checkpoint), "pt") as f:
        state = json.loads(f.metadata()["state"])
    parent = state.pop("parent")
    assert parent
    save_file(load_file(str(checkpoint)), str(checkpoint), metadata={"state": json.dumps(state)})
    r = train(*common, "--from", str(tmp_path / "a"), "--resume", "--stop-after", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    with safe_open(str(checkpoint), "pt") as f:
        assert json.loads(f.metadata()["state"])["parent"] == parent
    saved = checkpoint.read_bytes()
    r = train(*common, "--from", str(tmp_path / "b"), "--resume")
    assert r.returncode != 0 and "another --from bundle" in r.stderr and "Traceback" not in r.stderr
    assert "without --resume, with --overwrite" in r.stderr
    assert checkpoint.read_bytes() == saved and not out.exists()
    r = train(*common, "--resume")
    assert r.returncode != 0 and "resume it with that --from" in r.stderr
    r = train(*common, "--from", str(tmp_path / "a"), "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    # the finished run resumed again: nothing trained, the bundle's bytes left as they are
    written = {f.name: f.read_bytes() for f in out.iterdir()}
    r = train(*common, "--from", str(tmp_path / "a"), "--resume")
    assert r.returncode == 0 and "finished already" in r.stdout, r.stderr[-3000:]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == written


def test_a_finished_run_goes_on_when_given_more_steps_and_only_then(tmp_path):
    """Sittings add up: --resume with a --max-steps past where a finished run ended carries it on from its
    last checkpoint and replaces its bundle; the same budget again finds it finished and leaves it."""
    out, run = tmp_path / "m", tmp_path / "m.code-run"
    common = ["code", "--code-data", str(scripts(tmp_path / "scripts")), "--corpus", str(tmp_path / "corpus"),
              "--out", str(out), "--checkpoint-every", "2", *SMALL]
    r = train(*common, "--max-steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    for more in ([], ["--overwrite"]):  # --overwrite lets a bundle be replaced; a run with nothing to do writes none
        r = train(*common, "--max-steps", "4", "--resume", *more)
        assert r.returncode == 0 and "finished already" in r.stdout, r.stderr[-3000:]
        assert {f.name: f.read_bytes() for f in out.iterdir()} == first
    r = train(*common, "--max-steps", "6", "--resume")
    assert r.returncode == 0 and "goes on" in r.stdout and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (out / "model.safetensors").read_bytes() != first["model.safetensors"]
    for name in os.listdir(out):  # as if killed after its last step, before its bundle was written
        os.unlink(out / name)
    r = train(*common, "--max-steps", "6", "--resume")  # writes the bundle: not a sitting, nothing trains
    assert r.returncode == 0 and (out / "model.safetensors").exists(), r.stderr[-3000:]
    second = {f.name: f.read_bytes() for f in out.iterdir()}
    sittings = codellm.load(str(out), device="cpu").bundle.card["stages"]["code"]["sittings"]
    assert [(s["from_step"], s["max_steps"], s["device"]) for s in sittings] == [(0, 4, "cpu"), (4, 6, "cpu")]
    from train.modelcard import render
    assert "`code` was trained in 2 sittings: from step 0 (0 tokens), learning rate" in render(out, "", None, [])
    r = train(*common, "--max-steps", "6", "--resume")
    assert r.returncode == 0 and "finished already" in r.stdout, r.stderr[-3000:]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == second
    # a time budget (seconds in all) past what the run trained carries a run of so many steps on too
    from safetensors import safe_open
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        trained = json.loads(f.metadata()["state"])["elapsed"]
    r = train(*common, "--time-budget", str(trained + 2), "--resume")
    assert r.returncode == 0 and "goes on" in r.stdout, r.stderr[-3000:]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] > 6
    # a checkpoint that cannot be read: the finished run's bundle stands, said so, without a traceback
    third = {f.name: f.read_bytes() for f in out.iterdir()}
    checkpoint = run / "checkpoint.safetensors"
    stamp = checkpoint.stat().st_mtime
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    os.utime(checkpoint, (stamp, stamp))
    r = train(*common, "--max-steps", "100", "--resume")
    assert r.returncode == 0 and "cannot be read" in r.stdout and "finished already" in r.stdout, r.stderr[-3000:]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == third


def test_a_run_resumes_after_its_from_bundle_was_evaluated(tmp_path):
    """An evaluation writes its figures into the data card of the bundle a run started from: the model is
    the same, so the run resumes; a checkpoint that recorded the whole bundle's digest resumes too."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from codellm.bundle_files import bundle_digest
    from train.evaluate import write_into_card
    code = scripts(tmp_path / "scripts")
    parent = tmp_path / "a"
    r = train("code", "--code-data", str(code), "--corpus", str(tmp_path / "corpus"), "--out", str(parent),
              "--max-steps", "2", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    common = ["code", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "child"), "--from", str(parent),
              "--max-steps", "8", "--checkpoint-every", "2", *SMALL[2:]]
    r = train(*common, "--stop-after", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    whole = bundle_digest(parent)
    write_into_card(parent, {"bundle": str(parent), "splits": {"val": {"loss": 2.0}}})
    assert bundle_digest(parent) != whole
    r = train(*common, "--resume", "--stop-after", "4")
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    checkpoint = tmp_path / "child.code-run" / "checkpoint.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        state = json.loads(f.metadata()["state"])
    state["parent"] = bundle_digest(parent)  # as a checkpoint written before model digests recorded it
    save_file(load_file(str(checkpoint)), str(checkpoint), metadata={"state": json.dumps(state)})
    r = train(*common, "--resume", "--stop-after", "6")
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("flag, value", [("--max-steps", "0"), ("--time-budget", "-5"), ("--num-epochs", "nan"),
                                         ("--batch-size", "0"), ("--warmup-steps", "-1"), ("--checkpoint-every", "0"),
                                         ("--context-length", "-5"), ("--learning-rate", "0"), ("--fim-rate", "nan"),
                                         ("--seed", "99999999999999999999999"), ("--model-size", "bogus")])
def test_a_count_or_budget_that_cannot_train_is_refused_at_once(tmp_path, flag, value):
    r = train("code", "--code-data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), flag, value, timeout=60)
    assert r.returncode == 2 and f"argument {flag}: " in r.stderr and value in r.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, no corpus, no bundle


@pytest.mark.parametrize("command", [["tokenizer", "--vocab-size", "-1"], ["pack", "--max-mb", "nan"],
                                     ["eval", "x", "--blocks", "-1"], ["bench", "--steps", "0"],
                                     ["corpus", "--english-mb", "inf"]])
def test_other_subcommands_refuse_numbers_that_mean_nothing(tmp_path, command):
    r = train(*command, *(["--out", str(tmp_path / "o")] if command[0] in ("tokenizer", "pack") else []),
              *(["--corpus", str(tmp_path / "c")] if command[0] in ("pack", "corpus") else []), timeout=60)
    assert r.returncode == 2 and f"argument {command[-2]}: {command[-1]!r} is not" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_all_with_one_step_and_an_english_stage_is_refused_before_any_work(tmp_path):
    code = scripts(tmp_path / "scripts")
    r = train("all", "--code-data", str(code), "--out", str(tmp_path / "m"), "--max-steps", "1",
              "--language-share", "0.5", *SMALL, timeout=60)
    assert r.returncode != 0 and "no step for the shell stage" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scripts"]


def test_a_run_resumed_with_another_context_length_is_refused(tmp_path):
    code = scripts(tmp_path / "scripts")
    out = tmp_path / "run"
    common = ["code", "--code-data", str(code), "--corpus", str(tmp_path / "corpus"), "--out", str(out),
              "--max-steps", "4", "--checkpoint-every", "1", "--model-size", "test", "--batch-size", "4",
              "--precision", "fp32", "--warmup-steps", "2"]
    r = train(*common, "--context-length", "64", "--stop-after", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    checkpoint = tmp_path / "run.code-run" / "checkpoint.safetensors"
    saved = checkpoint.read_bytes()
    r = train(*common, "--context-length", "128", "--resume")  # a preset's default that changed is the same case
    assert r.returncode == 2 and "64-token context" in r.stderr and "--context-length 64" in r.stderr
    assert "Traceback" not in r.stderr and checkpoint.read_bytes() == saved and not out.exists()
    r = train(*common, "--context-length", "64", "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    tokens = [json.loads(line)["tokens"] for line in (tmp_path / "run.code-run" / "metrics.jsonl").open()]
    assert tokens == [4 * 64 * step for step in range(1, 5)]  # every step of 64-token windows


def test_sigterm_while_a_run_starts_up_ends_it_with_a_line_and_resume_goes_on(tmp_path):
    """SIGTERM before the first step (while the epoch is built) ends the command as Ctrl-C does: one line
    that says how to go on, the status a signal gives, no traceback; the same command with --resume trains."""
    mine = scripts(tmp_path / "mine")
    out = tmp_path / "model"
    common = ["code", "--code-data", str(mine), "--out", str(out), "--max-steps", "3", *SMALL]
    script = f"""
import os, subprocess, sys, time
import codellm.train.loop as loop
from codellm.train.cli import main
build = loop.build_epoch
def build_then_terminated(*args, **kwargs):
    subprocess.run(["kill", "-TERM", str(os.getpid())])  # from outside, as a user's kill is
    time.sleep(5)
    return build(*args, **kwargs)
loop.build_epoch = build_then_terminated
sys.exit(main({common!r}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 128 + signal.SIGTERM, (r.returncode, r.stderr[-3000:])
    assert "interrupted (SIGTERM)" in r.stderr and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert not list(tmp_path.rglob(".*.tmp"))  # no temporary file left half written
    r = train(*common, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").exists()


def test_a_run_begun_before_sittings_were_recorded_says_its_first_steps_are_not():
    from codellm.train.loop import sittings_so_far
    from train.modelcard import _sittings_line
    assert sittings_so_far({"step": 0}) == []
    assert sittings_so_far({"step": 5, "sittings": [{"from_step": 0}]}) == [{"from_step": 0}]
    old = sittings_so_far({"step": 6, "tokens": 96})
    line = _sittings_line("code", old + [{"from_step": 6, "from_tokens": 96, "learning_rate": 1e-4, "max_steps": None,
                                          "time_budget": 600.0, "device": "cpu"}])
    assert line == ("- `code` was trained in 2 sittings: from step 0 (0 tokens), how not recorded; from step 6 "
                    "(96 tokens), learning rate 0.0001, --time-budget 600, cpu.")


def test_a_second_signal_of_the_other_kind_acts_at_once_too():
    """After SIGTERM asked a run to stop after its step, Ctrl-C ends it at once (and the other way round)."""
    from codellm.train.loop import StopRequest
    for first, second in ((signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)):
        before = signal.getsignal(second)
        with StopRequest().watching(lambda *_: None) as stop:
            assert signal.getsignal(second) is not before
            signal.raise_signal(first)
            assert stop.signum == first and signal.getsignal(second) is before
