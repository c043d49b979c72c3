"""`codellm-train bench`: training tokens/s per preset, beside a plain PyTorch loop over HF transformers'
LlamaForCausalLM of the same size, batch and sequence length, in the same run. The two models' steps
alternate (ours, theirs, ours, ...) so that a busy machine slows both alike; medians of the steps."""
from __future__ import annotations

import platform
import statistics
import time

import torch

from codellm.config import ModelConfig
from codellm.model import GPT

from .loop import TrainConfig, autocast, make_optimizer, use_bf16
from .loss import next_token_loss

CPU = torch.device("cpu")


def our_step(cfg: ModelConfig, batch: int, precision: str, compile: bool = False):
    model = GPT(cfg).train()
    opt = make_optimizer(model, TrainConfig())
    forward = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length))

    def step():
        with autocast(CPU, precision):
            loss = next_token_loss(model, x, x, forward=forward)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_llama_step(cfg: ModelConfig, batch: int, precision: str):
    """None when transformers is not installed; else (step, parameter count)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        intermediate_size=cfg.mlp_ratio * cfg.d_model * 2 // 3, max_position_embeddings=cfg.context_length,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length))

    def step():
        with autocast(CPU, precision):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def alternating_medians(steps: list, repeats: int) -> list[float]:
    """Median seconds per call of each function, calling them in turn `repeats` times after a warm-up."""
    for step in steps:
        step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main(args) -> None:
    torch.manual_seed(0)
    precisions = ["fp32"] + (["bf16"] if use_bf16(CPU, "auto") else [])
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"batch {args.batch_size} x {args.context_length} tokens; medians of {args.steps} alternating steps")
    print(f"{'preset':16s} {'params':>8s} {'precision':>9s} {'codellm tok/s':>14s} {'HF Llama tok/s':>15s} "
          f"{'ratio':>6s}")
    for preset in args.presets.split(","):
        cfg = ModelConfig.from_preset(preset, context_length=args.context_length)
        tokens = args.batch_size * cfg.context_length
        for precision in precisions:
            variants = [("", our_step(cfg, args.batch_size, precision))]
            if args.compile:  # compiling happens in the warm-up call, which is not timed
                variants.append(("+compile", our_step(cfg, args.batch_size, precision, compile=True)))
            hf = hf_llama_step(cfg, args.batch_size, precision)
            steps = [step for _, step in variants] + ([hf[0]] if hf else [])
            seconds = alternating_medians(steps, args.steps)
            hf_rate = tokens / seconds[-1] if hf else None
            hf_text = f"{hf_rate:15,.0f}" if hf else f"{'not installed':>15s}"
            for (suffix, _), secs in zip(variants, seconds):
                rate = tokens / secs
                ratio = f"{rate / hf_rate:5.2f}x" if hf else ""
                print(f"{preset + suffix:16s} {cfg.num_params() / 1e6:7.2f}M {precision:>9s} {rate:14,.0f} "
                      f"{hf_text} {ratio:>6s}", flush=True)
