"""The training loop: get batch, forward, backward, clip, step, log, checkpoint. One loop for both stages.

Runs alone or under `torchrun` (DDP: gloo on CPU, nccl on CUDA); rank 0 alone writes files.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from codellm.device import cpu_has_bf16
from codellm.model import GPT
from codellm.tokenizer import Tokenizer

from .checkpoint import load_checkpoint, read_checkpoint_state, save_checkpoint
from .data import IGNORE, Mixture, build_epoch
from .loss import next_token_loss


@dataclass
class TrainConfig:
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    batch_size: int = 16  # sequences per optimizer step, over all processes
    grad_accum: int = 1
    warmup_steps: int = 50
    warmdown_frac: float = 0.3  # the last share of steps decays linearly to min_lr
    grad_clip: float = 1.0
    max_steps: int | None = None
    num_epochs: float | None = None
    time_budget: float | None = None  # seconds of training; the schedule follows elapsed time
    eval_every: int = 200
    eval_windows: int = 64
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 1337
    compile: str = "off"  # on | off | auto: on for time budgets of COMPILE_AUTO_MIN_SECONDS or more
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with bf16 hardware, else fp32; or fp32, bf16
    stop_after: int | None = None  # stop (as if killed) after this step; for tests of resume

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StageResult:
    steps: int
    tokens: int
    seconds: float
    train_loss: float
    val_loss: float | None
    history: list = field(default_factory=list)


COMPILE_AUTO_MIN_SECONDS = 600


def compile_wanted(cfg: TrainConfig) -> bool:
    if cfg.compile == "auto":
        return bool(cfg.time_budget and cfg.time_budget >= COMPILE_AUTO_MIN_SECONDS)
    return cfg.compile in ("on", True)


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank() if world > 1 else 0), world


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, constant, then a linear warmdown over the last share of progress."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    start = 1 - cfg.warmdown_frac
    frac = min(1.0, max(0.0, (progress - start) / max(cfg.warmdown_frac, 1e-9)))
    return cfg.learning_rate * (1 - frac * (1 - cfg.min_lr_ratio))


def progress_of(state: dict, cfg: TrainConfig) -> float:
    """How far the run is, 0..1: by steps, by seconds spent against the time budget, whichever is further."""
    by_steps = state["step"] / state["max_steps"] if state["max_steps"] else 0.0
    by_time = state["elapsed"] / cfg.time_budget if cfg.time_budget else 0.0
    return max(by_steps, by_time)


def make_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, fused=fused or None)


@torch.no_grad()
def evaluate_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 8,
                  precision: str = "auto") -> tuple[float, int]:
    """Mean loss per target token over the given windows; also returns the token count."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch):
        x, y = inputs[i:i + batch].to(device), targets[i:i + batch].to(device)
        with autocast(device, precision):
            total += float(next_token_loss(model, x, y, reduction="sum"))
        n = int((y != IGNORE).sum())
        count += n
    model.train()
    return (total / max(count, 1)), count


