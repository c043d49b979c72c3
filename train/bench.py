"""`codellm-train bench`: training tokens/s per preset, beside a plain PyTorch loop over HF transformers'
LlamaForCausalLM of the same size, batch and sequence length, in the same run (medians of steps)."""
from __future__ import annotations

import platform

import torch

from codellm.bench import median_time
from codellm.config import ModelConfig
from codellm.model import GPT

from .loop import TrainConfig, autocast, loss_fn, make_optimizer, use_bf16


def tokens_per_second(step, tokens: int, steps: int) -> float:
    return tokens / median_time(step, steps)


def ours(cfg: ModelConfig, batch: int, precision: str, steps: int, compile: bool = False) -> float:
    model = GPT(cfg).train()
    opt = make_optimizer(model, TrainConfig())
    forward = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length))
    device = torch.device("cpu")

    def step():
        with autocast(device, precision):
            loss = loss_fn(forward(x), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if compile:
        step()  # compiling happens on the first call; not timed
    return tokens_per_second(step, batch * cfg.context_length, steps)


def hf_llama(cfg: ModelConfig, batch: int, precision: str, steps: int) -> tuple[float, int] | None:
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
    device = torch.device("cpu")

    def step():
        with autocast(device, precision):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return tokens_per_second(step, batch * cfg.context_length, steps), sum(p.numel() for p in model.parameters())


def main(args) -> None:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    precisions = ["fp32"] + (["bf16"] if use_bf16(cpu, "auto") else [])
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"batch {args.batch_size} x {args.context_length} tokens; medians of {args.steps} steps")
    print(f"{'preset':8s} {'params':>8s} {'precision':>9s} {'codellm tok/s':>14s} {'HF Llama tok/s':>15s} {'ratio':>6s}")
    for preset in args.presets.split(","):
        cfg = ModelConfig.from_preset(preset, context_length=args.context_length)
        for precision in precisions:
            mine = ours(cfg, args.batch_size, precision, args.steps)
            hf = hf_llama(cfg, args.batch_size, precision, args.steps)
            hf_text = f"{hf[0]:15,.0f}" if hf else f"{'not installed':>15s}"
            ratio = f"{mine / hf[0]:5.2f}x" if hf else ""
            print(f"{preset:8s} {cfg.num_params() / 1e6:7.2f}M {precision:>9s} {mine:14,.0f} {hf_text} {ratio:>6s}",
                  flush=True)
            if args.compile:
                compiled = ours(cfg, args.batch_size, precision, args.steps, compile=True)
                ratio = f"{compiled / hf[0]:5.2f}x" if hf else ""
                print(f"{preset + '+compile':16s} {precision:>9s} {compiled:14,.0f} {hf_text} {ratio:>6s}", flush=True)
