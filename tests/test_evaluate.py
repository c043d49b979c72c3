"""`codellm-train eval`: two bundles side by side on a small corpus with both held-out splits, every figure
per split, and the block-completion figure built from held-out block openers."""
import json
import re
import random
import subprocess
import sys

from codellm.train.corpus import record, write_records
from codellm.train.evaluate import (block_openers, better_on_every_split, fallen_figures, call_points, cut_points, paired_difference,
                                    round_robin, with_siblings_open, cross_file_points)
from codellm.train.recipe import ENGLISH_FILE, PAIRS_FILE, SHELL_FILE

from conftest import ENGLISH_SAMPLES, SHELL_SAMPLES

HELDOUT = ('#!/bin/sh\nset -e\nfor f in "$@"; do\n    gzip -9 "$f"\ndone\n'
           'if [ -d /tmp/out ]; then\n    rm -rf /tmp/out\nfi\nlog() {\n    echo "$*" >&2\n}\n')


def small_corpus(folder):
    shell = [record(t, f"pkg{k}", f"s{k}.sh") for k, t in enumerate(SHELL_SAMPLES)]
    shell += [record(HELDOUT, "heldpkg", "h.sh", split="val"),
              record(HELDOUT.replace("gzip", "xz"), "userpkg", "u.sh", split="val_user")]
    write_records(folder / SHELL_FILE, shell)
    write_records(folder / ENGLISH_FILE, [record(t, "en", f"e{k}.txt", split=split)
                                          for k, t in enumerate(ENGLISH_SAMPLES) for split in ("train", "val")])
    pair = "#!/bin/bash\n# Compress every log file in the folder\ngzip *.log\n"
    write_records(folder / PAIRS_FILE, [record(pair, "heldpkg", "h.sh", split="val"),
                                        record(pair, "userpkg", "u.sh", split="val_user")])


def test_block_openers_are_the_only_open_block():
    prefixes = block_openers([HELDOUT], 10, random.Random(0))
    assert sorted(p.rstrip("\n").rsplit("\n", 1)[-1] for p in prefixes) == [
        'for f in "$@"; do', "if [ -d /tmp/out ]; then", "log() {"]


def test_cut_points_of_a_file_stay_when_another_file_joins_the_split():
    other = 'mkdir -p "$HOME/.cache"\ncp -r build/* /opt/app/\nchmod +x /opt/app/run\nexit 0\n'
    alone = cut_points([HELDOUT], 40)
    joined = cut_points([other, HELDOUT], 40)
    assert {p["kind"] for p in alone} == {"line_start", "mid_line"}
    for point in alone:  # the cut at the end of the line is the line's text after the cut
        assert HELDOUT.startswith(point["prefix"] + point["target"])
        assert point["suffix"] == HELDOUT[len(point["prefix"] + point["target"]):]
    key = lambda p: (p["kind"], p["prefix"], p["target"])
    assert sorted(map(key, alone)) == sorted(key(p) for p in joined if p["file"] == 1)
    few = cut_points([other, HELDOUT], 6)
    assert len(few) == 6 and {key(p) for p in few if p["file"] == 1} <= set(map(key, alone))
    assert [key(p) for p in cut_points([HELDOUT], 40, seed=1)] != [key(p) for p in alone]


def test_cross_file_cuts_only_where_another_file_is_needed():
    script = ("#!/bin/bash\n. ./lib.sh\nlog_info start\nfetch_release v1\nlog_info again\n"
              "# then check_sum runs\ncheck_sum out.tar\nlog_error() { :; }\n")
    points = call_points(script, {"log_info", "fetch_release", "check_sum"})
    starts = [p for p in points if p["kind"] == "call_start"]
    # first calls only; check_sum is named in a comment above its call, so the file itself tells it
    assert [p["target"] for p in starts] == ["log_info start", "fetch_release v1"]
    mid = [p for p in points if p["kind"] == "call_mid"]
    assert [p["prefix"][-3:] for p in mid] == ["log", "fet"] and mid[0]["target"] == "_info start"
    assert all(p["prefix"] + p["target"] + p["suffix"] == script for p in starts)


def test_sibling_scripts_open_come_from_the_same_package_only():
    records = [{"source": src, "path": f"/{name}.sh", "text": f"#!/bin/bash\necho {src} {name}\nexit 0\n"}
               for src in ("npm:a", "npm:b") for name in ("x", "y", "z")] + \
              [{"source": "npm:alone", "path": "/only.sh", "text": "#!/bin/bash\necho alone\nexit 0\n"}]
    points = with_siblings_open(records, 100, seed=0)
    assert points and len({p["doc_path"] for p in points}) >= 2
    for p in points:
        own = next(r for r in records if r["path"] == p["doc_path"] and r["text"] == p["prefix"] + p["target"] + p["suffix"])
        assert own["source"] != "npm:alone"
        assert len(p["open_docs"]) == 2 and p["doc_path"] not in dict(p["open_docs"])
        assert all(text.split()[2] == own["source"] for _, text in p["open_docs"])


