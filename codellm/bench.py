"""`codellm bench`: engine speed on this machine, beside HF transformers' generate on a same-size Llama.

Reports medians of repeated runs, for each engine precision: 512-token prefill, decode ms/token (64 steps
after a cached 256-token prompt), a 16-token completion after a fresh 512-token prompt, and the same
completion after a one-token edit at the end of the prompt (what a keystroke does to an SPM prompt),
which reuses the KV cache. Without a bundle, also the prefill of 1024- and 2048-token prompts.

`--background N` measures again with N busy processes on the machine (codellm.loadgen), started and
ended by the bench, and shows idle and loaded figures side by side for 1 and 2 threads.
"""
from __future__ import annotations

import platform
import statistics
import time

import torch

from .bundle import Bundle, load_bundle
from .config import ModelConfig
from .device import choose_device
from .engine import PRECISIONS, Engine
from .loadgen import BackgroundLoad, label
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
    print(f"load: idle vs {args.background} busy background processes (precision auto, medians of {args.repeats})")
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
    if not args.no_hf and device.type == "cpu":
        result = hf_llama_generate_time(cfg, torch.tensor([prompt]), args.repeats)
        if result is None:
            print("  HF transformers not installed (pip install 'codellm[bench]'): comparison skipped")
        else:
            hf_time, hf_params = result
            print(f"  HF LlamaForCausalLM.generate ({hf_params / 1e6:.2f}M parameters), same prompt and "
                  f"{NEW_TOKENS} tokens: {hf_time * 1000:8.1f} ms  -> codellm is {hf_time / fresh:.1f}x faster "
                  f"(auto), {hf_time / times['fp32']['fresh']:.1f}x (fp32)")
