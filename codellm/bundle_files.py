"""What a model bundle folder holds, read without torch: the file names, every file read and checked
(config, tokenizer, data card, the weights' header), and the content digest that tells one bundle's
bytes from another's. codellm.bundle makes torch tensors of the weights; codellm.fold folds them for
codellm.kernel_engine, which answers from a bundle before torch has loaded."""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from .config import ModelConfig
from .prompt import DEFAULT_FORMAT, FIM_FORMATS
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "tokenizer.json", "model.safetensors", "data.msgpack"
BUNDLE_FILES = (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CARD_FILE)
STORAGE_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int8")
# int8 storage: each matrix (embedding, projections) as int8 with a float32 scale per row, SCALE_SUFFIX
# after its name; norm weights stay float (codellm.bundle.quantise_rows)
QUANTISED, SCALE_SUFFIX = "int8", ".scale"
# the smallest row scale the writer gives (a row of zeros: its largest magnitude floored at 1e-12, / 127),
# less float32 rounding
MIN_ROW_SCALE = 1e-12 / 127 * (1 - 1e-6)


class BundleError(ValueError):
    """A model bundle is missing, incomplete or corrupt. The message names the file and the problem."""


def quantised_fault(smallest_entry: int, smallest_scale: float) -> str | None:
    """Why an int8 matrix, given its smallest entry and smallest row scale, is not one the writer makes
    (entries in -127..127; row scales finite and at least MIN_ROW_SCALE), or None. A zero, negative or
    subnormal scale would load silently as another model: zero rows, or rows turned around."""
    if smallest_entry < -127:
        return "holds -128, outside the -127..127 the writer uses"
    if not smallest_scale >= MIN_ROW_SCALE:  # NaN fails this too
        return f"has a row scale of {smallest_scale:.3g}; row scales are positive, at least {MIN_ROW_SCALE:.3g}"
    return None


def content_digest(files: list[bytes]) -> str:
    """BLAKE2b of a bundle's files, in BUNDLE_FILES order (each length-prefixed)."""
    h = hashlib.blake2b(digest_size=16)
    for data in files:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def bundle_digest(path: str | Path, names: tuple[str, ...] = BUNDLE_FILES) -> str | None:
    """content_digest of the bundle files at `path` (`names`, all by default) as they are now; None if one
    cannot be read."""
    try:
        return content_digest([(Path(path) / name).read_bytes() for name in names])
    except OSError:
        return None


def model_digest(path: str | Path) -> str | None:
    """bundle_digest of the files that make the model (config, tokenizer, weights): the same after an
    evaluation writes its figures into the data card."""
    return bundle_digest(path, (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE))


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


def storage_of(raw: dict) -> str:
    """The storage type config.json names (parse_config checked it; float32 where it names none)."""
    return raw.get("storage_dtype", "float32")


def parse_tokenizer(data: bytes, file: Path, config: ModelConfig) -> Tokenizer:
    """The tokenizer of tokenizer.json bytes, checked against `config`; raises BundleError naming `file`."""
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        raise BundleError(f"{file}: not a valid tokenizer ({exc})") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(f"{file}: vocabulary has {tokenizer.vocab_size} tokens but "
                          f"config.json says vocab_size {config.vocab_size}")
    if max(tokenizer.hf.get_vocab().values(), default=-1) >= config.vocab_size:  # ids with gaps between them
        raise BundleError(f"{file}: token ids reach past vocab_size {config.vocab_size}")
    return tokenizer


# ------------------------------------------------------------------ reading a bundle's files, checked

# what a bundle's small files may weigh; the weights are checked against config.json instead
SIZE_LIMITS = {CONFIG_FILE: 1 << 20, TOKENIZER_FILE: 256 << 20, CARD_FILE: 256 << 20}
CARD_ITEMS = 1 << 20  # entries of one list or map of the data card: a card of tiny maps would fill memory
WEIGHT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}  # safetensors names of the float dtypes
MAX_HEADER = 1 << 20  # a bundle's header names a few hundred tensors: a few tens of kB
STABLE_TRIES, STABLE_WAIT = 25, 0.2  # a bundle being copied is read again, for up to 5 s