def test_two_bundles_are_measured_on_the_same_cross_file_cuts():
    lib = "log_info() { echo \"$*\"; }\nfetch_release() { curl -fsSLO \"$1\"; }\n"
    records = [{"source": f"npm:{pkg}", "path": f"/{name}.sh",
                "text": f"#!/bin/bash\n. ./lib.sh\nlog_info {pkg} {name}\nmkdir -p out/{name}\n"
                        f"fetch_release v{k}\ntar -xzf v{k}.tar.gz -C out/{name}\nexit 0\n"}
               for pkg in ("a", "b") for k, name in enumerate(("x", "y", "z"))]
    records += [{"source": f"npm:{pkg}", "path": "/lib.sh", "text": lib} for pkg in ("a", "b")]
    (first, counts), second = cross_file_points(records, seed=0), cross_file_points(records, seed=0)
    assert first["other_cuts"] and first["open_docs"] and (first, counts) == second
    assert counts == {"packages": 2, "scripts": 6}  # same-named scripts of two packages are two scripts
    # the ordinary cuts are each script's own cut points for that seed, whatever else the sample holds
    for p in first["other_cuts"]:
        text = p["prefix"] + p["target"] + p["suffix"]
        assert (p["prefix"], p["target"]) in {(q["prefix"], q["target"]) for q in cut_points([text], 20, 0)}


def test_cross_file_sample_takes_each_package_in_turn():
    many, few = [{"pkg": "big", "k": k} for k in range(50)], [{"pkg": "small", "k": k} for k in range(2)]
    picked = round_robin([many, few], 6)
    assert [p["pkg"] for p in picked] == ["big", "small", "big", "small", "big", "big"]
    assert round_robin([[], few], 10) == few


