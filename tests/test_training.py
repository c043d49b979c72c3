"""codellm-train end to end, resume after SIGKILL, two-process DDP, and bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import codellm
from codellm.train.checkpoint import CHECKPOINT_FILE, read_checkpoint_state
from codellm.train.corpus import Counts, code_data_records
from codellm.train.datacard import stage_files
from codellm.train.recipe import build_corpus

from conftest import ENGLISH_SAMPLES, SHELL_SAMPLES

TRAIN = [sys.executable, "-m", "codellm.train.cli"]
SMALL = ["--model-size", "test", "--context-length", "128", "--batch-size", "8", "--precision", "fp32",
         "--warmup-steps", "5", "--learning-rate", "3e-3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    scripts = root / "scripts"
    (scripts / "sub").mkdir(parents=True)
    for i in range(30):
        for j, sample in enumerate(SHELL_SAMPLES):
            (scripts / ("sub" if i % 2 else "") / f"s{i}_{j}.sh").write_text(sample.replace("FILE", f"FILE{i}"))
    (root / "english.txt").write_text("<|endoftext|>".join(ENGLISH_SAMPLES * 10))
    return root


def metrics(run_dir):
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step[rec["step"]] = rec["loss"]  # a resumed run rewrites steps after its checkpoint: keep the last
    return by_step


def test_train_all_end_to_end(data_dir, tmp_path):
    out = tmp_path / "model"
    r = subprocess.run(TRAIN + ["all", "--code-data", str(data_dir / "scripts"), "--language-data",
                                str(data_dir / "english.txt"), "--out", str(out), "--max-steps", "80",
                                "--language-share", "0.25", *SMALL],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = list(metrics(tmp_path / "model.code-run").values())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # the loss fell
    assert (tmp_path / "model.code-run" / "loss.png").stat().st_size > 1000
    engine = codellm.load(str(out), device="cpu")
    assert isinstance(engine.complete("for f in *.txt; do\n", "\ndone\n", mode="block"), str)
    card = engine.bundle.card
    assert set(card["stages"]) == {"language", "code"}
    files = stage_files(card, "code")
    assert files and len(files[0][1]) == 32  # sha256


def test_resume_after_sigkill_matches_an_uninterrupted_run(data_dir, tmp_path):
    common = ["code", "--code-data", str(data_dir / "scripts"), "--max-steps", "60", "--checkpoint-every", "10",
              *SMALL]
    straight = tmp_path / "straight"
    r = subprocess.run(TRAIN + common + ["--out", str(straight)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = metrics(tmp_path / "straight.code-run")

    killed = tmp_path / "killed"
    run_dir = tmp_path / "killed.code-run"
    proc = subprocess.Popen(TRAIN + common + ["--out", str(killed), "--corpus", str(straight) + ".work/corpus",
                                              "--tokenizer", str(straight) + ".work/tokenizer.json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        state = read_checkpoint_state(run_dir) if (run_dir / CHECKPOINT_FILE).exists() else None
        if state and state["step"] >= 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = read_checkpoint_state(run_dir)  # whatever the moment of the kill, the checkpoint is whole
    assert state is not None and 20 <= state["step"] < 60
    assert not killed.exists()  # no final bundle from a killed run
    r = subprocess.run(TRAIN + common + ["--out", str(killed), "--resume", "--corpus", str(straight) + ".work/corpus",
                                         "--tokenizer", str(straight) + ".work/tokenizer.json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = metrics(run_dir)
    n = state["step"]
    assert resumed[n + 1] == pytest.approx(reference[n + 1], abs=1e-6)
    assert resumed[60] == pytest.approx(reference[60], abs=1e-5)


def test_two_process_ddp_matches_single_process(data_dir, tmp_path):
    common = ["code", "--code-data", str(data_dir / "scripts"), "--max-steps", "6", *SMALL]
    r = subprocess.run(TRAIN + common + ["--out", str(tmp_path / "single")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29533", "-m", "codellm.train.cli", *common, "--out", str(tmp_path / "ddp"),
                        "--corpus", str(tmp_path / "single.work/corpus"),
                        "--tokenizer", str(tmp_path / "single.work/tokenizer.json")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    single, ddp = metrics(tmp_path / "single.code-run"), metrics(tmp_path / "ddp.code-run")
    assert list(single) == list(ddp) == [1, 2, 3, 4, 5, 6]
    for step in single:
        assert ddp[step] == pytest.approx(single[step], abs=1e-4)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable text"):
        build_corpus(tmp_path / "corpus", code_data=[tmp_path / "empty"], log=lambda *_: None)


def test_only_binary_files_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    for i in range(3):
        (folder / f"b{i}.sh").write_bytes(b"\x7fELF\x00\x01\x02" * 10)
    with pytest.raises(ValueError, match="binary"):
        build_corpus(tmp_path / "corpus", code_data=[folder], log=lambda *_: None)


def test_non_utf8_is_skipped_and_the_rest_kept(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "bad.sh").write_bytes(b"#!/bin/sh\necho \xff\xfe\n")
    (folder / "good.sh").write_text("#!/bin/sh\necho ok\n")
    (folder / "configure").write_text("#!/bin/sh\n# Generated by GNU Autoconf\n")
    (folder / "tool").write_text("#!/usr/bin/env python3\nimport os\n")
    counts = Counts()
    records = list(code_data_records(folder, set(), counts))
    assert [r["path"] for r in records] == ["good.sh"]
    assert counts.skipped["not utf-8"] == 1 and counts.skipped["generated"] == 1


def test_empty_json_list_is_a_clear_error(tmp_path):
    (tmp_path / "scripts.json").write_text('{"scripts": []}')
    r = subprocess.run(TRAIN + ["corpus", "--code-data", str(tmp_path / "scripts.json"), "--corpus",
                                str(tmp_path / "c")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no usable text" in r.stderr


def test_seed_json_format_is_read(tmp_path):
    (tmp_path / "scripts.json").write_text(json.dumps({"scripts": ["echo a\n", {"content": "ls -la\n"}, "echo a\n"]}))
    summary = build_corpus(tmp_path / "c", code_data=[tmp_path / "scripts.json"], log=lambda *_: None)
    assert summary["shell"]["files"] == 2 and summary["shell"]["skipped"] == {"duplicate": 1}


def test_fine_tune_on_your_own_scripts(bundle_path, data_dir, tmp_path):
    out = tmp_path / "mine"
    r = subprocess.run(TRAIN + ["code", "--from", str(bundle_path), "--code-data", str(data_dir / "scripts"),
                                "--out", str(out), "--batch-size", "4", "--precision", "fp32", "--max-steps", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 1/3 " in r.stdout + r.stderr  # the first step is reported: the run is seen to be under way
    engine = codellm.load(str(out), device="cpu")
    assert engine.tokenizer.to_str() == codellm.load(str(bundle_path)).tokenizer.to_str()
    stages = engine.bundle.card["stages"]
    assert list(stages) == ["code"] and stages["code"]["steps"] == 3
    assert stages["code"]["train_config"]["learning_rate"] == 5e-4
    # fine-tuning the fine-tuned model keeps the earlier stage on record
    r = subprocess.run(TRAIN + ["code", "--from", str(out), "--code-data", str(data_dir / "scripts"), "--out",
                                str(tmp_path / "again"), "--batch-size", "4", "--max-steps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(codellm.load(str(tmp_path / "again")).bundle.card["stages"]) == ["code", "code-2"]


def test_compile_is_automatic_only_for_long_runs():
    from codellm.train.loop import COMPILE_AUTO_MIN_SECONDS, TrainConfig, compile_wanted
    assert not compile_wanted(TrainConfig(compile="auto", max_steps=50))
    assert not compile_wanted(TrainConfig(compile="auto", time_budget=60))
    assert compile_wanted(TrainConfig(compile="auto", time_budget=COMPILE_AUTO_MIN_SECONDS))
    assert compile_wanted(TrainConfig(compile="on", max_steps=5))
    assert not compile_wanted(TrainConfig(compile="off", time_budget=7200))


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5])
def test_pair_scripts_make_up_their_share_of_an_epoch(tokenizer, share):
    from codellm.train.data import Mixture, build_epoch
    shell = [f"cp /etc/app{i}.conf /backup/\n" * 8 for i in range(100)]  # each whole in a window
    pairs = ["#!/bin/bash\n# show the disk usage of each folder\ndu -sh ./*\n"]  # fewer than the share asks
    inputs, _ = build_epoch(tokenizer, Mixture(shell, 0.0, pair_texts=pairs, pair_share=share), 512, seed=0, epoch=0)
    text = tokenizer.decode([int(i) for i in inputs.flatten()])
    pair_chars = text.count("du -sh ./*") * len(pairs[0])
    shell_chars = text.count("cp /etc/app") * len("cp /etc/app0.conf /backup/\n")
    assert pair_chars / (pair_chars + shell_chars) == pytest.approx(share, abs=0.02)


@pytest.mark.parametrize("share", [0.0, 0.3, 0.6])
def test_user_style_files_make_up_their_share_of_an_epoch(tokenizer, share):
    from codellm.train.data import Mixture, build_epoch, is_user_style
    debian = [f"cp /etc/app{i}.conf /backup/\n" * 8 for i in range(90)]
    user = [f"npm run build{i} && npm test\n" * 8 for i in range(10)]  # 10 % of the files as they come
    places = [f"debian:app{i}:/etc/app.sh" for i in range(90)] + [f"npm:tool{i}:/scripts/ci.sh" for i in range(10)]
    mix = Mixture(debian + user, 0.0, user_style=[is_user_style(p) for p in places], user_share=share)
    inputs, _ = build_epoch(tokenizer, mix, 512, seed=0, epoch=0)
    text = tokenizer.decode([int(i) for i in inputs.flatten()])
    user_chars = text.count("npm run build") * len(user[0]) / 8
    debian_chars = text.count("cp /etc/app") * len(debian[0]) / 8
    assert text.count("cp /etc/app") == 90 * 8  # every file still read once
    assert user_chars / (user_chars + debian_chars) == pytest.approx(max(share, 0.1), abs=0.02)


def test_user_style_sources_are_npm_pypi_and_the_users_own():
    from codellm.train.data import is_user_style
    assert [is_user_style(s) for s in ("npm:x:/a.sh", "pypi:y", "user:scripts", "debian:bash", "debian-src:z",
                                        "machine:dotfiles", "user-heldout:mine")] == [True] * 3 + [False] * 4


def test_a_pair_share_of_one_is_refused(tmp_path, bundle_path):
    from codellm.train.loop import TrainConfig
    from codellm.train.stages import run_stage
    with pytest.raises(ValueError, match="--pair-share"):
        run_stage("code", tmp_path, tmp_path / "out", TrainConfig(max_steps=1), from_bundle=bundle_path, pair_share=1.0)


@pytest.mark.parametrize("flag", ["--pair-share", "--user-share"])
@pytest.mark.parametrize("bad", ["1.5", "0.95", "-0.1", "nan", "inf", "abc"])
def test_a_bad_share_is_refused_before_any_work(tmp_path, capsys, bad, flag):
    from codellm.train.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["code", "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "out"), flag, bad])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_an_epoch_tokenised_in_batches_is_the_one_made_document_by_document(tokenizer, monkeypatch):
    import random
    from codellm.prompt import fim_training_ids, fim_training_pieces
    from codellm.train import data
    texts = [f"#!/bin/sh\n# step {k}\necho 'part {k}' | tee -a /tmp/log{k}\n" * (1 + k % 4) for k in range(40)]
    chunks = [(t, 0.5) for t in texts[:20]] + [(t, 0.9, "# lib.sh\nlog() { echo \"$*\"; }\n") for t in texts[20:]]
    chunks.append(("", 0.5))
    rng_a, rng_b = random.Random(7), random.Random(7)
    layouts = [fim_training_pieces(c[0], rng_a, c[1]) for c in chunks]
    one_by_one = [fim_training_ids(tokenizer, c[0], rng_b, c[1], context=c[2] if len(c) > 2 else "") for c in chunks]
    assert [list(e) for e in data.encoded_examples(tokenizer, chunks, layouts)] == one_by_one
    assert any(fmt for fmt, _ in layouts) and any(fmt is None for fmt, _ in layouts)  # both layouts were met
    mix = data.Mixture(texts, fim_rate=0.5)
    whole, _ = data.build_epoch(tokenizer, mix, 128, seed=3, epoch=1)
    monkeypatch.setattr(data, "ENCODE_BATCH", 7)  # batch edges fall inside the epoch
    assert torch.equal(data.build_epoch(tokenizer, mix, 128, seed=3, epoch=1)[0], whole)


def test_ctrl_c_saves_the_step_it_reached_and_resume_goes_on_from_there(data_dir, tmp_path):
    common = ["code", "--code-data", str(data_dir / "scripts"), "--max-steps", "60", "--checkpoint-every", "1000",
              *SMALL]
    out, run_dir = tmp_path / "model", tmp_path / "model.code-run"
    proc = subprocess.Popen(TRAIN + common + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # a step or a few in, none of them checkpointed (every 1000)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    state = read_checkpoint_state(run_dir)
    logged = metrics(run_dir)
    assert state is not None and state["step"] == max(logged) < 60  # the last step logged is the one saved
    assert not out.exists()  # no bundle from a stopped run
    assert (run_dir / "loss.png").stat().st_size > 1000  # the curve up to the stop
    r = subprocess.run(TRAIN + common + ["--out", str(out), "--resume", "--corpus", str(out) + ".work/corpus",
                                         "--tokenizer", str(out) + ".work/tokenizer.json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run_dir} at step {state['step']}" in r.stdout + r.stderr
    resumed = metrics(run_dir)
    assert sorted(resumed) == list(range(1, 61)) and out.exists()
    assert all(resumed[k] == logged[k] for k in logged)  # the steps before the stop are kept as they were


def test_packing_fills_windows_with_whole_examples_as_the_plain_way_does():
    from array import array
    from codellm.train.data import IGNORE, pack

    def plainly(examples, context_length, pad_id):  # the rule in its most direct form
        width, windows, masks, row, row_mask = context_length + 1, [], [], [], []
        for ex in examples:
            ex = list(ex)[:width]
            if len(row) + len(ex) > width:
                if len(row) >= 2:
                    windows.append(row + [pad_id] * (width - len(row)))
                    masks.append(row_mask + [0] * (width - len(row)))
                row, row_mask = [], []
            row, row_mask = row + ex, row_mask + [1] * len(ex)
        if len(row) >= 2:
            windows.append(row + [pad_id] * (width - len(row)))
            masks.append(row_mask + [0] * (width - len(row)))
        if not windows:
            return None
        data, mask = torch.tensor(windows), torch.tensor(masks, dtype=torch.bool)
        targets = data[:, 1:].clone()
        targets[~mask[:, 1:]] = IGNORE
        return data[:, :-1], targets

    rng = __import__("random").Random(5)
    for trial in range(20):  # lengths around the window: single tokens, exact fits, too long
        examples = [array("i", [rng.randrange(1, 50) for _ in range(rng.choice([1, 1, 2, 3, 7, 8, 9, 17, 30]))])
                    for _ in range(rng.randrange(1, 40))]
        want = plainly(examples, 8, 0)
        if want is None:  # no window at all: refused
            with pytest.raises(ValueError):
                pack(examples, 8, 0)
            continue
        got = pack(examples, 8, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), trial


def test_a_short_run_reaches_its_learning_rate():
    from codellm.train.loop import TrainConfig, lr_at
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=50)
    assert lr_at(1, 0.1, cfg, max_steps=20) == pytest.approx(1e-3)  # warmup of 2 steps, not 50
    assert lr_at(0, 0.0, cfg, max_steps=20) == pytest.approx(5e-4)
    assert lr_at(9, 0.01, cfg) == pytest.approx(1e-3 * 10 / 50)  # a time-budget run keeps its 50 steps
    assert lr_at(9, 0.01, cfg, max_steps=10_000) == pytest.approx(1e-3 * 10 / 50)


def test_the_tokenizer_says_what_its_bytes_per_token_were_measured_on(data_dir, tmp_path):
    from codellm.train.stages import train_tokenizer
    held = tmp_path / "held"
    held.mkdir()
    (held / "deploy.sh").write_text("#!/bin/sh\nset -eu\nrsync -a build/ host:/srv/app/\nssh host systemctl restart app\n")
    for name, heldout, says in [("own", [], "its own training text"), ("held", [held], "held-out shell")]:
        corpus = tmp_path / name
        build_corpus(corpus, code_data=[data_dir / "scripts"], heldout_data=heldout, log=lambda *_: None)
        summary = json.loads((corpus / "summary.json").read_text())
        assert summary["shell_val_files"] + summary["shell_val_user_files"] == len(heldout)
        said = []
        train_tokenizer(corpus, tmp_path / f"{name}.json", vocab_size=400, log=said.append)
        assert len(said) == 1 and said[0].endswith(f"bytes/token on {says}"), said
