"""Model bundles: a directory with config.json, tokenizer.json, model.safetensors and data.msgpack.

Loading validates every file and raises BundleError naming the bad file. Weights are read with
safetensors only: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import GPT
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "tokenizer.json", "model.safetensors", "data.msgpack"
BUNDLE_FILES = (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CARD_FILE)
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BundleError(ValueError):
    """A model bundle is missing, incomplete or corrupt. The message names the file and the problem."""


@dataclass
class Bundle:
    config: ModelConfig
    tokenizer: Tokenizer
    model: GPT
    card: dict = field(default_factory=dict)
    prompt_format: str = "spm"
    path: Path | None = None


def save_bundle(path: str | Path, model: GPT, tokenizer: Tokenizer, card: dict | None = None,
                storage_dtype: str = "float16", prompt_format: str = "spm") -> Path:
    """Write a bundle atomically: files go to a temporary sibling directory that then replaces `path`."""
    path = Path(path)
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {list(STORAGE_DTYPES)}")
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model expects {model.cfg.vocab_size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = {"format_version": FORMAT_VERSION, "model": model.cfg.to_dict(),
                  "storage_dtype": storage_dtype, "prompt_format": prompt_format}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(tmp / TOKENIZER_FILE)
        dtype = STORAGE_DTYPES[storage_dtype]
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
                 if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "codellm_format": str(FORMAT_VERSION)})
        (tmp / CARD_FILE).write_bytes(msgpack.packb(card or {}, use_bin_type=True))
        os.chmod(tmp, 0o755)
        for name in BUNDLE_FILES:
            os.chmod(tmp / name, 0o644)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_config(path: Path) -> tuple[ModelConfig, dict]:
    try:
        raw = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path / CONFIG_FILE}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path / CONFIG_FILE}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path / CONFIG_FILE}: unknown format version {version!r} "
                          f"(this codellm reads version {FORMAT_VERSION})")
    if raw.get("storage_dtype", "float32") not in STORAGE_DTYPES or raw.get("prompt_format", "spm") not in ("spm", "psm"):
        raise BundleError(f"{path / CONFIG_FILE}: unknown storage_dtype or prompt_format")
    try:
        return ModelConfig.from_dict(raw["model"]), raw
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path / CONFIG_FILE}: bad model configuration ({exc})") from None


def _read_weights(path: Path, model: GPT) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_FILE
    with open(file, "rb") as f:
        head = f.read(8)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80" or head[:2] == b"PK":
        raise BundleError(f"{file}: this is a pickle/zip checkpoint, not safetensors; refusing to load it")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt ({exc})") from None
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(f"{file}: tensors do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise BundleError(f"{file}: tensor {name} has shape {tuple(state[name].shape)}, "
                              f"config.json implies {tuple(shape)}")
    return state


def load_bundle(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Bundle:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise BundleError(f"{path}: model bundle not found (expected a directory with {', '.join(BUNDLE_FILES)})")
    for name in BUNDLE_FILES:
        if not (path / name).is_file():
            raise BundleError(f"{path / name}: missing file; the bundle is incomplete")
    config, raw = _read_config(path)
    try:
        tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise BundleError(f"{path / TOKENIZER_FILE}: not a valid tokenizer ({exc})") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(f"{path / TOKENIZER_FILE}: vocabulary has {tokenizer.vocab_size} tokens but "
                          f"config.json says vocab_size {config.vocab_size}")
    try:
        card = msgpack.unpackb((path / CARD_FILE).read_bytes(), raw=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise BundleError(f"{path / CARD_FILE}: corrupt data card ({exc})") from None
    model = GPT(config)
    state = _read_weights(path, model)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    model.to(device=device, dtype=dtype).eval()
    return Bundle(config, tokenizer, model, card if isinstance(card, dict) else {}, raw.get("prompt_format", "spm"), path)
