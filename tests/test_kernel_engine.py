"""The engine without torch: folds a bundle into its start file with NumPy as the torch engine folds it,
answers from it as the torch engine does, and refuses every start file that is not its bundle's (or is
damaged) rather than reading past it."""
import json
import os
import subprocess
import sys

import pytest

from codellm import kernel
from codellm.bundle_files import bundle_digest
from codellm.engine import Engine
from codellm.bundle import load_bundle
from codellm.kernel_engine import START_FILES_KEPT, KernelEngine, start_file

from conftest import make_model

pytestmark = pytest.mark.skipif(not kernel.available(), reason="no C decode step here (not built, or no AVX2)")

SHORT = ["for f in *.txt; do\n\tech", "#!/bin/bash\nset -e\n", "if [ -z \"$1\" ]; then\n"]
LONG = "#!/bin/bash\n# back up the logs\n" + "cp /var/log/app$i.log /backup/\n" * 6 + "tar -czf "


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def engine(bundle_path, cache_home):
    return Engine(load_bundle(bundle_path), "cpu", 1, "auto")


def start_tensors(engine) -> dict:
    """What the torch engine's C step reads, by the start file's names."""
    step = engine.decoder.c_step
    tensors = {"embed": step.embed}
    for i, (weight, scale) in enumerate(step.matrices):
        tensors[f"matrix.{i}.weight"], tensors[f"matrix.{i}.scale"] = weight, scale
    tensors.update({f"rotary.{i}": table for i, table in enumerate(step.rotary)})
    return {name: t.numpy() for name, t in tensors.items()}


@pytest.mark.parametrize("storage,overrides", [("float16", {}), ("float32", {"tie_embeddings": False}),
                                               ("bfloat16", {"qk_norm": False}), ("int8", {})])
def test_the_first_open_folds_the_start_file_as_the_torch_engine_folds_the_weights(tmp_path, tokenizer, cache_home,
                                                                                  storage, overrides):
    import numpy as np
    from safetensors.numpy import load_file

    from codellm.bundle import save_bundle

    path = tmp_path / "bundle"
    save_bundle(path, make_model(tokenizer, seed=3, **overrides), tokenizer, storage_dtype=storage)
    assert not start_file(bundle_digest(path)).exists()
    quick = KernelEngine.open(path)
    assert quick is not None and start_file(bundle_digest(path)).is_file() and "without torch" in quick.step_name
    engine = Engine(load_bundle(path), "cpu", 1, "auto")
    assert quick.digest == engine.digest and quick.num_params() == engine.num_params()
    folded, want = load_file(start_file(quick.digest)), start_tensors(engine)
    assert folded.keys() == want.keys()
    for name, tensor in want.items():
        assert folded[name].dtype == tensor.dtype and folded[name].shape == tensor.shape, name
        if name.startswith("rotary"):  # cos and sin rounded from float64 here, torch's own float32 ones there
            np.testing.assert_allclose(folded[name], tensor, rtol=0, atol=4e-7 * max(1.0, np.abs(tensor).max()))
        else:  # the same float32 operations: the same int8 weights and scales
            np.testing.assert_array_equal(folded[name], tensor, err_msg=name)


def rewrite_weights(path, change) -> None:
    """Rewrite model.safetensors of the bundle at `path` with its header changed by `change(header)`."""
    data = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = change(header, data[8 + n:])
    text = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + body)


def overlap(header, body):
    """blocks.0.attn.proj.weight read from where blocks.0.attn.qkv.weight begins."""
    begin, end = header["blocks.0.attn.proj.weight"]["data_offsets"]
    at = header["blocks.0.attn.qkv.weight"]["data_offsets"][0]
    header["blocks.0.attn.proj.weight"]["data_offsets"] = [at, at + end - begin]
    return body


@pytest.mark.parametrize("damage", [
    lambda h, b: b + bytes(64),  # bytes after the data
    lambda h, b: (h.update({"extra": {"dtype": "F16", "shape": [1], "data_offsets": [len(b), len(b) + 2]}}), b + bytes(2))[1],
    overlap,
    lambda h, b: (h["norm.weight"].update(shape=[float(h["norm.weight"]["shape"][0])]), b)[1],  # a float size
    lambda h, b: (h["norm.weight"].update(shape=h["norm.weight"]["shape"][0]), b)[1],  # not a list
    lambda h, b: (h["norm.weight"].update(dtype=["F16"]), b)[1],
    lambda h, b: (h.update({"__metadata__": [1, 2]}), b)[1],
    lambda h, b: (h["norm.weight"].update(x=float("nan")), b)[1],  # `NaN` is not JSON
])
def test_a_bundle_the_torch_engine_refuses_is_not_served_without_it(tmp_path, tokenizer, cache_home, damage):
    from codellm.bundle import BundleError, save_bundle

    path = tmp_path / "bundle"
    save_bundle(path, make_model(tokenizer), tokenizer)
    rewrite_weights(path, damage)
    with pytest.raises(BundleError):  # a clear error, never a traceback of another kind
        load_bundle(path)
    assert KernelEngine.open(path) is None and not start_file(bundle_digest(path)).exists()