def use_bf16(device: torch.device, precision: str) -> bool:
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return precision == "bf16"


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast (weights and optimizer stay fp32) where the hardware has it; else fp32."""
    if use_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Progress:
    """One status line: step, loss, tokens/s, ETA (rewritten in place on a terminal)."""

    def __init__(self, total_steps: int | None, time_budget: float | None, enabled: bool):
        self.total = total_steps
        self.time_budget = time_budget
        self.enabled, self.tty = enabled, sys.stderr.isatty()

    def update(self, step: int, loss: float, tok_s: float, progress: float, elapsed: float, lr: float):
        if not self.enabled:
            return
        eta = max(0.0, elapsed * (1 - progress) / max(progress, 1e-9))
        line = (f"step {step}{'/' + str(self.total) if self.total else ''} ({progress:.0%}) loss {loss:.4f} "
                f"lr {lr:.2e} {tok_s:,.0f} tok/s ETA {int(eta // 60)}m{int(eta % 60):02d}s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)


def micro_step(model: GPT, train_model, forward, x, y, sync: bool, device, precision: str, scale: float):
    """Forward and backward of one micro-batch; returns its summed loss. `forward` is `train_model` or a
    compiled version of it; gradients wait for `sync` when several processes train."""
    with contextlib.nullcontext() if sync else train_model.no_sync():
        with autocast(device, precision):
            loss_sum = next_token_loss(model, x, y, reduction="sum", forward=forward)
        (loss_sum * scale).backward()  # scale: processes / target tokens, as DDP averages gradients
    return loss_sum.detach()


def train_stage(model: GPT, tok: Tokenizer, mix: Mixture, val: Mixture | None, cfg: TrainConfig, run_dir: Path,
                device: torch.device, resume: bool = False, log=print) -> StageResult:
    """Train `model` in place on `mix`; checkpoints, metrics.jsonl and loss.png go to run_dir."""
    rank, world = distributed()
    is_main = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {world} processes")
    local_batch = cfg.batch_size // world
    if local_batch % cfg.grad_accum:
        raise ValueError(f"per-process batch {local_batch} is not divisible by grad_accum {cfg.grad_accum}")
    micro = local_batch // cfg.grad_accum
    ctx = model.cfg.context_length
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "elapsed": 0.0, "max_steps": cfg.max_steps,
             "history": []}
    if resume and read_checkpoint_state(run_dir) is not None:
        state = load_checkpoint(run_dir, model, optimizer)
        log(f"resumed from {run_dir} at step {state['step']}")
    metrics = run_dir / "metrics.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and metrics.exists():
            metrics.unlink()
        elif metrics.exists():
            keep_metrics_until(metrics, state["step"])

    inputs, targets = build_epoch(tok, mix, ctx, cfg.seed, state["epoch"])
    batches_per_epoch = max(1, len(inputs) // cfg.batch_size)
    if state["max_steps"] is None and cfg.num_epochs:
        state["max_steps"] = max(1, int(cfg.num_epochs * batches_per_epoch))
    val_data = build_epoch(tok, val, ctx, cfg.seed, 0) if val and val.texts else None
    if val_data is not None:
        val_data = (val_data[0][:cfg.eval_windows], val_data[1][:cfg.eval_windows])

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    forward = torch.compile(train_model) if compile_wanted(cfg) else train_model
    if not state["max_steps"] and not cfg.time_budget:
        raise ValueError("give --max-steps, --num-epochs or --time-budget")
    progress = Progress(state["max_steps"], cfg.time_budget, is_main)
    window_start, window_tokens = time.time(), 0
    started = time.time() - state["elapsed"]
    last_loss = float("nan")
    val_loss = None

    done = progress_of(state, cfg) >= 1.0
    while not done:
        if state["batch_in_epoch"] >= batches_per_epoch:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            inputs, targets = build_epoch(tok, mix, ctx, cfg.seed, state["epoch"])
            batches_per_epoch = max(1, len(inputs) // cfg.batch_size)
        g0 = state["batch_in_epoch"] * cfg.batch_size
        b0 = g0 + rank * local_batch
        # every process holds the whole epoch, so each can divide by the global count of target tokens:
        # summed over processes and micro-batches, the gradient is exactly the single-process one
        denom = max(1, int((targets[g0:g0 + cfg.batch_size] != IGNORE).sum()))
        step_loss = 0.0
        lr = lr_at(state["step"], progress_of(state, cfg), cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for m in range(cfg.grad_accum):
            x = inputs[b0 + m * micro: b0 + (m + 1) * micro].to(device)
            y = targets[b0 + m * micro: b0 + (m + 1) * micro].to(device)
            sync = m == cfg.grad_accum - 1 or world == 1
            try:
                loss_sum = micro_step(model, train_model, forward, x, y, sync, device, cfg.precision, world / denom)
            except Exception as exc:  # noqa: BLE001 - torch.compile can fail in many ways; train on without it
                if forward is train_model:
                    raise
                log(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    "training without it")
                forward = train_model
                loss_sum = micro_step(model, train_model, forward, x, y, sync, device, cfg.precision, world / denom)
            step_loss += float(loss_sum.detach()) / denom
        if world > 1:
            t = torch.tensor([step_loss], device=device)
            torch.distributed.all_reduce(t)
            step_loss = float(t)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["batch_in_epoch"] += 1
        step_tokens = cfg.batch_size * ctx
        state["tokens"] += step_tokens
        window_tokens += step_tokens
        last_loss = step_loss
        elapsed = time.time() - started
        state["elapsed"] = elapsed
        done = progress_of(state, cfg) >= 1.0
        if world > 1:  # elapsed time differs between processes: rank 0 decides when to stop
            flag = torch.tensor([float(done)], device=device)
            torch.distributed.broadcast(flag, 0)
            done = bool(flag.item())
        record = {"step": state["step"], "loss": round(step_loss, 5), "lr": lr, "tokens": state["tokens"],
                  "elapsed": round(elapsed, 2)}
        if state["step"] % cfg.log_every == 0 or done:
            rate = window_tokens / max(1e-9, time.time() - window_start)
            record["tokens_per_s"] = round(rate)
            progress.update(state["step"], step_loss, rate, progress_of(state, cfg), elapsed, lr)
            window_start, window_tokens = time.time(), 0
        if val_data is not None and (state["step"] % cfg.eval_every == 0 or done):
            val_loss, _ = evaluate_loss(model, *val_data, precision=cfg.precision)
            record["val_loss"] = round(val_loss, 5)
        state["history"].append({k: record[k] for k in ("step", "loss", "tokens") if k in record}
                                | ({"val_loss": record["val_loss"]} if "val_loss" in record else {}))
        if is_main:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        if is_main and (state["step"] % cfg.checkpoint_every == 0 or done):
            save_checkpoint(run_dir, model, optimizer, state)
        if cfg.stop_after and state["step"] >= cfg.stop_after:
            break
    progress.close()
    if is_main:
        plot_losses(state["history"], run_dir / "loss.png")
    return StageResult(state["step"], state["tokens"], state["elapsed"], last_loss, val_loss, state["history"])


def keep_metrics_until(metrics: Path, step: int) -> None:
    """On resume: drop the lines logged after the checkpoint (they are logged again) and any line a kill
    cut short, so metrics.jsonl keeps one line per step. Rewritten atomically."""
    kept: dict[int, str] = {}
    with open(metrics, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept[record["step"]] = line if line.endswith("\n") else line + "\n"
    tmp = metrics.with_name(f".{metrics.name}.tmp")
    tmp.write_text("".join(kept[k] for k in sorted(kept)), encoding="utf-8")
    os.replace(tmp, metrics)


def plot_losses(history: list[dict], path: Path, title: str | None = None) -> bool:
    """Training (and validation) loss against tokens seen; False where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not history:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    tokens = [h["tokens"] / 1e6 for h in history]
    ax.plot(tokens, [h["loss"] for h in history], lw=0.8, alpha=0.7, label="train")
    val = [(h["tokens"] / 1e6, h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