def test_two_bundles_compare_on_every_split(bundle_path, tmp_path, capsys):
    small_corpus(tmp_path)
    out = tmp_path / "eval.json"
    run = subprocess.run([sys.executable, "-m", "codellm.train.cli", "eval", str(bundle_path), str(bundle_path),
                          "--corpus", str(tmp_path), "--samples", "4", "--pairs", "2", "--blocks", "3",
                          "--scripts", "2", "--keystrokes", "0", "--no-card", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    results = json.loads(out.read_text())
    assert len(results) == 2
    for split in ("val", "val_user"):  # the same bundle twice gives the same figures (latency aside)
        for name in ("shell_loss", "comment_to_command", "block_completion"):
            assert results[0]["splits"][split][name] == results[1]["splits"][split][name]
    for split in ("val", "val_user"):
        figures = results[0]["splits"][split]
        assert figures["heldout_files"] == 1 and figures["shell_loss"]["loss"] > 0
        assert figures["comment_to_command"]["n"] == 1
        assert figures["comment_to_command"]["model_command_share"] in (0.0, 100.0)  # one pair: all or none
        assert figures["block_completion"]["n"] == 3
        assert 0 <= figures["block_completion"]["bash_n_pass"] <= 100
    assert "block after opener" in run.stdout and "held-out split val_user" in run.stdout
    assert "the model's own choice: command %" in run.stdout
    # the same bundle twice is not better than itself
    assert "not worse beyond doubt)? no" in run.stdout
    assert "line ES with suffix, val_user, first - second bundle, same 4 cut points: +0.00" in run.stdout
    assert "whole scripts bash -n %, first - second bundle, same 2 prompts: +0.0 (0 fell, 0 rose" in run.stdout
    assert len(results[0]["whole_scripts"]["per_script"]["bash_n_pass"]) == 2
    from codellm.train.evaluate import print_table
    results[0]["splits"]["val"]["shell_loss"]["loss"] = 1e15  # a cell wider than any default column
    capsys.readouterr()
    print_table(results)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("shell loss"))
    assert re.search(r"1000000000000000\.000 / \S+\s{2,}\S", row), row  # the columns stay apart


def test_eval_refuses_a_place_it_cannot_write_before_evaluating(bundle_path, tmp_path):
    small_corpus(tmp_path)
    out = tmp_path / "no-such-folder" / "eval.json"
    run = subprocess.run([sys.executable, "-m", "codellm.train.cli", "eval", str(bundle_path), "--corpus", str(tmp_path),
                          "--samples", "4", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "cannot write the results file" in run.stderr and "--out" in run.stderr
    assert "held-out" not in run.stdout and "Traceback" not in run.stderr  # nothing was evaluated


def test_evaluating_the_shipped_model_leaves_its_files_as_they_are(tmp_path):
    from codellm.defaults import PACKAGED_BUNDLE
    small_corpus(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in PACKAGED_BUNDLE.parent.iterdir()}
    card = (PACKAGED_BUNDLE / "data.msgpack").read_bytes()
    run = subprocess.run([sys.executable, "-m", "codellm.train.cli", "eval", "default", "--corpus", str(tmp_path),
                          "--samples", "2", "--pairs", "0", "--blocks", "0", "--scripts", "0", "--keystrokes", "0",
                          "--cross-file", "0"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (PACKAGED_BUNDLE / "data.msgpack").read_bytes() == card  # the installed model's card is not written
    assert {p.name: p.stat().st_mtime_ns for p in PACKAGED_BUNDLE.parent.iterdir()} == before
    assert json.loads((tmp_path / "default-eval.json").read_text())["splits"]  # the results, in the working folder


def test_paired_difference_tells_a_real_change_from_noise():
    rng = random.Random(3)
    old = [rng.uniform(0, 100) for _ in range(300)]
    noise = [x + rng.gauss(0, 5) for x in old]
    worse = [x - 10 for x in old]
    assert paired_difference(noise, old)["low"] < 0 < paired_difference(noise, old)["high"]
    assert paired_difference(worse, old)["high"] < 0 and paired_difference(worse, old)["mean"] == -10
    assert paired_difference(old[:5], old) is None  # not the same points


def test_a_lower_loss_with_worse_line_completion_is_not_better():
    def results(loss, es):
        return {"splits": {s: {"shell_loss": {"loss": loss}, "line_completion": {"es_per_point": es}}
                           for s in ("val", "val_user")}}
    rng = random.Random(4)
    old_es = [rng.uniform(0, 100) for _ in range(200)]
    old = results(2.0, old_es)
    assert better_on_every_split(results(1.9, [x + rng.gauss(0, 3) for x in old_es]), old)
    assert not better_on_every_split(results(1.9, [x - 8 for x in old_es]), old)
    assert not better_on_every_split(results(2.1, old_es), old)


def test_whole_scripts_that_fell_beyond_doubt_are_not_better():
    def results(loss, passes):
        return {"splits": {"val": {"shell_loss": {"loss": loss}}},
                "whole_scripts": {"n": len(passes), "per_script": {"bash_n_pass": passes, "shellcheck_pass": None}}}
    old = results(2.0, [100] * 40)
    assert better_on_every_split(results(1.9, [100] * 38 + [0] * 2), old)  # two of forty: may be chance
    assert not better_on_every_split(results(1.9, [100] * 30 + [0] * 10), old)
    # one script of one, or four of four, falling may be chance (p = 1/2, 1/16); six of six is not (1/64)
    assert better_on_every_split(results(1.9, [0]), results(2.0, [100]))
    assert better_on_every_split(results(1.9, [0] * 4 + [100] * 36), old)
    assert not better_on_every_split(results(1.9, [0] * 6 + [100] * 34), old)
    # six falling and six rising is a wash
    assert better_on_every_split(results(1.9, [0] * 6 + [100] * 34), results(2.0, [100] * 6 + [0] * 6 + [100] * 28))
    assert better_on_every_split(results(1.9, [100] * 30 + [0] * 10), results(2.0, [100] * 30 + [0] * 10))
    assert better_on_every_split(results(1.9, [100] * 40), {"splits": old["splits"]})  # not measured: no weight


def test_figures_the_rule_does_not_weigh_are_named_where_they_fell():
    def results(scripts, blocks, right):
        return {"whole_scripts": {"n": 40, "bash_n_pass": scripts, "shellcheck_pass": None},
                "splits": {"val": {"block_completion": {"n": 60, "bash_n_pass": blocks},
                                   "comment_to_command": {"n": 150, "right_command_share": right}},
                           "val_user": {"block_completion": None, "comment_to_command": None}}}
    fallen = fallen_figures(results(87.5, 70.0, 4.0), results(92.5, 68.3, 4.0))
    assert fallen == ["whole scripts bash -n % 92.5 -> 87.5 (n=40)"]
    assert fallen_figures(results(92.5, 68.3, 4.0), results(92.5, 68.3, 4.0)) == []
