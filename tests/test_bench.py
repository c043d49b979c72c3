"""`codellm bench`'s llama.cpp row: llama-cpp-python reads the prompt and decodes on a same-size random
Llama written as GGUF q8_0, in the same run as the engine. Needs the bench extra (pip install
'codellm[bench]'); without it the row is a one-line hint."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import pytest

from codellm import bench
from codellm.config import ModelConfig
from codellm.device import physical_cores


def bench_args(**overrides) -> argparse.Namespace:
    args = dict(model=None, preset="test", repeats=1, no_hf=True, no_llamacpp=False, background=0, device="cpu")
    return argparse.Namespace(**{**args, **overrides})


def test_without_llama_cpp_the_row_is_a_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    cfg = ModelConfig.from_preset("test", vocab_size=300)
    assert bench.llamacpp_times(cfg, list(range(4, 40)), repeats=1) is None
    times = {p: {"fresh": 0.01} for p in ("auto", "fp32")}
    bench.comparisons(bench_args(), cfg, list(range(4, 40)), times, threads=1)
    assert "llama.cpp not installed (pip install 'codellm[bench]'" in capsys.readouterr().out


def test_the_llama_has_the_engine_models_size():
    cfg = ModelConfig.from_preset("nano")
    swiglu = 3 * bench.llama_ffn_size(cfg) * cfg.d_model
    assert bench.llama_ffn_size(cfg) % 32 == 0  # q8_0 blocks
    assert abs(swiglu - 2 * cfg.mlp_ratio * cfg.d_model ** 2) / swiglu < 0.02


@pytest.fixture
def llama_cpp():
    pytest.importorskip("gguf", reason="gguf is not installed (pip install 'codellm[bench]')")
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'codellm[bench]')")


def test_llama_cpp_reads_the_prompt_and_decodes(llama_cpp, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = ModelConfig.from_preset("test", vocab_size=300, context_length=128)
    result = bench.llamacpp_times(cfg, list(range(4, 68)), repeats=2, threads=(1, 2))
    assert sorted(result["runs"]) == [1, 2]
    for run in result["runs"].values():
        assert run["prefill"] > 0 and run["decode"] > 0
        assert run["decode"] < run["prefill"]  # one token against 64
    d, ff = cfg.d_model, bench.llama_ffn_size(cfg)
    assert result["params"] == cfg.vocab_size * d + cfg.n_layer * (4 * d * d + 3 * d * ff + 2 * d) + d
    assert result["version"] == llama_cpp.__version__
    assert list(tmp_path.iterdir()) == []  # the GGUF file is gone


def test_bench_prints_the_llama_cpp_row_beside_the_engine(llama_cpp, capsys):
    bench.main(bench_args())
    out = capsys.readouterr().out
    rows = out[out.index("llama.cpp (llama-cpp-python"):].splitlines()
    assert "GGUF q8_0" in rows[0] and "codellm/llama.cpp" in rows[0]
    threads = sorted({1, int(os.environ.get("CODELLM_THREADS", 0)) or physical_cores()})  # the engine's, and 1
    lines = rows[1:1 + 2 * len(threads)]
    for line, (step, n) in zip(lines, [(step, n) for step in ("prefill", "decode") for n in threads]):
        assert line.strip().startswith(step) and f", {n} thread" in line, line
        unit = " ms " if step == "prefill" else " ms/token "
        numbers = [float(w.rstrip("x")) for w in line.split() if w.rstrip("x").replace(".", "", 1).isdigit()]
        assert unit in line and len(numbers) == 5 and all(x > 0 for x in numbers[-3:]), line


def test_no_llamacpp_skips_the_row(capsys):
    args = bench_args(no_llamacpp=True)
    times = {p: {"fresh": 0.01} for p in ("auto", "fp32")}
    bench.comparisons(args, ModelConfig.from_preset("test"), list(range(4, 40)), times, threads=1)
    assert "llama.cpp" not in capsys.readouterr().out
