"""Model bundles: a directory with config.json, tokenizer.json, model.safetensors and data.msgpack.

Loading validates every file and raises BundleError naming the bad file. Weights are read with
safetensors only: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load, save_file

from .bundle_files import (BUNDLE_FILES, CARD_FILE, CONFIG_FILE, FORMAT_VERSION, STORAGE_DTYPE_NAMES,  # noqa: F401
                           TOKENIZER_FILE, WEIGHTS_FILE, BundleError, bundle_digest, content_digest, parse_config,
                           parse_tokenizer)
from .config import ModelConfig
from .model import GPT
from .prompt import DEFAULT_FORMAT, FIM_FORMATS
from .tokenizer import Tokenizer

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
assert tuple(STORAGE_DTYPES) == STORAGE_DTYPE_NAMES


@dataclass
class Bundle:
    config: ModelConfig
    tokenizer: Tokenizer
    model: GPT
    card: dict = field(default_factory=dict)
    prompt_format: str = DEFAULT_FORMAT
    path: Path | None = None
    digest: str = ""  # of the bytes of the files read (content_digest): tells a touched bundle from a new one


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


# what a bundle's small files may weigh; the weights are checked against config.json instead
SIZE_LIMITS = {CONFIG_FILE: 1 << 20, TOKENIZER_FILE: 256 << 20, CARD_FILE: 1 << 30}
WEIGHT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}  # safetensors names of the float dtypes
MAX_HEADER = 100 << 20
STABLE_TRIES, STABLE_WAIT = 25, 0.2  # a bundle being copied is read again, for up to 5 s


class _Changed(Exception):
    """The bundle changed while it was read (a copy or a swap in progress): read it again."""


def _expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a bundle must hold, from a model built without memory."""
    with torch.device("meta"):  # no memory, no values (on the meta device torch.nn.init's functions would
        model = GPT(config, init=False)  # run as Python decompositions that import torch._dynamo: seconds)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not (config.tie_embeddings and k == "lm_head.weight")}


def _check_weights_header(f, size: int, file: Path, config: ModelConfig) -> int:
    """Check the safetensors header (names, shapes, dtypes, offsets) against config.json before any
    tensor is read; returns the header length."""
    head = f.read(8)
    n = int.from_bytes(head, "little")
    plausible = len(head) == 8 and 2 <= n <= min(MAX_HEADER, size - 8)
    # a header length whose low byte is 0x80 starts like a pickle: only an implausible length is one
    if not plausible and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise BundleError(f"{file}: this is a pickle/zip checkpoint, not safetensors; refusing to load it")
    if len(head) < 8:
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt (no header)")
    if not plausible:
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt (header size {n})")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, RecursionError):
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt (bad header)") from None
    if not isinstance(header, dict):
        raise BundleError(f"{file}: not a readable safetensors file (bad header)")
    header.pop("__metadata__", None)
    expected = _expected_tensors(config)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise BundleError(f"{file}: tensors do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    end = 0
    for name, shape in expected.items():
        info = header[name]
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in WEIGHT_DTYPES:
            raise BundleError(f"{file}: tensor {name} has dtype {dtype!r}; weights must be floating point "
                              f"({', '.join(WEIGHT_DTYPES)})")
        if tuple(info.get("shape") or ()) != shape:
            raise BundleError(f"{file}: tensor {name} has shape {tuple(info.get('shape') or ())}, "
                              f"config.json implies {shape}")
        offsets = info.get("data_offsets")
        numel = 1
        for dim in shape:
            numel *= dim
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or offsets[1] - offsets[0] != numel * WEIGHT_DTYPES[dtype] or offsets[0] < 0):
            raise BundleError(f"{file}: tensor {name} has bad data offsets {offsets!r}")
        end = max(end, offsets[1])
    if size != 8 + n + end:
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt "
                          f"({size} bytes, its header describes {8 + n + end})")
    return n


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _Directory:
    """A bundle directory opened once, so that a folder renamed over `path` meanwhile is not mixed in;
    remembers the identity of each file read, to tell whether anything changed since."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise BundleError(f"{path}: model bundle not found (expected a directory with "
                              f"{', '.join(BUNDLE_FILES)})") from None
        self.seen: dict[str, tuple] = {}

    def close(self) -> None:
        os.close(self.fd)

    def still_the_same(self) -> bool:
        try:
            if _identity(os.stat(self.path))[:2] != _identity(os.fstat(self.fd))[:2]:
                return False
            return all(_identity(os.stat(name, dir_fd=self.fd)) == key for name, key in self.seen.items())
        except OSError:
            return False

    def check_complete(self) -> None:
        """Raises BundleError for a missing file (_Changed if the bundle changed meanwhile)."""
        for name in BUNDLE_FILES:
            if not _exists_at(self.fd, name):
                if not self.still_the_same():
                    raise _Changed()
                raise BundleError(f"{self.path / name}: missing file; the bundle is incomplete")

    def open_member(self, name: str):
        """(binary file, size) of a regular file of the bundle."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=self.fd)  # a FIFO must not block
        except FileNotFoundError:
            if not self.still_the_same():
                raise _Changed() from None
            raise BundleError(f"{self.path / name}: missing file; the bundle is incomplete") from None
        f = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise BundleError(f"{self.path / name}: not a regular file")
        self.seen[name] = _identity(st)
        return f, st.st_size

    def read_small(self, name: str) -> bytes:
        f, size = self.open_member(name)
        with f:
            if size > SIZE_LIMITS[name]:
                raise BundleError(f"{self.path / name}: {size} bytes, more than a bundle's {name} may have "
                                  f"({SIZE_LIMITS[name]})")
            return f.read(SIZE_LIMITS[name] + 1)

    def read_weights(self, config: ModelConfig) -> bytes:
        """The weights file, once its header agrees with `config`. Raises _Changed if any file read so
        far changed meanwhile."""
        f, size = self.open_member(WEIGHTS_FILE)
        with f:
            _check_weights_header(f, size, self.path / WEIGHTS_FILE, config)
            f.seek(0)
            data = f.read()
        if not self.still_the_same():
            raise _Changed()
        return data


