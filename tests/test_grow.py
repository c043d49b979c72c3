"""Growing a trained model's depth (train/grow.py, `codellm-train code --from B --layers N`): the grown
model computes what the trained one did, its new layers then learn, and the bundle it makes (int8
storage too) is served like any other."""
import subprocess
import sys

import pytest
import torch

import codellm
from codellm.bundle import load_bundle
from codellm.train.grow import expansion, grown

from conftest import make_model

TRAIN = [sys.executable, "-m", "codellm.train.cli"]


def test_new_blocks_are_spread_evenly_after_the_trained_ones():
    assert expansion(6, 12) == [(i, copy) for i in range(6) for copy in (False, True)]
    assert expansion(6, 8) == [(0, False), (1, False), (2, False), (2, True), (3, False), (4, False), (5, False),
                               (5, True)]
    assert expansion(2, 2) == [(0, False), (1, False)]
    assert expansion(2, 7) == [(0, False), (0, True), (0, True), (1, False), (1, True), (1, True), (1, True)]
    with pytest.raises(ValueError, match="only grow"):
        expansion(6, 4)


@pytest.mark.parametrize("layers", [3, 5])
def test_the_grown_model_computes_what_the_trained_one_did(tokenizer, layers):
    model = make_model(tokenizer, seed=4).eval()  # 2 layers
    bigger = grown(model, layers).eval()
    assert bigger.cfg.n_layer == layers and model.cfg.n_layer == 2
    assert bigger.num_params() > model.num_params()
    ids = torch.tensor([tokenizer.encode("for f in *.txt; do\n\techo \"$f\"\ndone\n")])
    with torch.no_grad():
        torch.testing.assert_close(bigger(ids), model(ids), rtol=0, atol=1e-5)
    # the new blocks are not inert: their output projections get a gradient at once
    bigger.train()
    bigger(ids).logsumexp(-1).mean().backward()
    new = [j for j, (_, copy) in enumerate(expansion(2, layers)) if copy]
    assert all(bigger.blocks[j].attn.proj.weight.grad.abs().sum() > 0 for j in new)


def test_a_model_grown_into_a_presets_shape_is_named_by_it():
    """nano (6 layers) grown to 11 layers has tiny's shape, so `codellm-train all --model-size tiny`
    rebuilds it; grown to 12 it is a shape of its own."""
    from codellm.config import ModelConfig
    from codellm.model import GPT
    nano = GPT(ModelConfig.from_preset("nano", vocab_size=512))
    assert grown(nano, 11).cfg == ModelConfig.from_preset("tiny", vocab_size=512)
    assert grown(nano, 12).cfg.preset == "custom"
    assert grown(nano, 6).cfg.preset == "nano"
    short = GPT(ModelConfig.from_preset("nano", vocab_size=512, context_length=512))  # a preset's override
    assert grown(short, 11).cfg == ModelConfig.from_preset("tiny", vocab_size=512, context_length=512)


def test_a_stage_grows_the_bundle_and_stores_it_as_int8(bundle_path, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for i in range(40):
        (scripts / f"s{i}.sh").write_text(f"#!/bin/bash\nfor f in /var/log/app{i}/*.log; do\n\tgzip \"$f\"\ndone\n")
    out = tmp_path / "grown"
    r = subprocess.run(TRAIN + ["code", "--from", str(bundle_path), "--code-data", str(scripts), "--out", str(out),
                                "--layers", "3", "--storage", "int8", "--batch-size", "4", "--precision", "fp32",
                                "--max-steps", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = load_bundle(out)
    assert bundle.config.n_layer == 3 and bundle.storage_dtype == "int8"
    assert bundle.card["stages"]["code"]["shape"] == {"n_layer": 3, "parameters": bundle.model.num_params()}
    engine = codellm.load(str(out), device="cpu")
    assert isinstance(engine.complete("for f in *.txt; do\n", "\ndone\n", mode="block"), str)
    # a stage from the int8 bundle stays int8 unless told otherwise
    r = subprocess.run(TRAIN + ["code", "--from", str(out), "--code-data", str(scripts), "--out", str(tmp_path / "on"),
                                "--batch-size", "4", "--precision", "fp32", "--max-steps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_bundle(tmp_path / "on").storage_dtype == "int8"


@pytest.mark.parametrize("flags,message", [(["--layers", "1"], "fewer than the bundle's 2"),
                                           (["--layers", "100000"], "from 1 to"),
                                           (["--layers", "4", "--no-from"], "give --from")])
def test_a_model_that_cannot_grow_so_is_refused_before_any_work(bundle_path, tmp_path, flags, message):
    source = [] if "--no-from" in flags else ["--from", str(bundle_path)]
    flags = [f for f in flags if f != "--no-from"]
    r = subprocess.run(TRAIN + ["code", *source, "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                "--max-steps", "1", *flags], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and message in r.stderr and not (tmp_path / "o").exists()


def test_resuming_with_another_depth_is_refused(tokenizer, tmp_path):
    from codellm.train.checkpoint import check_same_shape

    model, bigger = make_model(tokenizer), grown(make_model(tokenizer), 3)
    check_same_shape(tmp_path / "c", bigger.state_dict(), bigger)
    with pytest.raises(ValueError, match="another model shape"):
        check_same_shape(tmp_path / "c", bigger.state_dict(), model)
    with pytest.raises(ValueError, match="another model shape"):
        check_same_shape(tmp_path / "c", model.state_dict(), bigger)
