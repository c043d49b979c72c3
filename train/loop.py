"""The training loop: get batch, forward, backward, clip, step, log, checkpoint. One loop for both stages.

Runs alone or under `torchrun` (DDP: gloo on CPU, nccl on CUDA); rank 0 alone writes files.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from codellm.device import cpu_has_bf16
from codellm.model import GPT
from codellm.tokenizer import Tokenizer

from .atomic_write import write_bytes
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
    parent: str = ""  # model_digest of the bundle the run starts from (--from); "" for a new model
    parent_whole: str = ""  # its bundle_digest (data card included), which older checkpoints recorded

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
    sittings: list = field(default_factory=list)  # each start of the run that trained (sitting_record)


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


def close_distributed() -> None:
    """Leaves the process group, if one was joined: a group left to interpreter exit can abort the
    process ("terminate called without an active exception") after a run that finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # a DDP wrapper left in a reference cycle holds the group's threads past its destruction
        torch.distributed.destroy_process_group()


def lr_at(step: int, progress: float, cfg: TrainConfig, max_steps: int | None = None) -> float:
    """Linear warmup over warmup_steps (at most a tenth of `max_steps`, so that a short fine-tune reaches
    its learning rate), constant, then a linear warmdown over the last share of progress."""
    warmup = min(cfg.warmup_steps, max(1, max_steps // 10)) if max_steps else cfg.warmup_steps
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
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


@dataclass
class StageRun:
    """What one stage's loop works with and advances: made by `set_up`, a step at a time by `train_step`
    and `log_step`."""
    model: GPT
    tok: Tokenizer
    mix: Mixture
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    rank: int
    world: int
    optimizer: torch.optim.Optimizer
    state: dict  # step, epoch, batch_in_epoch, tokens, elapsed, max_steps, history: what a checkpoint keeps
    inputs: torch.Tensor | None = None  # the epoch's windows
    targets: torch.Tensor | None = None
    batches_per_epoch: int = 1
    val_data: tuple | None = None
    train_model: torch.nn.Module | None = None  # the model, or its DDP wrapper
    forward: Callable | None = None  # train_model, or a compiled version of it
    progress: Progress | None = None
    started: float = 0.0  # when training would have started had it never stopped (resume keeps elapsed)
    window_start: float = 0.0  # tokens/s is measured over the steps since the last log line
    window_tokens: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.world

    @property
    def micro(self) -> int:
        return self.local_batch // self.cfg.grad_accum

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def read_epoch(self) -> None:
        """Build the windows of the state's epoch (the same for a given seed and epoch)."""
        self.inputs, self.targets = build_epoch(self.tok, self.mix, self.model.cfg.context_length, self.cfg.seed,
                                                self.state["epoch"])
        self.batches_per_epoch = max(1, len(self.inputs) // self.cfg.batch_size)


def train_stage(model: GPT, tok: Tokenizer, mix: Mixture, val: Mixture | None, cfg: TrainConfig, run_dir: Path,
                device: torch.device, resume: bool = False, log=print) -> StageResult:
    """Train `model` in place on `mix`; checkpoints, metrics.jsonl and loss.png go to run_dir."""
    run = set_up(model, tok, mix, val, cfg, run_dir, device, resume, log)
    history = run.state["history"]  # a resumed run that has no step left keeps the figures it ended with
    last_loss = history[-1]["loss"] if history else float("nan")
    val_loss = next((h["val_loss"] for h in reversed(history) if "val_loss" in h), None)
    done = progress_of(run.state, cfg) >= 1.0
    if STOP.signum is not None:  # asked to stop during an earlier stage of this command
        raise TrainingStopped(f"stopped before this stage ({STOP.name}); the same command with --resume goes "
                              "on from the stages already done", STOP.signum)
    with STOP.watching(log) as stop:
        while not done:
            last_loss, lr = train_step(run, log)
            done = is_done(run)
            evaluated = log_step(run, last_loss, lr, done)
            val_loss = evaluated if evaluated is not None else val_loss
            if cfg.stop_after and run.state["step"] >= cfg.stop_after:
                break
            if not done and stop_requested(run, stop):
                if run.is_main:
                    save_checkpoint(run.run_dir, run.model, run.optimizer, run.state)
                    plot_losses(run.state["history"], run_dir / "loss.png")  # the curve up to the stop
                run.progress.close()
                raise TrainingStopped(f"stopped at step {run.state['step']} ({stop.name}); the checkpoint is in "
                                      f"{run.run_dir}: the same command with --resume continues from it", stop.signum)
    run.progress.close()
    if run.is_main:
        plot_losses(run.state["history"], run_dir / "loss.png")
    state = run.state
    return StageResult(state["step"], state["tokens"], state["elapsed"], last_loss, val_loss, state["history"],
                       state.get("sittings", []))


class TrainingStopped(Exception):
    """The run was asked to stop (SIGINT or SIGTERM) and saved a checkpoint first."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """While training steps run, SIGINT (Ctrl-C) or SIGTERM asks the run to stop after the step under way,
    so that no step is lost; a second signal acts at once, as it would have without this. Installed only
    in the main thread (where Python handles signals), and not for a signal the process was started to
    ignore. A request outlives the stage it came in: the next stage of the same command does not start
    (`STOP`, shared by the stages of one process)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}
        self.log = print

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def watching(self, log=print) -> "StopRequest":
        self.log = log
        return self

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        for number, handler in self.previous.items():  # a second signal, of either kind, acts at once
            signal.signal(number, handler)
        try:  # the log's reader may be gone (a pipe to `tee` that the same Ctrl-C ended): stop all the same
            self.log(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                     "(send it again to stop at once)")
        except (OSError, ValueError):
            pass

    def __exit__(self, *_exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


STOP = StopRequest()


def stop_requested(run: StageRun, stop: StopRequest) -> bool:
    """Whether to stop now; with several processes, rank 0 decides, as for is_done."""
    wanted = stop.signum is not None
    if run.world > 1:
        flag = torch.tensor([float(wanted)], device=run.device)
        torch.distributed.broadcast(flag, 0)
        wanted = bool(flag.item())
    return wanted


def set_up(model: GPT, tok: Tokenizer, mix: Mixture, val: Mixture | None, cfg: TrainConfig, run_dir: Path,
           device: torch.device, resume: bool, log) -> StageRun:
    """Seeds, optimizer, the state (a checkpoint's on resume), the first epoch, validation windows and the
    model to step (DDP and torch.compile where asked)."""
    rank, world = distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {world} processes")
    if (cfg.batch_size // world) % cfg.grad_accum:
        raise ValueError(f"per-process batch {cfg.batch_size // world} is not divisible by grad_accum {cfg.grad_accum}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    state = start_state(model, optimizer, cfg, run_dir, resume, rank == 0, log)
    run = StageRun(model, tok, mix, cfg, run_dir, device, rank, world, optimizer, state)
    run.read_epoch()
    if state["max_steps"] is None and cfg.num_epochs:
        state["max_steps"] = max(1, int(cfg.num_epochs * run.batches_per_epoch))
    ctx = model.cfg.context_length
    val_data = build_epoch(tok, val, ctx, cfg.seed, 0) if val and val.texts else None
    if val_data is not None:
        run.val_data = (val_data[0][:cfg.eval_windows], val_data[1][:cfg.eval_windows])
    run.train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    run.forward = torch.compile(run.train_model) if compile_wanted(cfg) else run.train_model
    if not state["max_steps"] and not cfg.time_budget:
        raise ValueError("give --max-steps, --num-epochs or --time-budget")
    if progress_of(state, cfg) < 1.0:  # a start that trains is a sitting; one that only writes the bundle is not
        state["sittings"] = sittings_so_far(state) + [sitting_record(state, cfg, device)]
    run.progress = Progress(state["max_steps"], cfg.time_budget, run.is_main)
    run.window_start, run.window_tokens = time.time(), 0
    run.started = time.time() - state["elapsed"]
    return run


def sitting_record(state: dict, cfg: TrainConfig, device: torch.device) -> dict:
    """Where this start of the run took it up (step, tokens, seconds trained before), on what device, with
    what may change from one sitting to the next (learning rate, batch size, precision, and the limit the
    run goes by: the steps it works out, --num-epochs included, and the time budget): the card of a run
    carried on across days says how each part was trained, not only the last."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"from_step": state["step"], "from_tokens": state["tokens"], "from_seconds": round(state["elapsed"], 1),
            "device": name, "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size,
            "precision": cfg.precision, "max_steps": state["max_steps"], "time_budget": cfg.time_budget}


def sittings_so_far(state: dict) -> list[dict]:
    """The sittings a checkpoint recorded; one of a run that began before sittings were recorded stands for
    its steps so far, with nothing known of how they were trained."""
    if "sittings" in state or not state["step"]:
        return state.get("sittings", [])
    return [{"from_step": 0, "from_tokens": 0, "from_seconds": 0.0, "not_recorded": True}]


def start_state(model: GPT, optimizer, cfg: TrainConfig, run_dir: Path, resume: bool, is_main: bool,
                log) -> dict:
    """A new run's state, or on resume the last checkpoint's (with metrics.jsonl cut back to it)."""
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "elapsed": 0.0, "max_steps": cfg.max_steps,
             "history": [], "parent": cfg.parent, "context_length": model.cfg.context_length}
    saved = read_checkpoint_state(run_dir) if resume else None
    if saved is not None:
        started = saved.get("parent", cfg.parent)  # older checkpoints: not known
        check_same_parent(run_dir, cfg.parent if started == cfg.parent_whole else started, cfg.parent)
        check_same_context(run_dir, saved.get("context_length", model.cfg.context_length), model.cfg.context_length)
        state = load_checkpoint(run_dir, model, optimizer)
        state["parent"] = cfg.parent  # recorded from now on where an older checkpoint had none
        state["context_length"] = model.cfg.context_length
        log(f"resumed from {run_dir} at step {state['step']}")
        own = state.get("max_steps")
        state["max_steps"] = max_steps_on_resume(own, cfg.max_steps, cfg.time_budget)
        say_max_steps(own, state["max_steps"], cfg.max_steps, log)
    metrics = run_dir / "metrics.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and metrics.exists():
            metrics.unlink()
        elif metrics.exists():
            keep_metrics_until(metrics, state["step"])
    return state


def max_steps_on_resume(own: int | None, given: int | None, time_budget: float | None) -> int | None:
    """The step count a resumed run goes to: its own, unless --max-steps (`given`) reaches further, or a
    --time-budget without --max-steps is what limits the run now (None: no step count)."""
    if given:
        return given if given > (own or 0) else own
    return None if time_budget else own


def say_max_steps(own: int | None, now: int | None, given: int | None, log) -> None:
    """Tell where a resumed run's step count differs from its own or from the --max-steps given."""
    if own and now is None:
        log(f"the run goes on to the --time-budget given, no longer to its own {own} steps")
    elif own and now != own:
        log(f"the run goes on past its {own} steps to {now} (--max-steps)")
    elif given and own and given != own:
        log(f"note: the run goes on to its own {own} steps (a smaller --max-steps {given} applies to a new run)")


def check_same_parent(run_dir: Path, started: str, given: str) -> None:
    """ValueError unless a run resumes from the bundle it started from (model digests; "": a new model)."""
    if started == given:
        return
    if not started:
        what = "trained a new model (no --from); resume it without --from"
    elif not given:
        what = "started from a --from bundle; resume it with that --from"
    else:
        what = ("started from another --from bundle than the one given (or that bundle has changed since); "
                "resume it with the bundle it started from")
    raise ValueError(f"{run_dir}: this run {what}, or start over: the same command without --resume, with --overwrite")


def check_same_context(run_dir: Path, started: int, given: int) -> None:
    """ValueError unless a run resumes with the context length (tokens) it trained with: a preset's
    default or a --context-length that changed would otherwise switch the run's windows midway."""
    if started != given:
        raise ValueError(f"{run_dir}: this run trained with a {started}-token context, this command gives "
                         f"{given}; resume it with --context-length {started}, or start over: the same command "
                         "without --resume, with --overwrite")


def train_step(run: StageRun, log) -> tuple[float, float]:
    """One optimizer step over the next batch (its micro-batches, this process's share); returns the
    step's mean loss per target token, over all processes, and the learning rate it used."""
    cfg, state, world = run.cfg, run.state, run.world
    if state["batch_in_epoch"] >= run.batches_per_epoch:
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        run.read_epoch()
    g0 = state["batch_in_epoch"] * cfg.batch_size
    b0 = g0 + run.rank * run.local_batch
    # every process holds the whole epoch, so each can divide by the global count of target tokens:
    # summed over processes and micro-batches, the gradient is exactly the single-process one
    denom = max(1, int((run.targets[g0:g0 + cfg.batch_size] != IGNORE).sum()))
    step_loss = 0.0
    lr = lr_at(state["step"], progress_of(state, cfg), cfg, state["max_steps"])
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    micro = run.micro
    for m in range(cfg.grad_accum):
        x = run.inputs[b0 + m * micro: b0 + (m + 1) * micro].to(run.device)
        y = run.targets[b0 + m * micro: b0 + (m + 1) * micro].to(run.device)
        sync = m == cfg.grad_accum - 1 or world == 1
        step_loss += float(micro_step_or_uncompiled(run, x, y, sync, world / denom, log).detach()) / denom
    if world > 1:
        t = torch.tensor([step_loss], device=run.device)
        torch.distributed.all_reduce(t)
        step_loss = float(t)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state["step"] += 1
    state["batch_in_epoch"] += 1
    step_tokens = cfg.batch_size * run.model.cfg.context_length
    state["tokens"] += step_tokens
    run.window_tokens += step_tokens
    state["elapsed"] = time.time() - run.started
    return step_loss, lr


def micro_step_or_uncompiled(run: StageRun, x, y, sync: bool, scale: float, log) -> torch.Tensor:
    """micro_step with the run's forward; where torch.compile fails, the run goes on without it."""
    try:
        return micro_step(run.model, run.train_model, run.forward, x, y, sync, run.device, run.cfg.precision, scale)
    except Exception as exc:  # noqa: BLE001 - torch.compile can fail in many ways; train on without it
        if run.forward is run.train_model:
            raise
        log(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "training without it")
        run.forward = run.train_model
        return micro_step(run.model, run.train_model, run.forward, x, y, sync, run.device, run.cfg.precision, scale)


def is_done(run: StageRun) -> bool:
    """Whether the run has reached its steps or its time budget; with several processes, rank 0 decides
    (elapsed time differs between them)."""
    done = progress_of(run.state, run.cfg) >= 1.0
    if run.world > 1:
        flag = torch.tensor([float(done)], device=run.device)
        torch.distributed.broadcast(flag, 0)
        done = bool(flag.item())
    return done


def log_step(run: StageRun, step_loss: float, lr: float, done: bool) -> float | None:
    """After a step: the status line, validation loss, metrics.jsonl, the history and a checkpoint, each
    when due. Returns the validation loss when it was measured."""
    cfg, state = run.cfg, run.state
    record = {"step": state["step"], "loss": round(step_loss, 5), "lr": lr, "tokens": state["tokens"],
              "elapsed": round(state["elapsed"], 2)}
    if state["step"] % cfg.log_every == 0 or done or state["step"] == 1:  # the first: a run is under way
        rate = run.window_tokens / max(1e-9, time.time() - run.window_start)
        record["tokens_per_s"] = round(rate)
        run.progress.update(state["step"], step_loss, rate, progress_of(state, cfg), state["elapsed"], lr)
        run.window_start, run.window_tokens = time.time(), 0
    val_loss = None
    if run.val_data is not None and (state["step"] % cfg.eval_every == 0 or done):
        val_loss, _ = evaluate_loss(run.model, *run.val_data, precision=cfg.precision)
        record["val_loss"] = round(val_loss, 5)
    state["history"].append({k: record[k] for k in ("step", "loss", "tokens") if k in record}
                            | ({"val_loss": record["val_loss"]} if "val_loss" in record else {}))
    if run.is_main:
        with open(run.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
    if run.is_main and (state["step"] % cfg.checkpoint_every == 0 or done):
        save_checkpoint(run.run_dir, run.model, run.optimizer, state)
    return val_loss


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
    write_bytes(metrics, "".join(kept[k] for k in sorted(kept)).encode("utf-8"))


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