def _read_snapshot(path: Path, device, dtype) -> Bundle:
    """One attempt at reading every file of the bundle from the same directory. Raises _Changed if
    anything changed."""
    directory = _Directory(path)
    try:
        directory.check_complete()
        config_bytes = directory.read_small(CONFIG_FILE)
        config, raw = parse_config(config_bytes, path / CONFIG_FILE)
        tokenizer_bytes = directory.read_small(TOKENIZER_FILE)
        tokenizer = parse_tokenizer(tokenizer_bytes, path / TOKENIZER_FILE, config)
        card_bytes = directory.read_small(CARD_FILE)
        try:
            card = msgpack.unpackb(card_bytes, raw=False)
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            raise BundleError(f"{path / CARD_FILE}: corrupt data card ({type(exc).__name__}: {exc})") from None
        weights = directory.read_weights(config)
        files = {CONFIG_FILE: config_bytes, TOKENIZER_FILE: tokenizer_bytes, CARD_FILE: card_bytes, WEIGHTS_FILE: weights}
        digest = content_digest([files[name] for name in BUNDLE_FILES])
        state = _load_weights(weights, path / WEIGHTS_FILE)  # the bytes go after it
        del weights, files
        model = GPT(config, init=False)  # every weight comes next (_check_weights_header saw them all)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
        model.to(device=device, dtype=dtype).eval()
        return Bundle(config, tokenizer, model, card if isinstance(card, dict) else {},
                      raw.get("prompt_format", DEFAULT_FORMAT), path, digest)
    except BundleError:
        if not directory.still_the_same():
            raise _Changed() from None
        raise
    finally:
        directory.close()


def _load_weights(data: bytes, file: Path) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes; raises BundleError for unreadable or non-finite ones."""
    try:
        state = safetensors_load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt ({exc})") from None
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise BundleError(f"{file}: tensor {name} holds NaN or infinite values")
    return state


def _exists_at(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def load_bundle(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Bundle:
    """Read and check a bundle: config.json first (every field's type and range), then the weights'
    header against it, before anything is allocated. A bundle that changes while it is read (being
    copied, or a folder renamed over `path`) is read again once it holds still."""
    path = Path(path).expanduser()
    for attempt in range(STABLE_TRIES):
        try:
            return _read_snapshot(path, device, dtype)
        except _Changed:
            time.sleep(STABLE_WAIT)
    raise BundleError(f"{path}: the bundle kept changing while it was read; try again once it is written")