def test_a_config_that_disagrees_with_the_weights_or_a_corrupt_card_is_refused_by_both(tmp_path, tokenizer, cache_home):
    from codellm.bundle import BundleError, save_bundle

    path = tmp_path / "bundle"
    save_bundle(path, make_model(tokenizer), tokenizer)
    config = json.loads((path / "config.json").read_text())
    for change in ({"n_layer": 1}, {"qk_norm": False}):
        (path / "config.json").write_text(json.dumps({**config, "model": {**config["model"], **change}}))
        with pytest.raises(BundleError, match="do not match config.json"):
            load_bundle(path)
        assert KernelEngine.open(path) is None
    (path / "config.json").write_text(json.dumps(config))
    (path / "data.msgpack").write_bytes(b"\xc1")
    with pytest.raises(BundleError, match="corrupt data card"):
        load_bundle(path)
    assert KernelEngine.open(path) is None


def test_a_folder_in_place_of_a_file_gaps_in_token_ids_or_a_card_of_a_million_maps_are_refused(tmp_path, tokenizer,
                                                                                             cache_home):
    import msgpack

    from codellm.bundle import BundleError, save_bundle

    path = tmp_path / "bundle"
    save_bundle(path, make_model(tokenizer), tokenizer)
    card = (path / "data.msgpack").read_bytes()
    (path / "data.msgpack").write_bytes(msgpack.packb([{}] * (2 << 20)))
    with pytest.raises(BundleError, match="corrupt data card"):
        load_bundle(path)
    assert KernelEngine.open(path) is None
    (path / "data.msgpack").write_bytes(card)
    config = (path / "config.json").read_bytes()
    (path / "config.json").unlink()
    (path / "config.json").mkdir()
    with pytest.raises(BundleError, match="config.json: not a regular file"):
        load_bundle(path)
    assert KernelEngine.open(path) is None
    (path / "config.json").rmdir()
    (path / "config.json").write_bytes(config)
    tok = json.loads((path / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    last = max(vocab, key=vocab.get)
    vocab[last] = 10 * len(vocab)  # as many tokens, one of them past the model's vocabulary
    (path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(BundleError, match="past vocab_size"):
        load_bundle(path)
    assert KernelEngine.open(path) is None


def test_a_bundle_file_that_is_a_fifo_is_refused_without_waiting(tmp_path, tokenizer, cache_home):
    from codellm.bundle import save_bundle

    path = tmp_path / "bundle"
    save_bundle(path, make_model(tokenizer), tokenizer)
    (path / "model.safetensors").unlink()
    os.mkfifo(path / "model.safetensors")  # nothing ever writes to it: a blocking read would never end
    assert KernelEngine.open(path) is None


def test_the_weights_a_bundle_holds_are_the_models_state(tokenizer):
    from codellm.bundle_files import expected_weights

    for overrides in ({}, {"tie_embeddings": False}, {"qk_norm": False}):
        model = make_model(tokenizer, **overrides)
        state = {k: tuple(v.shape) for k, v in model.state_dict().items()
                 if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
        assert expected_weights(model.cfg) == state


def test_a_bundle_that_cannot_be_folded_is_left_to_the_torch_engine(tmp_path, tokenizer, cache_home):
    import torch

    from codellm.bundle import BundleError, save_bundle

    model = make_model(tokenizer)
    with torch.no_grad():
        model.blocks[0].mlp.up.weight[3, 5] = float("nan")
    path = tmp_path / "nan"
    save_bundle(path, model, tokenizer)
    assert KernelEngine.open(path) is None and not start_file(bundle_digest(path)).exists()
    with pytest.raises(BundleError, match="not finite|non-finite|NaN"):
        load_bundle(path)  # the torch engine says what is wrong


def test_it_answers_what_the_torch_engine_answers(bundle_path, engine):
    quick = KernelEngine.open(bundle_path)
    for prefix in SHORT:  # prompts read by decode steps alone: the same computation, the same numbers
        ids = engine.tokenizer.encode(prefix)
        with engine.reading():
            want = engine.prefill(ids)[0].tolist()
        assert quick.prefill(ids)[0] == pytest.approx(want, abs=1e-5)
        for mode in ("line", "block"):
            a = engine.complete_detailed(prefix, "\nfi\n", mode, clean=False)
            b = quick.complete_detailed(prefix, "\nfi\n", mode, clean=False)
            assert (b.text, b.stop_reason) == (a.text, a.stop_reason)
            assert [p for *_, p in b.token_probs] == pytest.approx([p for *_, p in a.token_probs], rel=1e-4)
    # a long prompt is read 16 tokens a call here, by bf16 matrices there where the CPU has them
    ids = engine.tokenizer.encode(LONG)
    with engine.reading():
        want = engine.prefill(ids)[0]
    got = quick.prefill(ids)[0]
    assert max(abs(x - y) for x, y in zip(got, want.tolist())) < 0.05 * float(want.abs().max())
    assert quick.prefill(ids)[1] == len(ids) - 1  # asked again: all but the last token come from the cache


def test_another_bundles_or_a_damaged_start_file_is_folded_again(bundle_path, engine, tmp_path, tokenizer):
    from codellm.bundle import save_bundle

    assert KernelEngine.open(bundle_path) is not None
    path = start_file(engine.digest)
    data = path.read_bytes()
    other = tmp_path / "other"
    save_bundle(other, make_model(tokenizer, seed=1), tokenizer)
    os.link(path, start_file(bundle_digest(other)))  # another bundle's name on this bundle's start file
    quick = KernelEngine.open(other)
    assert quick is not None and quick.digest == bundle_digest(other) != engine.digest
    assert os.stat(start_file(quick.digest)).st_ino != os.stat(path).st_ino  # its own start file now
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    entry = header["embed"]
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 4096]  # past its bytes
    bad_header = json.dumps(header).encode()
    not_a_dict = b"[1, 2]"
    for damaged in (data[:len(data) // 2], data[:5], b"", len(bad_header).to_bytes(8, "little") + bad_header + data[8 + n:],
                    (1 << 40).to_bytes(8, "little") + data[8:], len(not_a_dict).to_bytes(8, "little") + not_a_dict,
                    b"\x10" + bytes(7) + b"[" * 16):
        path.write_bytes(damaged)
        assert KernelEngine.open(bundle_path) is not None  # the damaged file refused, the bundle folded again
        assert len(path.read_bytes()) == len(data)


def test_a_damaged_start_file_that_cannot_be_deleted_or_written_is_folded_for_this_start(bundle_path, engine,
                                                                                      monkeypatch):
    from pathlib import Path

    assert KernelEngine.open(bundle_path) is not None
    path = start_file(engine.digest)
    path.write_bytes(b"")

    def read_only(*_, **__):  # as a cache on a read-only file system answers
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(os, "replace", read_only)
    quick = KernelEngine.open(bundle_path)  # no exception, and no wait for torch
    assert quick is not None and quick.digest == engine.digest and path.read_bytes() == b""


def test_start_files_of_old_bundles_go_and_an_unwritable_cache_costs_nothing(bundle_path, engine, cache_home, monkeypatch,
                                                                           tmp_path):
    folder = start_file("x").parent
    folder.mkdir(parents=True)
    for i in range(START_FILES_KEPT + 2):
        (folder / f"{i:032x}.safetensors").write_bytes(b"old")
        os.utime(folder / f"{i:032x}.safetensors", (i, i))
    assert KernelEngine.open(bundle_path) is not None
    path = start_file(engine.digest)
    kept = sorted(p.name for p in folder.iterdir())
    assert len(kept) == START_FILES_KEPT and path.name in kept and f"{START_FILES_KEPT + 1:032x}.safetensors" in kept
    path.unlink()
    import codellm.fold

    monkeypatch.setattr(codellm.fold, "fold", lambda *_: (_ for _ in ()).throw(ImportError("numpy")))
    assert KernelEngine.open(bundle_path) is None and not any(folder.glob(".*.tmp"))  # a library missing: torch
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))  # no cache folder can be made there
    assert KernelEngine.open(bundle_path) is not None and (tmp_path / "a-file").read_text() == "not a folder"


def test_only_start_files_are_pruned_from_the_start_folder(bundle_path, cache_home, tmp_path):
    mine = tmp_path / "my-models"  # the start folder a link to a folder of the person's own files
    mine.mkdir()
    for i in range(START_FILES_KEPT + 2):
        for name in (f"my-model-{i}.safetensors", f"{i:032x}.vacation.safetensors", f".{i:032x}.safetensors.bak.tmp"):
            (mine / name).write_bytes(b"weights")
            os.utime(mine / name, (i, i))
    start_file("x").parent.parent.mkdir(parents=True)
    start_file("x").parent.symlink_to(mine)
    assert KernelEngine.open(bundle_path) is not None
    assert len(list(mine.iterdir())) == 3 * (START_FILES_KEPT + 2) + 1  # theirs, and the start file


def test_it_folds_imports_and_answers_without_torch(bundle_path, engine, cache_home):
    assert not start_file(engine.digest).exists()  # written by the process below, without torch
    code = ("import sys\nfrom codellm.kernel_engine import KernelEngine\n"
            f"e = KernelEngine.open({str(bundle_path)!r})\n"
            "print(repr(e.complete('for f in *.txt; do\\n\\tech', '\\ndone\\n')), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XDG_CACHE_HOME": str(cache_home)}, check=True).stdout
    text = engine.complete("for f in *.txt; do\n\tech", "\ndone\n")
    assert start_file(engine.digest).is_file()
    assert out.split() == [repr(text), "False"] or out.strip() == f"{text!r} False"


def test_the_cold_start_bench_writes_the_start_file_then_starts_from_it(bundle_path, cache_home):
    out = subprocess.run([sys.executable, "-m", "codellm.server.coldstart", "--model", str(bundle_path), "--runs", "2"],
                         capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "XDG_CACHE_HOME": str(cache_home)}).stdout
    runs = [line for line in out.splitlines() if "first suggestion" in line and line.startswith("  ")]
    assert len(runs) == 2 and "(no start file yet; C step without torch;" in runs[0]
    assert "(start file there; C step without torch;" in runs[1]
    assert "median of 1 with no start file yet" in out and "median of 1 with the start file there" in out