@dataclass
class BundleFiles:
    """A bundle's four files as read at one moment, each checked: the config, the tokenizer, the data
    card, and the weights' header (names, shapes, dtypes, offsets) against the config. The tensors
    themselves are read by whoever needs them, both through the safetensors library's own parser, which
    refuses what JSON alone allows (NaN, duplicate keys): codellm.bundle with torch, codellm.fold with NumPy."""
    path: Path
    files: dict[str, bytes]  # file name -> bytes
    config: ModelConfig
    raw: dict  # config.json as a whole
    tokenizer: Tokenizer
    card: dict
    digest: str  # content_digest of the files


def expected_weights(config: ModelConfig, storage: str = "float16") -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors a bundle's model.safetensors holds (codellm.model.GPT's state dict,
    less lm_head.weight where the embeddings are tied; with `storage` int8, each matrix's row scales too)."""
    C, F, D = config.d_model, config.mlp_ratio * config.d_model, config.head_dim
    shapes = {"embed.weight": (config.vocab_size, C), "norm.weight": (C,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    for i in range(config.n_layer):
        block = {"attn.qkv.weight": (3 * C, C), "attn.proj.weight": (C, C), "attn_norm.weight": (C,),
                 "mlp.up.weight": (F, C), "mlp.down.weight": (C, F), "mlp_norm.weight": (C,)}
        if config.qk_norm:
            block.update({"attn.q_norm.weight": (D,), "attn.k_norm.weight": (D,)})
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    if storage == QUANTISED:
        shapes.update({name + SCALE_SUFFIX: shape[:1] for name, shape in list(shapes.items()) if len(shape) == 2})
    return shapes


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_weights_header(f, size: int, file: Path, config: ModelConfig, storage: str = "float16") -> int:
    """Check the safetensors header of the open weights file `f` (`size` bytes) against `config` and its
    `storage` type: the tensors config.json implies and no others, each of its shape and a float dtype
    (int8 for a matrix stored so), laid end to end over the whole file. Returns the header length;
    raises BundleError naming `file`."""
    head = f.read(8)
    n = int.from_bytes(head, "little")
    plausible = len(head) == 8 and 2 <= n <= min(MAX_HEADER, size - 8)
    # a header length whose low byte is 0x80 starts like a pickle: only an implausible length is one
    if not plausible and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise BundleError(f"{file}: this is a pickle/zip checkpoint, not safetensors; refusing to load it")
    if not plausible:
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt "
                          f"({'no header' if len(head) < 8 else f'header size {n}'})")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, RecursionError):
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt (bad header)") from None
    meta = header.pop("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BundleError(f"{file}: not a readable safetensors file (bad header)")
    expected = expected_weights(config, storage)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise BundleError(f"{file}: tensors do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    quantised = storage == QUANTISED
    spans = sorted(_tensor_span(name, header[name], shape, file, quantised and len(shape) == 2)
                   for name, shape in expected.items())
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise BundleError(f"{file}: tensor {name} has bad data offsets (not where the one before ends)")
        end = stop
    if size != 8 + n + end:
        raise BundleError(f"{file}: not a readable safetensors file, truncated or corrupt "
                          f"({size} bytes, its header describes {8 + n + end})")
    return n


def _tensor_span(name: str, info, shape: tuple[int, ...], file: Path, int8: bool = False) -> tuple[int, int, str]:
    """(begin, end, name) of a tensor's bytes after the header, once its dtype (I8 where `int8`, else a
    float type) and shape are checked."""
    dtype = info.get("dtype") if isinstance(info, dict) else None
    allowed = {"I8": 1} if int8 else WEIGHT_DTYPES
    if not isinstance(dtype, str) or dtype not in allowed:
        raise BundleError(f"{file}: tensor {name} has dtype {dtype!r}; " + (
            "a matrix of an int8 bundle must be I8" if int8 else f"weights must be floating point ({', '.join(WEIGHT_DTYPES)})"))
    got = info.get("shape")
    if not isinstance(got, list) or not all(_is_int(d) for d in got) or tuple(got) != shape:
        raise BundleError(f"{file}: tensor {name} has shape {got!r}, config.json implies {shape}")
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or offsets[0] < 0 or offsets[1] - offsets[0] != math.prod(shape) * allowed[dtype]):
        raise BundleError(f"{file}: tensor {name} has bad data offsets {offsets!r}")
    return offsets[0], offsets[1], name


class _Changed(Exception):
    """The bundle changed while it was read (a copy or a swap in progress): read it again."""


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
        except OSError as exc:  # no permission, a symlink loop, ...
            raise BundleError(f"{path}: model bundle not readable ({exc.strerror or exc})") from None
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
        """Raises BundleError for a missing file, or a folder with none of them (_Changed if the bundle
        changed meanwhile)."""
        missing = [name for name in BUNDLE_FILES if not _exists_at(self.fd, name)]
        if missing and not self.still_the_same():
            raise _Changed()
        if len(missing) == len(BUNDLE_FILES):  # a folder of something else (a folder of scripts, say)
            raise BundleError(f"{self.path}: no model bundle in this folder (expected {', '.join(BUNDLE_FILES)})")
        if missing:
            raise BundleError(f"{self.path / missing[0]}: missing file; the bundle is incomplete")

    def open_member(self, name: str):
        """(binary file, size) of a regular file of the bundle."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=self.fd)  # a FIFO must not block
        except FileNotFoundError:
            if not self.still_the_same():
                raise _Changed() from None
            raise BundleError(f"{self.path / name}: missing file; the bundle is incomplete") from None
        except OSError as exc:  # no permission, a symlink loop, ...
            raise BundleError(f"{self.path / name}: not readable ({exc.strerror or exc})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO, a device
            os.close(fd)
            raise BundleError(f"{self.path / name}: not a regular file")
        self.seen[name] = _identity(st)
        return os.fdopen(fd, "rb"), st.st_size

    def read_small(self, name: str) -> bytes:
        f, size = self.open_member(name)
        with f:
            if size > SIZE_LIMITS[name]:
                raise BundleError(f"{self.path / name}: {size} bytes, more than a bundle's {name} may have "
                                  f"({SIZE_LIMITS[name]})")
            return f.read(SIZE_LIMITS[name] + 1)

    def read_weights(self, config: ModelConfig, storage: str) -> bytes:
        """The weights file, once its header agrees with `config` and `storage`. Raises _Changed if any
        file read so far changed meanwhile."""
        f, size = self.open_member(WEIGHTS_FILE)
        with f:
            check_weights_header(f, size, self.path / WEIGHTS_FILE, config, storage)
            f.seek(0)
            data = f.read()
        if not self.still_the_same():
            raise _Changed()
        return data


def _exists_at(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _read_snapshot(path: Path) -> BundleFiles:
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
            card = msgpack.unpackb(card_bytes, raw=False, max_array_len=CARD_ITEMS, max_map_len=CARD_ITEMS)
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            raise BundleError(f"{path / CARD_FILE}: corrupt data card ({type(exc).__name__}: {exc})") from None
        weights = directory.read_weights(config, storage_of(raw))
        files = {CONFIG_FILE: config_bytes, TOKENIZER_FILE: tokenizer_bytes, CARD_FILE: card_bytes, WEIGHTS_FILE: weights}
        return BundleFiles(path, files, config, raw, tokenizer, card if isinstance(card, dict) else {},
                           content_digest([files[name] for name in BUNDLE_FILES]))
    except OSError as exc:  # a read that failed (EIO from a /proc file, a disk error)
        raise BundleError(f"{path}: a file of the bundle could not be read ({exc.strerror or exc})") from None
    except MemoryError:
        raise BundleError(f"{path}: the bundle is too large for this machine's memory") from None
    except BundleError:
        if not directory.still_the_same():
            raise _Changed() from None
        raise
    finally:
        directory.close()


def read_bundle_files(path: str | Path) -> BundleFiles:
    """Read and check a bundle's files (BundleFiles): config.json first (every field's type and range),
    then the weights' header against it, before the weights are read. A bundle that changes while it is
    read (being copied, or a folder renamed over `path`) is read again once it holds still. Raises
    BundleError naming the file at fault."""
    path = Path(path).expanduser()
    for _ in range(STABLE_TRIES):
        try:
            return _read_snapshot(path)
        except _Changed:
            time.sleep(STABLE_WAIT)
    raise BundleError(f"{path}: the bundle kept changing while it was read; try again once it is written")
