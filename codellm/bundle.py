"""Model bundles: a directory with config.json, tokenizer.json, model.safetensors and data.msgpack.

Loading validates every file and raises BundleError naming the bad file. Weights are read with
safetensors only: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load, save_file

from .bundle_files import (BUNDLE_FILES, CARD_FILE, CONFIG_FILE, FORMAT_VERSION, QUANTISED, SCALE_SUFFIX,  # noqa: F401
                           STORAGE_DTYPE_NAMES, TOKENIZER_FILE, WEIGHTS_FILE, BundleError, quantised_fault, read_bundle_files,
                           storage_of)
from .config import ModelConfig
from .model import GPT
from .prompt import DEFAULT_FORMAT
from .tokenizer import Tokenizer

# the float type each storage type keeps its float tensors in (int8: the norm weights and row scales)
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, QUANTISED: torch.float32}
assert tuple(STORAGE_DTYPES) == STORAGE_DTYPE_NAMES


def quantise_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 storage of a state dict: each matrix (rows, in) as int8 with a float32 scale per row (its
    largest magnitude / 127) under `name + SCALE_SUFFIX`; other tensors as float32. Symmetric per-row
    (per-output-channel) weight quantisation, as in LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339)
    without its outlier split: on the shipped model it moved held-out shell loss by under 0.05 %."""
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu", torch.float32)
        if tensor.ndim != 2:
            out[name] = tensor.contiguous()
            continue
        scale = tensor.abs().amax(dim=1).clamp_min(1e-12) / 127
        out[name] = torch.round(tensor / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        out[name + SCALE_SUFFIX] = scale.contiguous()
    return out


def dequantise_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 state dict of a quantise_rows one: each int8 matrix times its row scales."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in state:
            continue
        out[name] = tensor.float() * state[name + SCALE_SUFFIX][:, None].float() if tensor.dtype == torch.int8 else tensor
    return out


@dataclass
class Bundle:
    config: ModelConfig
    tokenizer: Tokenizer
    model: GPT
    card: dict = field(default_factory=dict)
    prompt_format: str = DEFAULT_FORMAT
    path: Path | None = None
    digest: str = ""  # of the bytes of the files read (content_digest): tells a touched bundle from a new one
    storage_dtype: str = "float16"  # how config.json says the weights are stored (STORAGE_DTYPES)


def is_bundle_dir(path: Path) -> bool:
    """A folder holding nothing but a bundle's files (and the hidden temporaries save_bundle leaves):
    what save_bundle may replace without being asked to."""
    try:
        entries = [e for e in os.listdir(path) if not e.startswith(".")]
    except OSError:
        return False
    return bool(entries) and set(entries) <= set(BUNDLE_FILES) and CONFIG_FILE in entries


def check_bundle_target(path: str | Path, overwrite: bool = False) -> None:
    """Raise BundleError if writing a bundle to `path` would replace something that is not a bundle:
    a file, or a non-empty folder with other files in it, unless `overwrite` (then only the bundle's
    own files in it are replaced; everything else stays)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise BundleError(f"{path}: exists and is not a folder; refusing to replace it with a model bundle")
    if overwrite or not os.listdir(path) or is_bundle_dir(path):
        return
    raise BundleError(f"{path}: this folder is not empty and is not a model bundle; refusing to write a bundle "
                      "over it (choose a new folder, or give --overwrite to replace only the bundle's files "
                      "in it, keeping everything else)")


@contextmanager
def signals_held():
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block ends: a bundle write killed half-way would leave a
    hidden temporary folder, or the old bundle moved aside and no new one in its place. A signal that
    comes meanwhile (to whichever thread the system gives it) is recorded by a Python handler, which always
    runs in the main thread, and raised again once the handlers before are back: it then acts as it would
    have, on a whole bundle. Signals left ignored stay ignored. Outside the main thread (where handlers
    cannot be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        handler = signal.getsignal(number) if number is not None else None
        if handler is None or handler is signal.SIG_IGN:  # not set from Python, or ignored: left alone
            continue
        before[number] = handler
        signal.signal(number, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)


def save_bundle(path: str | Path, model: GPT, tokenizer: Tokenizer, card: dict | None = None,
                storage_dtype: str = "float16", prompt_format: str = DEFAULT_FORMAT, overwrite: bool = False) -> Path:
    """Write a bundle atomically: files go to a temporary sibling directory that then replaces `path`.

    An existing `path` is replaced only if it is empty or a bundle (see check_bundle_target). With
    `overwrite`, a folder holding other files keeps them: each of the bundle's files is renamed into it."""
    path = Path(path)
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {list(STORAGE_DTYPES)}")
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model expects {model.cfg.vocab_size}")
    check_bundle_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with signals_held():
        return _write_bundle(path, model, tokenizer, card, storage_dtype, prompt_format)


def _write_bundle(path: Path, model: GPT, tokenizer: Tokenizer, card: dict | None, storage_dtype: str,
                  prompt_format: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = {"format_version": FORMAT_VERSION, "model": model.cfg.to_dict(),
                  "storage_dtype": storage_dtype, "prompt_format": prompt_format}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(tmp / TOKENIZER_FILE)
        dtype = STORAGE_DTYPES[storage_dtype]
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
                 if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
        if storage_dtype == QUANTISED:
            state = quantise_rows(state)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "codellm_format": str(FORMAT_VERSION)})
        (tmp / CARD_FILE).write_bytes(msgpack.packb(card or {}, use_bin_type=True))
        os.chmod(tmp, 0o755)
        for name in BUNDLE_FILES:
            os.chmod(tmp / name, 0o644)
        if path.is_dir() and not path.is_symlink() and set(os.listdir(path)) - set(BUNDLE_FILES):
            for name in BUNDLE_FILES:  # other files (hidden ones too: .git) stay; the bundle's are replaced
                os.replace(tmp / name, path / name)
        elif path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _remove(path: Path) -> None:
    """Remove a folder this module set aside, or a link to one (the link only); nothing if it is gone."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _load_weights(data: bytes, file: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes as `dtype` (int8 matrices times their row scales); raises
    BundleError for unreadable ones, or ones not finite in `dtype` (a float64 1e300 is infinite as float32)."""
    try:
        stored = safetensors_load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt ({exc})") from None
    for name, tensor in stored.items():
        fault = tensor.dtype == torch.int8 and quantised_fault(int(tensor.min()), float(stored[name + SCALE_SUFFIX].min()))
        if fault:
            raise BundleError(f"{file}: int8 tensor {name} {fault}")
    state = {name: tensor.to(dtype) for name, tensor in dequantise_rows(stored).items()}
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise BundleError(f"{file}: tensor {name} holds NaN or infinite values")
    return state


def load_bundle(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Bundle:
    """Read and check a bundle (codellm.bundle_files.read_bundle_files: config.json first, every field's
    type and range, then the weights' header against it, before anything is allocated; a bundle being
    copied is read again once it holds still), then its tensors: NaN or infinite weights are refused."""
    path = Path(path).expanduser()
    read = read_bundle_files(path)
    state = _load_weights(read.files.pop(WEIGHTS_FILE), path / WEIGHTS_FILE, dtype)  # the bytes go after it
    model = GPT(read.config, init=False)  # every weight comes next (the header check saw them all)
    model.load_state_dict(state, strict=False)
    model.to(device=device, dtype=dtype).eval()
    return Bundle(read.config, read.tokenizer, model, read.card, read.raw.get("prompt_format", DEFAULT_FORMAT),
                  path, read.digest, storage_of(read.raw))
