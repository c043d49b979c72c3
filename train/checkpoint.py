"""Training checkpoints in one safetensors file (model, optimizer moments, RNG) with JSON metadata.

Written through atomic_write, so a killed run or a full disk never leaves a partial checkpoint. Nothing
is pickled: optimizer state and RNG states are stored as tensors, the rest as JSON.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from safetensors import safe_open

from .atomic_write import write_bytes

CHECKPOINT_FILE = "checkpoint.safetensors"


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    if tied:
        tensors.pop("model.lm_head.weight", None)
    for param_id, param_state in optimizer.state_dict()["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{param_id}.{name}"] = value.detach().cpu().contiguous().reshape(value.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = dict(state, python_rng=_encode_python_rng(random.getstate()))
    path = run_dir / CHECKPOINT_FILE
    write_bytes(path, save(tensors, metadata={"state": json.dumps(meta)}))
    return path


def read_checkpoint_state(run_dir: Path) -> dict | None:
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])


def check_same_shape(path: Path, saved: dict, model: torch.nn.Module) -> None:
    """ValueError unless the checkpoint holds every parameter of `model`, of the same shapes: a run
    resumed with another --layers (or --from) would otherwise load a mix of two models."""
    own, known = dict(model.named_parameters()), set(model.state_dict())
    wrong = [k for k in own if k not in saved or saved[k].shape != own[k].shape]
    wrong += [k for k in saved if k not in known]
    if wrong:
        raise ValueError(f"{path}: this checkpoint is of another model shape than this run's (e.g. {wrong[0]}); "
                         "resume with the --from and --layers the run started with")


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    path = run_dir / CHECKPOINT_FILE
    tensors = load_file(str(path))
    state = read_checkpoint_state(run_dir)
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    check_same_shape(path, model_state, model)
    model.load_state_dict(model_state, strict=False)
    opt_state = optimizer.state_dict()
    params = [p for g in opt_state["param_groups"] for p in g["params"]]
    restored = {}
    for pid in params:
        entry = {name.split(".", 2)[2]: t for name, t in tensors.items() if name.startswith(f"optim.{pid}.")}
        if entry:
            restored[pid] = entry
    opt_state["state"] = restored
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    random.setstate(_decode_python_rng(state.pop("python_rng")))
    return state


def _encode_python_rng(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_python_rng(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