def test_the_cold_start_bench_refuses_no_runs_and_a_start_with_no_model(tmp_path, cache_home):
    bench = [sys.executable, "-m", "codellm.server.coldstart"]
    none = subprocess.run([*bench, "--runs", "0"], capture_output=True, text=True, timeout=60)
    assert none.returncode == 2 and "--runs" in none.stderr
    missing = subprocess.run([*bench, "--runs", "1", "--model", str(tmp_path / "nothing")], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "XDG_CACHE_HOME": str(cache_home)})
    assert missing.returncode == 1 and "loaded no model" in missing.stderr and "first suggestion" not in missing.stdout
    broken = subprocess.run([*bench, "--runs", "1", "--model", str(tmp_path / "nothing")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "CODELLM_THREADS": "many"})
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr
    assert "coldstart: codellm-serve did not start" in broken.stderr and "CODELLM_THREADS='many'" in broken.stderr


def test_a_torch_engine_that_failed_to_load_is_loaded_by_the_next_reload(bundle_path, engine, monkeypatch):
    from concurrent.futures import Future

    from codellm.engine import Engine as TorchEngine
    from codellm.server.model_holder import EarlyLoad, ModelHolder

    early = EarlyLoad(str(bundle_path), None, None, "auto")
    monkeypatch.setattr(early, "load_torch_engine", lambda done, answered: None)  # the test plays its part
    holder = ModelHolder(lambda message, is_error: None, early)
    try:
        holder.configure(str(bundle_path), None, None)
        started = holder.engine
        assert isinstance(started, KernelEngine) and holder.started is started
        failed = Future()
        failed.set_exception(ValueError("the folder was half-way through a swap"))
        holder._upgrade(started, failed)
        assert holder.engine is started  # it keeps serving ...
        holder.load_error = "a rejected swap's error"
        holder.stamp = None  # the folder changed on disk (the watcher calls reload), with the same files
        assert holder.reload()  # ... until the next reload, which loads torch even for the same files
        assert isinstance(holder.engine, TorchEngine) and holder.started is None and holder.load_error is None
    finally:
        holder.stop()


