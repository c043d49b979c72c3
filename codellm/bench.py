"""`codellm bench`: engine speed on this machine, beside HF transformers' generate and llama.cpp on a
same-size Llama.

Reports medians of repeated runs, for each engine precision: 512-token prefill, decode ms/token (64 steps
after a cached 256-token prompt), a 16-token completion after a fresh 512-token prompt, and the same
completion after a one-token edit at the end of the prompt (what a keystroke does to an SPM prompt),
which reuses the KV cache. Without a bundle, also the prefill of 1024- and 2048-token prompts.

Beside them, in the same run (CPU only; `pip install 'codellm[bench]'`): HF transformers'
LlamaForCausalLM.generate with random weights, and llama.cpp (llama-cpp-python) reading the same prompt
and decoding, on a random-weight Llama of the same size written as a GGUF q8_0 file (gguf.GGUFWriter) to
a temporary folder, with one thread and with the engine's thread count. Both are skipped with a hint when
not installed.

`--background N` measures instead prefill, decode and completion times with the engine idle and with N busy
processes on the machine (codellm.loadgen, started and ended by the bench), side by side for 1 and 2 threads.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import time

import torch

from .bundle import Bundle, load_bundle
from .config import ModelConfig
from .device import choose_device
from .engine import PRECISIONS, Engine
from .loadgen import BackgroundLoad, described, label
from .model import GPT
from .tokenizer import Tokenizer

PROMPT_TOKENS = 512
LONG_PROMPTS = (1024, 2048)  # prefill only, with a random model of a long enough context
NEW_TOKENS = 16
DECODE_TOKENS = 64  # steady-state decode speed is timed over this many steps


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_bundle(preset: str, context_length: int) -> Bundle:
    cfg = ModelConfig.from_preset(preset, context_length=context_length)
    tok = Tokenizer.train(["echo hello world\n" * 10], vocab_size=300)  # only its special ids are used
    model = GPT(cfg)
    torch.manual_seed(0)
    for p in model.parameters():  # non-zero everywhere, like a trained model
        torch.nn.init.normal_(p, std=0.02)
    return Bundle(cfg, tok, model)


def hf_llama_generate_time(cfg: ModelConfig, prompt: torch.Tensor, repeats: int) -> float | None:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                         num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                         intermediate_size=cfg.mlp_ratio * cfg.d_model * 2 // 3,  # SwiGLU: 3 matrices, same params
                         max_position_embeddings=cfg.context_length, tie_word_embeddings=cfg.tie_embeddings)
    model = LlamaForCausalLM(hf_cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())

    def run():
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0)

    return median_time(run, max(3, repeats // 3)), n_params


LLAMACPP_HINT = ("llama.cpp not installed (pip install 'codellm[bench]'; llama-cpp-python builds from source: "
                 "cmake and a C++ compiler): comparison skipped")


def llama_ffn_size(cfg: ModelConfig) -> int:
    """SwiGLU width with the parameters of codellm's MLP, rounded to q8_0's 32-value blocks."""
    return max(32, round(cfg.mlp_ratio * cfg.d_model * 2 / 3 / 32) * 32)


def write_llama_gguf(cfg: ModelConfig, path: str) -> int:
    """Write a random-weight Llama of `cfg`'s size as GGUF with q8_0 matrices (norms float32), as
    llama.cpp's convert_hf_to_gguf.py --outtype q8_0 does; returns its parameter count. Its vocabulary
    is placeholder tokens: the bench hands llama.cpp token ids, never text."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    d, ff, v = cfg.d_model, llama_ffn_size(cfg), cfg.vocab_size
    shapes = {"token_embd.weight": (v, d)}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (v, d)
    for i in range(cfg.n_layer):
        for name, shape in (("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)), ("attn_output", (d, d)),
                            ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))):
            shapes[f"blk.{i}.{name}.weight"] = shape
        shapes[f"blk.{i}.attn_norm.weight"] = shapes[f"blk.{i}.ffn_norm.weight"] = (d,)
    shapes["output_norm.weight"] = (d,)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(-(-cfg.context_length // 256) * 256)  # llama.cpp rounds n_ctx up to 256s
    w.add_embedding_length(d)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(v)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(v)])
    w.add_token_scores([0.0] * v)
    w.add_token_types([gguf.TokenType.CONTROL if i < 4 else gguf.TokenType.NORMAL for i in range(v)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
        else:
            data = rng.normal(0, 0.02, shape).astype(np.float32)
            w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sum(math.prod(s) for s in shapes.values())


def llamacpp_runs(llm, prompt: list[int], repeats: int) -> dict:
    """Seconds: a fresh prompt read (its last token's logits and their argmax), and a decode step
    (DECODE_TOKENS + 1 single-token evals after the prompt's first half, as engine_times times them)."""
    import llama_cpp
    import numpy as np

    def next_token() -> int:  # greedy, from the logits of the last token evaluated
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

    def fresh_prefill():
        llm.reset()  # the next eval drops the KV cache from position 0 on
        llm.eval(prompt)
        return next_token()

    half = prompt[:len(prompt) // 2]

    def decode_steps():
        llm.reset()
        llm.eval(half[:-1])
        token = half[-1]
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS + 1):
            llm.eval([token])
            token = next_token()
        return time.perf_counter() - start

    prefill = median_time(fresh_prefill, repeats)
    decode_steps()  # warm-up
    decode = statistics.median(decode_steps() for _ in range(repeats)) / (DECODE_TOKENS + 1)
    return {"prefill": prefill, "decode": decode}


def llamacpp_times(cfg: ModelConfig, prompt: list[int], repeats: int, threads: tuple[int, ...] = (1,)) -> dict | None:
    """llama.cpp's prefill and decode seconds (llamacpp_runs) on a same-size random Llama in GGUF q8_0, for
    each thread count: {"runs": {threads: times}, "params", "version"}; None when llama-cpp-python or gguf
    is not installed."""
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError:
        return None
    runs = {}
    with tempfile.TemporaryDirectory(prefix="codellm-bench-") as folder:
        path = os.path.join(folder, "llama-q8_0.gguf")
        n_params = write_llama_gguf(cfg, path)
        batch = min(cfg.context_length, max(512, len(prompt)))  # the prompt in one batch
        for n in threads:
            llm = llama_cpp.Llama(model_path=path, n_ctx=cfg.context_length, n_batch=batch, n_ubatch=batch,
                                  n_threads=n, n_threads_batch=n, n_gpu_layers=0, logits_all=False, verbose=False)
            try:
                runs[n] = llamacpp_runs(llm, prompt, repeats)
            finally:
                llm.close()
    return {"runs": runs, "params": n_params, "version": llama_cpp.__version__}


def print_llamacpp_rows(result: dict, n_prompt: int, times: dict) -> None:
    print(f"  llama.cpp (llama-cpp-python {result['version']}, same-size Llama in GGUF q8_0, "
          f"{result['params'] / 1e6:.2f}M parameters), same prompt; codellm/llama.cpp time:")
    for label, key, unit in ((f"prefill {n_prompt} tokens", "prefill", "ms"),
                             (f"decode, {DECODE_TOKENS} steps", "decode", "ms/token")):
        for n, run in result["runs"].items():
            ratios = "  ".join(f"{times[p][key] / run[key]:5.2f}x ({p})" for p in PRECISIONS)
            name = f"{label}, {n} thread{'s' if n > 1 else ''}"
            print(f"    {name:40}{run[key] * 1000:10.2f} {unit:9}{ratios}")


TYPING_SCRIPT = """#!/bin/bash
# Rotate the application logs and keep a week of them.
set -euo pipefail

LOG_DIR=/var/log/app
KEEP_DAYS=7

rotate() {
    local file="$1"
    if [ -s "$file" ]; then
        mv "$file" "$file.$(date +%Y%m%d)"
        gzip -9 "$file.$(date +%Y%m%d)"
    fi
}

for log in "$LOG_DIR"/*.log; do
    rotate "$log"
done

find "$LOG_DIR" -name '*.gz' -mtime +"$KEEP_DAYS" -delete
echo "rotated logs in $LOG_DIR"
"""


def typing_comparison(engine: Engine, fmt: str) -> tuple[float, float]:
    """Type a line of a script one character at a time, completing after each keystroke (the real
    suffix after the cursor); returns (median ms per completion, share of prompt tokens reused)."""
    lines = TYPING_SCRIPT.split("\n")
    k = lines.index("for log in \"$LOG_DIR\"/*.log; do") + 1
    before, typed = "\n".join(lines[:k]) + "\n", lines[k]
    after = "\n" + "\n".join(lines[k + 1:])
    engine.cache.reset()
    times, reused, total = [], 0, 0
    for i in range(1, len(typed) + 1):
        r = engine.complete_detailed(before + typed[:i], after, "line", max_new_tokens=8, fmt=fmt, clean=False)
        times.append(r.seconds)
        reused += r.reused_tokens
        total += r.prompt_tokens
    return 1000 * statistics.median(times), reused / max(1, total)


def engine_times(engine: Engine, prompt: list[int], repeats: int) -> dict:
    """Seconds: fresh prefill, fresh 16-token completion, and the completion after a one-token edit."""
    edited = prompt[:-1] + [(prompt[-1] + 1) % engine.config.vocab_size or 4]

    def fresh_prefill():
        engine.cache.reset()
        engine.greedy_ids(prompt, 1)

    def fresh_completion():
        engine.cache.reset()
        engine.greedy_ids(prompt, NEW_TOKENS)

    def edited_completion():
        engine.greedy_ids(prompt, NEW_TOKENS)  # cache holds the prompt, as after the previous keystroke
        start = time.perf_counter()
        engine.greedy_ids(edited, NEW_TOKENS)
        return time.perf_counter() - start

    def decode_steps():  # the prompt's first half is cached: one step for its last token, then DECODE_TOKENS
        engine.greedy_ids(half, DECODE_TOKENS + 1)

    half = prompt[:len(prompt) // 2]
    prefill = median_time(fresh_prefill, repeats)
    fresh = median_time(fresh_completion, repeats)
    edited_completion()
    edit = statistics.median(edited_completion() for _ in range(repeats))
    engine.cache.reset()
    engine.greedy_ids(half, 1)
    decode = median_time(decode_steps, repeats) / (DECODE_TOKENS + 1)
    return {"prefill": prefill, "fresh": fresh, "edit": edit, "decode": decode}


def prefill_time(engine: Engine, n: int, repeats: int) -> float:
    gen = torch.Generator().manual_seed(n)
    prompt = torch.randint(4, engine.config.vocab_size, (n,), generator=gen).tolist()

    def fresh_prefill():
        engine.cache.reset()
        engine.greedy_ids(prompt, 1)

    return median_time(fresh_prefill, repeats)


def load_comparison(bundle: Bundle, device, prompt: list[int], args) -> None:
    """Idle and with args.background busy processes, for 1 and 2 threads, side by side (precision auto)."""
    keys = [("prefill", f"prefill {len(prompt)} tokens (ms)"), ("decode", "decode (ms/token)"),
            ("fresh", f"{NEW_TOKENS}-token completion, fresh (ms)"), ("edit", f"{NEW_TOKENS}-token, 1-token edit (ms)")]
    loads = (0, args.background)
    columns = [(t, n) for t in (1, 2) for n in loads]
    results = {}
    for threads in (1, 2):
        engine = Engine(bundle, device, threads=threads, precision="auto")
        for n in loads:
            with BackgroundLoad(n):
                results[threads, n] = engine_times(engine, prompt, args.repeats)
    print(f"load: idle vs {described(args.background)} (precision auto, medians of {args.repeats})")
    print(f"  {'':40}" + "".join(f"{f'{t}T ' + label(n):>14}" for t, n in columns) + "  loaded/idle 1T, 2T")
    for key, name in keys:
        ratios = "  ".join(f"{results[t, args.background][key] / results[t, 0][key]:5.2f}x" for t in (1, 2))
        print(f"  {name:40}" + "".join(f"{results[c][key] * 1000:14.2f}" for c in columns) + f"  {ratios}")


def main(args) -> None:
    device = choose_device(args.device)
    if args.model:
        bundle = load_bundle(args.model, device=device)
    else:
        bundle = random_bundle(args.preset, context_length=max(LONG_PROMPTS) + 4 * NEW_TOKENS)
    cfg = bundle.config
    n_prompt = min(PROMPT_TOKENS, cfg.context_length - NEW_TOKENS - 1)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, cfg.vocab_size, (n_prompt,), generator=gen).tolist()
    if getattr(args, "background", 0):
        load_comparison(bundle, device, prompt, args)
        return
    engines, times = {}, {}
    for precision in PRECISIONS:  # one after the other: engines of one bundle share its KV cache
        engines[precision] = engine = Engine(bundle, device, precision=precision)
        times[precision] = engine_times(engine, prompt, args.repeats)
    engine = engines["auto"]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}, torch {torch.__version__}")
    print(f"model: {'bundle ' + str(args.model) if args.model else 'preset ' + args.preset + ' (random weights)'}, "
          f"{bundle.model.num_params() / 1e6:.2f}M parameters; medians of {args.repeats} runs")
    print(f"precision auto = {'bf16' if engine.bf16_prefill else 'fp32'} prompt reading, "
          f"{'int8' if engine.decoder.int8 else 'fp32'} decode weights; fp32 = float32 throughout")
    print(f"decode steps run as: auto {engine.decoder.step_name}, fp32 {engines['fp32'].decoder.step_name}")
    print(f"  {'':44}{'auto':>10}{'fp32':>10}")
    rows = [(f"prefill {n_prompt} tokens (ms)", "prefill"), (f"decode, {DECODE_TOKENS} steps (ms/token)", "decode"),
            (f"{NEW_TOKENS}-token completion, fresh prompt (ms)", "fresh"),
            (f"{NEW_TOKENS}-token completion after a 1-token edit (ms)", "edit")]
    for label, key in rows:
        print(f"  {label:44}" + "".join(f"{times[p][key] * 1000:10.2f}" for p in PRECISIONS))
    for n in LONG_PROMPTS:
        if n + 1 <= cfg.context_length:
            ms = [prefill_time(engines[p], n, max(3, args.repeats // 3)) * 1000 for p in PRECISIONS]
            print(f"  {f'prefill {n} tokens (ms)':44}" + "".join(f"{m:10.2f}" for m in ms))
    engine = engines["auto"]
    fresh = times["auto"]["fresh"]
    print(f"  KV reuse after a 1-token edit: {fresh / times['auto']['edit']:.1f}x faster than a fresh prompt")
    if args.model:
        for fmt in ("spm", "psm"):
            engine.cache.reset()
            ms, reuse = typing_comparison(engine, fmt)
            print(f"  typing a line, 8-token completion per keystroke, {fmt.upper()} prompts: median {ms:6.1f} ms, "
                  f"KV reuse {reuse:.0%}")
    if device.type == "cpu":
        comparisons(args, cfg, prompt, times, engine.threads)


def comparisons(args, cfg: ModelConfig, prompt: list[int], times: dict, threads: int) -> None:
    """HF transformers' and llama.cpp's rows, beside the engine's `times` of the same run."""
    fresh = times["auto"]["fresh"]
    if not args.no_hf:
        result = hf_llama_generate_time(cfg, torch.tensor([prompt]), args.repeats)
        if result is None:
            print("  HF transformers not installed (pip install 'codellm[bench]'): comparison skipped")
        else:
            hf_time, hf_params = result
            print(f"  HF LlamaForCausalLM.generate ({hf_params / 1e6:.2f}M parameters), same prompt and "
                  f"{NEW_TOKENS} tokens: {hf_time * 1000:8.1f} ms  -> codellm is {hf_time / fresh:.1f}x faster "
                  f"(auto), {hf_time / times['fp32']['fresh']:.1f}x (fp32)")
    if not getattr(args, "no_llamacpp", False):
        # the engine's thread count, and one thread: a team of threads that wait for cores other processes
        # hold is slower than one (codellm.threads; the engine's decode step and, on a loaded machine, its
        # prompt reading run with one)
        result = llamacpp_times(cfg, prompt, args.repeats, threads=tuple(sorted({1, threads})))
        if result is None:
            print(f"  {LLAMACPP_HINT}")
        else:
            print_llamacpp_rows(result, len(prompt), times)
