"""What a model bundle folder holds, read without torch: the file names, the config and tokenizer
checks, and the content digest that tells one bundle's bytes from another's. codellm.bundle reads the
weights; codellm.kernel_engine answers from a bundle before torch has loaded."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import ModelConfig
from .prompt import DEFAULT_FORMAT, FIM_FORMATS
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "tokenizer.json", "model.safetensors", "data.msgpack"
BUNDLE_FILES = (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CARD_FILE)
STORAGE_DTYPE_NAMES = ("float32", "float16", "bfloat16")


class BundleError(ValueError):
    """A model bundle is missing, incomplete or corrupt. The message names the file and the problem."""


def content_digest(files: list[bytes]) -> str:
    """BLAKE2b of a bundle's files, in BUNDLE_FILES order (each length-prefixed)."""
    h = hashlib.blake2b(digest_size=16)
    for data in files:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def bundle_digest(path: str | Path) -> str | None:
    """content_digest of the bundle files at `path` as they are now; None if one cannot be read."""
    try:
        return content_digest([(Path(path) / name).read_bytes() for name in BUNDLE_FILES])
    except OSError:
        return None


def parse_config(data: bytes, file: Path) -> tuple[ModelConfig, dict]:
    """The model config and the whole JSON object of config.json bytes; raises BundleError naming `file`."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{file}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{file}: unknown format version {version!r} (this codellm reads version {FORMAT_VERSION})")
    if raw.get("storage_dtype", "float32") not in STORAGE_DTYPE_NAMES:
        raise BundleError(f"{file}: storage_dtype must be one of {list(STORAGE_DTYPE_NAMES)}, got {raw.get('storage_dtype')!r}")
    if raw.get("prompt_format", DEFAULT_FORMAT) not in FIM_FORMATS:
        raise BundleError(f"{file}: prompt_format must be {' or '.join(map(repr, FIM_FORMATS))}, "
                          f"got {raw.get('prompt_format')!r}")
    if "model" not in raw:
        raise BundleError(f"{file}: no 'model' section")
    try:
        return ModelConfig.from_dict(raw["model"]), raw
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{file}: {exc}") from None


def parse_tokenizer(data: bytes, file: Path, config: ModelConfig) -> Tokenizer:
    """The tokenizer of tokenizer.json bytes, checked against `config`; raises BundleError naming `file`."""
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise BundleError(f"{file}: not a valid tokenizer ({exc})") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(f"{file}: vocabulary has {tokenizer.vocab_size} tokens but "
                          f"config.json says vocab_size {config.vocab_size}")
    return tokenizer