def test_the_torch_engine_is_handed_over_off_the_model_thread(bundle_path, engine):
    """A reload holds the holder's lock while it waits for the model thread: the hand-over, which takes
    that lock, must not run on the model thread."""
    import threading

    from codellm.server.model_holder import EarlyLoad

    early = EarlyLoad(str(bundle_path), None, None, "auto")
    assert early.future.result()[2] is None  # the engine without torch came first
    handed = []
    answered = threading.Event()
    answered.set()
    early.load_torch_engine(lambda future: handed.append((threading.current_thread().name, future.result())), answered)
    for _ in range(600):
        if handed:
            break
        threading.Event().wait(0.1)
    name, (bundle, torch_engine) = handed[0]
    assert not name.startswith("codellm-model") and bundle is not None and torch_engine.digest == engine.digest
    early.executor.shutdown()


def test_the_command_line_writes_the_start_file_and_answers_without_torch(bundle_path, cache_home, tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/bash\nfor f in *.txt; do\n\tech\ndone\n")
    # the command as a user runs it, with a check at exit of whether torch was imported
    probe = ("import sys; from codellm.cli import main; rc = main(sys.argv[1:]); "
             "print('torch imported:', 'torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    args = [sys.executable, "-c", probe, "complete", f"{script}:3:5", "--model", str(bundle_path), "-v"]
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "torch imported: False" in first.stderr and start_file(bundle_digest(bundle_path)).is_file()
    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "torch imported: False" in second.stderr and "without torch" in second.stderr
    assert second.stdout == first.stdout


def test_a_prompt_read_by_the_c_step_stops_between_calls(bundle_path, engine):
    quick = KernelEngine.open(bundle_path)
    ids = engine.tokenizer.encode(LONG)
    assert len(ids) > 2 * kernel.MAX_TOKENS
    assert quick.prefill(ids, should_stop=lambda: True) == (None, 0)
    assert quick.cache.position == kernel.MAX_TOKENS  # the first call's tokens are kept for the next prompt
    assert quick.prefill(ids)[1] == kernel.MAX_TOKENS


def tampered_bundle(path, tokenizer, storage_dtype: str, tamper) -> None:
    """A bundle at `path` whose weights `tamper(state)` changed after it was written."""
    from safetensors.torch import load_file, save_file

    from codellm.bundle import save_bundle

    save_bundle(path, make_model(tokenizer), tokenizer, storage_dtype=storage_dtype)
    state = load_file(path / "model.safetensors")
    tamper(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def assert_refused_by_both_loaders_without_warnings(path, match: str) -> None:
    import warnings

    from codellm.bundle import BundleError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert KernelEngine.open(path) is None
    assert [str(w.message) for w in caught] == []
    with pytest.raises(BundleError, match=match):
        load_bundle(path)


def test_an_int8_scale_that_overflows_is_refused_without_numpy_warnings(tmp_path, tokenizer, cache_home):
    def overflow(state):
        state["blocks.0.mlp.up.weight.scale"][0] = 3e38  # finite itself, infinite once times 127

    tampered_bundle(tmp_path / "huge", tokenizer, "int8", overflow)
    assert_refused_by_both_loaders_without_warnings(tmp_path / "huge", "NaN or infinite")


@pytest.mark.parametrize("scale, entry, fault", [(0.0, None, "row scale of 0"), (-0.02, None, "row scale of -0.02"),
                                                  (1e-30, None, "row scale of 1e-30"), (None, -128, "-128")])
def test_an_int8_matrix_the_writer_never_makes_is_refused_by_both_loaders(tmp_path, tokenizer, cache_home,
                                                                           scale, entry, fault):
    """A zero, negative or vanishing row scale, or a -128 entry, would load as another model: refused."""
    def odd(state):
        if scale is not None:
            state["blocks.0.attn.qkv.weight.scale"][3] = scale
        else:
            state["blocks.0.attn.qkv.weight"][3, 0] = entry

    tampered_bundle(tmp_path / "odd", tokenizer, "int8", odd)
    assert_refused_by_both_loaders_without_warnings(tmp_path / "odd", f"blocks.0.attn.qkv.weight .*{fault}")


def test_a_float64_weight_beyond_float32_is_refused_without_numpy_warnings(tmp_path, tokenizer, cache_home):
    import torch

    def widen(state):
        state["blocks.0.mlp.up.weight"] = state["blocks.0.mlp.up.weight"].to(torch.float64)
        state["blocks.0.mlp.up.weight"][0, 0] = 1e300

    tampered_bundle(tmp_path / "wide", tokenizer, "float32", widen)
    assert_refused_by_both_loaders_without_warnings(tmp_path / "wide", "NaN or infinite")


def test_prefill_of_no_tokens_is_a_clear_error_without_torch_too(bundle_path, cache_home):
    quick = KernelEngine.open(bundle_path)
    with pytest.raises(ValueError, match="at least one token"):
        quick.prefill([])
