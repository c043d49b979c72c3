"""Broken bundles are refused by codellm.load, naming the file and field, before anything is allocated;
the server's hot swap survives them, follows a symlinked --model and reads each swap whole."""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import codellm
from codellm.bundle import save_bundle

from conftest import make_model
from lsp_session import Session

PREFIX = "#!/bin/bash\nif [ -z \"$1\" ]; then\n    echo usage"


def with_config(src, dst, **model_fields):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["model"].update(model_fields)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


BAD_FIELDS = [("n_layer", 100000), ("context_length", 1e9), ("context_length", 10**9), ("n_head", 0),
              ("d_model", -64), ("n_layer", "2"), ("vocab_size", None), ("qk_norm", "yes"), ("rope_base", -1),
              ("norm_eps", [1]), ("mlp_ratio", 2.5), ("n_layer", True)]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_bad_config_fields_are_named(bundle_path, tmp_path, field, value):
    bad = with_config(bundle_path, tmp_path / "bad", **{field: value})
    with pytest.raises(codellm.BundleError) as err:
        codellm.load(str(bad), device="cpu")
    assert "config.json" in str(err.value) and f"model.{field}" in str(err.value)


def test_a_huge_config_is_refused_before_memory_is_taken(bundle_path, tmp_path):
    """Under a 3 GB address-space limit: building the model first would fail with MemoryError instead."""
    bad = with_config(bundle_path, tmp_path / "bad", n_layer=100000)
    code = ("import resource, codellm\n"
            "resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))\n"
            f"try:\n    codellm.load({str(bad)!r}, device='cpu')\n"
            "except codellm.BundleError as exc:\n    print('refused:', exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in r.stdout and "model.n_layer" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("damage", ["nan", "inf", "int"])
def test_bad_weights_are_refused_naming_the_file(bundle_path, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(bundle_path, bad)
    state = load_file(str(bad / "model.safetensors"))
    name = sorted(state)[0]
    if damage == "int":
        state[name] = state[name].to(torch.int16)
    else:
        state[name] = state[name].clone()
        state[name].view(-1)[0] = float(damage)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(codellm.BundleError) as err:
        codellm.load(str(bad), device="cpu")
    assert "model.safetensors" in str(err.value) and name in str(err.value)


def expected(bundle, prefix=PREFIX):
    text = codellm.load(str(bundle), device="cpu").complete(prefix, "", "line")
    return [text] if text else []


async def fresh_inline(s, uri, line, char):
    s.edit(uri, line, char, " ")  # a new edit: no cached answer
    s.edit(uri, line, char, "", end=(line, char + 1))
    return [i.insert_text for i in (await s.inline(uri, line, char)).items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


def test_hot_swap_survives_every_broken_bundle(bundle_path, tmp_path, tokenizer):
    live = tmp_path / "models" / "live"
    shutil.copytree(bundle_path, live)
    good = tmp_path / "good"
    save_bundle(good, make_model(tokenizer, seed=9), tokenizer)
    uri = "file:///tmp/w/a.sh"
    line, char = 2, len("    echo usage")

    async def main():
        async with Session("--model", str(live)) as s:
            s.open(uri, PREFIX)
            for field, value in [("n_layer", 100000), ("context_length", 1e9), ("n_head", 0), ("d_model", "x")]:
                config = json.loads((bundle_path / "config.json").read_text())
                config["model"][field] = value
                (live / "config.json").write_text(json.dumps(config))
                await s.wait_for_message(f"model.{field}")
                assert await fresh_inline(s, uri, line, char) == expected(bundle_path)  # the old one serves
            shutil.rmtree(live)
            shutil.copytree(good, live)  # a valid one afterwards is still taken: the watcher lives on
            await s.wait_for_message("switched to the new model")
            assert await fresh_inline(s, uri, line, char) == expected(good)
    run(main())


def test_a_change_made_before_the_watch_was_set_up_is_loaded(bundle_path, tmp_path, tokenizer):
    from codellm.server.model_holder import ModelHolder

    live, other = tmp_path / "live", tmp_path / "other"
    shutil.copytree(bundle_path, live)
    save_bundle(other, make_model(tokenizer, seed=5), tokenizer)
    holder = ModelHolder(lambda message, is_error: None)
    try:
        holder.configure(str(live), "cpu", 1)
        holder._watch_stop.set()  # no watch now: as in the moment before a new watch is set up
        time.sleep(0.3)
        shutil.copy(other / "model.safetensors", live / "model.safetensors")  # no event will tell of this
        version = holder.version
        holder._watch(live)
        for _ in range(100):
            if holder.version != version:
                break
            time.sleep(0.1)
        assert holder.version == version + 1 and holder.load_error is None
    finally:
        holder.stop()


def test_hot_swap_follows_a_symlinked_model(bundle_path, tmp_path, tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(bundle_path, a)
    save_bundle(b, make_model(tokenizer, seed=7), tokenizer)
    link = tmp_path / "current"
    link.symlink_to(a)
    uri = "file:///tmp/w/a.sh"

    async def main():
        async with Session("--model", str(link)) as s:
            s.open(uri, PREFIX)
            assert await fresh_inline(s, uri, 2, 14) == expected(a)
            tmp_link = tmp_path / ".current.new"
            tmp_link.symlink_to(b)
            os.replace(tmp_link, link)  # `ln -sfn b current`, atomically
            await s.wait_for_message("switched to the new model")
            assert await fresh_inline(s, uri, 2, 14) == expected(b)
    run(main())


def test_copy_and_rename_swap_storm_has_no_false_rejections(bundle_path, tmp_path, tokenizer):
    models = tmp_path / "models"
    live = models / "live"
    shutil.copytree(bundle_path, live)
    other = tmp_path / "other"
    save_bundle(other, make_model(tokenizer, seed=3), tokenizer)
    sources = [other, bundle_path]
    uri = "file:///tmp/w/a.sh"

    async def main():
        async with Session("--model", str(live)) as s:
            s.open(uri, PREFIX)
            for i in range(20):  # 20 swaps in about 10 s: copy beside, rename the old away, rename in
                new, old = models / f"live.new{i}", models / f"live.old{i}"
                shutil.copytree(sources[i % 2], new)
                os.rename(live, old)
                os.rename(new, live)
                shutil.rmtree(old)
                await asyncio.sleep(0.5)
            final = sources[19 % 2]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if await fresh_inline(s, uri, 2, 14) == expected(final):
                    break
                await asyncio.sleep(0.5)
            assert await fresh_inline(s, uri, 2, 14) == expected(final)
            assert not [m for m in s.messages if "rejected" in m], s.messages
    run(main())


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_during_a_bundle_write_acts_once_the_bundle_is_whole(bundle_path, tmp_path, signal_name):
    """The signal comes in the middle of the write (from the weights writer); the process ends by it only
    after the new bundle has replaced the old one, and leaves no hidden folder behind."""
    target = tmp_path / "model"
    shutil.copytree(bundle_path, target)
    script = f"""
import os, signal, subprocess, sys, threading, time
import codellm.bundle as b
from codellm.bundle import load_bundle, save_bundle
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # the system may give the signal to it
write = b.save_file
def write_then_signal(*args, **kwargs):
    subprocess.run(["kill", "-{signal_name[3:]}", str(os.getpid())])  # from outside, as a user's kill is
    time.sleep(0.5)
    write(*args, **kwargs)
b.save_file = write_then_signal
bundle = load_bundle({str(bundle_path)!r})
save_bundle({str(target)!r}, bundle.model, bundle.tokenizer, {{"stages": {{"new": {{}}}}}})
print("not reached")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not reached" not in r.stdout
    from codellm.bundle import load_bundle
    assert load_bundle(target).card == {"stages": {"new": {}}}  # the new bundle, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folder left


def test_a_bundle_touched_or_copied_over_with_the_same_bytes_is_not_reloaded(bundle_path, tmp_path, tokenizer):
    live = tmp_path / "models" / "live"
    shutil.copytree(bundle_path, live)
    uri = "file:///tmp/w/a.sh"

    async def main():
        async with Session("--model", str(live)) as s:
            s.open(uri, PREFIX)
            for _ in range(3):  # what `touch`, a sync tool or `cp` of the same model does
                for name in os.listdir(live):
                    os.utime(live / name)
                await asyncio.sleep(0.7)  # past the watcher's debounce: each is a change of its own
            shutil.copytree(bundle_path, live, dirs_exist_ok=True)
            await asyncio.sleep(0.7)
            save_bundle(live, make_model(tokenizer, seed=11), tokenizer)  # a new model
            await s.wait_for_message("switched to the new model")
            await asyncio.sleep(0.7)
            assert sum("switched" in m for m in s.messages) == 1, s.messages
            assert await fresh_inline(s, uri, 2, 14) == expected(live)
    run(main())
