"""Completion without torch: the C decode step (codellm/_decode_kernel.c) over a start file.

A start file holds what the C step reads (the embedding, the packed int8 matrices with their scales,
the rotary tables), folded from the bundle's weights with NumPy (codellm.fold) the first time a bundle
is opened on a CPU with the C step, and kept in the user's cache under the bundle's content digest.
`import torch` takes 1.5-2 s; a server answers its first requests with a KernelEngine (a
fraction of that to open) while torch loads, then moves to codellm.engine.Engine, whose prompt reading
is faster on long prompts. Both compute a decode step the same way; prompts are read here by decode
calls of 16 tokens.
"""
from __future__ import annotations

import array
import ctypes
import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path

from .bundle_files import WEIGHTS_FILE, BundleFiles, read_bundle_files
from .completion import Completer
from .kernel import BLOCK, MAX_TOKENS, ONE_THREAD_BELOW, START_FORMAT, available
from .kvcache import TokenCache
from .lookahead import GUESS_TOKENS
from .prompt import DEFAULT_FORMAT

log = logging.getLogger(__name__)

NEG_INF = float("-inf")
START_FILES_KEPT = 4  # start files kept, the most recently used (about 21 MB each for 7M parameters)
FLOAT_BYTES = 4


STALE_TEMP_S = 600  # a temporary file this old is left by a writer that was killed
START_NAME = re.compile(r"[0-9a-f]{32}(\.v\d+)?\.safetensors")  # start files of any version, and no other file
TEMP_NAME = re.compile(r"\.[0-9a-f]{32}\.v\d+\.safetensors\.\d+\.\d+\.tmp")  # save_start_file's temporaries


def start_dir() -> Path:
    """Where start files are kept: $XDG_CACHE_HOME/codellm/start, else ~/.cache/codellm/start (a relative
    $XDG_CACHE_HOME is ignored, as the XDG base directory specification says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "codellm" / "start"


def start_file(digest: str) -> Path:
    """The start file of the bundle whose content digest is `digest`, in this version's layout: the
    layout is in the name, so that two installed versions sharing the cache keep a file each."""
    return start_dir() / f"{digest}.v{START_FORMAT}.safetensors"


def fold_start_file(read: BundleFiles) -> bytes | None:
    """The start file's bytes of a bundle read and checked (codellm.fold), or None where it cannot be
    folded (NumPy missing, a weight that is not finite): the torch engine then reads the bundle and says
    what is wrong. Never raises."""
    started = time.perf_counter()
    try:
        from .fold import fold

        data = fold(read.files[WEIGHTS_FILE], read.config, read.digest)
    except Exception as exc:  # noqa: BLE001 - the torch engine reports on the bundle
        log.info("start file not folded (%s: %s): the model loads with torch", type(exc).__name__, exc)
        return None
    log.info("start file folded in %.2f s", time.perf_counter() - started)
    return data


def save_start_file(path: Path, data: bytes) -> None:
    """Write a start file's bytes to `path` (through a temporary file: a reader never sees half of it)
    and keep only the START_FILES_KEPT newest. Never raises: a start file that cannot be written (a full
    disk, a read-only cache, a cache folder that is a file) costs each start a fold."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        prune_start_files(path)
    except OSError as exc:
        log.warning("start file not written to %s (%s): each start folds the model again "
                    "($XDG_CACHE_HOME says where start files go)", path.parent, exc.strerror or exc)


def prune_start_files(keep: Path) -> None:
    """Delete the start files (ours, named DIGEST.safetensors) past the START_FILES_KEPT most recently
    used, and the temporary files of writers killed STALE_TEMP_S ago or more."""
    def age(path: Path) -> float:  # another server may delete a file meanwhile
        try:
            return time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    files = sorted((p for p in keep.parent.glob("*.safetensors") if p != keep and START_NAME.fullmatch(p.name)),
                   key=age)
    for old in files[START_FILES_KEPT - 1:]:
        old.unlink(missing_ok=True)
    for tmp in keep.parent.glob(".*.safetensors.*.tmp"):
        if TEMP_NAME.fullmatch(tmp.name) and age(tmp) > STALE_TEMP_S:
            tmp.unlink(missing_ok=True)


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a folder that cannot be searched, a name too long: no start file to use
        return False


def touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache: the file is still used
        pass


class StartFile:
    """A start file read into memory (not mapped: a file cut short under a mapping kills the process
    with SIGBUS), every tensor checked against the model's sizes before the C step is given an address
    in it. Raises ValueError for a file of another bundle, of another format, or a damaged one."""

    def __init__(self, path: Path, digest: str, sizes: tuple, data: bytes | None = None):
        """`data`: the file's bytes where they are at hand (just folded), else the file at `path` is read."""
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        self.data = bytearray(data)  # writable: ctypes takes addresses of writable buffers only
        self._check(path, digest, sizes)

    def _check(self, path: Path, digest: str, sizes: tuple) -> None:
        if len(self.data) < 8:
            raise ValueError(f"{path}: truncated")
        n = int.from_bytes(self.data[:8], "little")
        if n > len(self.data) - 8:
            raise ValueError(f"{path}: truncated header")
        header = json.loads(self.data[8:8 + n])
        meta = header.pop("__metadata__", {})
        if meta.get("format") != START_FORMAT:
            raise ValueError(f"{path}: a start file of another format ({meta.get('format')!r})")
        if meta.get("digest") != digest or tuple(json.loads(meta.get("sizes", "[]"))) != tuple(sizes):
            raise ValueError(f"{path}: not the start file of this bundle")
        self.eps = tuple(json.loads(meta["eps"]))
        self.parameters = int(meta.get("parameters", 0))
        self.data_start, data_len = 8 + n, len(self.data) - 8 - n
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.data))
        self.header = header
        for name, (dtype, shape) in expected_tensors(sizes).items():
            entry = header.get(name)
            if not entry or entry.get("dtype") != dtype or tuple(entry.get("shape", ())) != shape:
                raise ValueError(f"{path}: tensor {name} missing or of another shape")
            begin, end = entry["data_offsets"]
            want = math.prod(shape) * (FLOAT_BYTES if dtype == "F32" else 1)
            if not (isinstance(begin, int) and isinstance(end, int)) or \
                    not 0 <= begin <= end <= data_len or end - begin != want or \
                    (dtype == "F32" and (self.data_start + begin) % FLOAT_BYTES):
                raise ValueError(f"{path}: tensor {name} outside the file or misaligned")

    def address(self, name: str) -> int:
        return self.base + self.data_start + self.header[name]["data_offsets"][0]


def expected_tensors(sizes: tuple) -> dict[str, tuple[str, tuple]]:
    """Name -> (safetensors dtype, shape) of every tensor a start file of a model of `sizes` holds
    (codellm.kernel.KernelStep: sizes = n_layer, n_head, d_model, d_ff, vocab, context, qk_norm)."""
    n_layer, n_head, C, F, V, context, _ = sizes
    D = C // n_head
    shapes = {"embed": ("F32", (V, C))}
    layer = [(3 * C, C), (C, C), (F, C), (C, F)]
    for i in range(4 * n_layer + 1):
        rows, columns = layer[i % 4] if i < 4 * n_layer else (V, C)
        shapes[f"matrix.{i}.weight"] = ("I8", (-(-rows // BLOCK), columns, BLOCK))
        shapes[f"matrix.{i}.scale"] = ("F32", (rows,))
    shapes.update({f"rotary.{i}": ("F32", (context, 2, 1, D)) for i in range(2 * n_layer)})
    return shapes


class KernelCache(TokenCache):
    """Keys and values for every position, float32 in one plain buffer: (n_layer, keys|values, n_head,
    context, head_dim), the layout of the C step's caches."""

    def __init__(self, n_layer: int, n_head: int, context: int, head_dim: int):
        super().__init__()
        self.layer_bytes = n_head * context * head_dim * FLOAT_BYTES
        self.storage = bytearray(2 * n_layer * self.layer_bytes)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.storage))
        self.addresses = [base + i * self.layer_bytes for i in range(2 * n_layer)]


class KernelEngine(Completer):
    """Completion (codellm.completion.Completer) with the C step alone, from a bundle's start file.
    Open one with `KernelEngine.open(path)`."""

    device = "cpu"
    precision = "auto"

    def __init__(self, read: BundleFiles, start: Path, threads: int | None = None, data: bytes | None = None):
        """`read`: the bundle; `start`: its start file, whose bytes are `data` where they are at hand."""
        from . import _decode_kernel

        self.path = read.path
        self.config, self.tokenizer, self.digest = read.config, read.tokenizer, read.digest
        self.prompt_format = read.raw.get("prompt_format", DEFAULT_FORMAT)
        cfg = self.config
        sizes = (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.mlp_ratio * cfg.d_model, cfg.vocab_size,
                 cfg.context_length, int(cfg.qk_norm))
        self.start = StartFile(start, self.digest, sizes, data)
        self.cache = KernelCache(cfg.n_layer, cfg.n_head, cfg.context_length, cfg.head_dim)
        matrices = [(self.start.address(f"matrix.{i}.weight"), self.start.address(f"matrix.{i}.scale"),
                     shape[0], self.start.header[f"matrix.{i}.weight"]["shape"][1])
                    for i in range(4 * cfg.n_layer + 1)
                    for shape in [self.start.header[f"matrix.{i}.scale"]["shape"]]]
        self._kernel = _decode_kernel
        self._model = _decode_kernel.new_model(
            sizes, self.start.eps, self.start.address("embed"), matrices,
            [self.start.address(f"rotary.{i}") for i in range(2 * cfg.n_layer)], self.cache.addresses)
        weights = sum(rows * columns for _, _, rows, columns in matrices)
        # as codellm.kernel.KernelStep: one thread for small models, else the threads asked for (0: OpenMP's)
        self.threads = 1 if weights < ONE_THREAD_BELOW else threads or 0
        self.logits = array.array("f", bytes(FLOAT_BYTES * MAX_TOKENS * cfg.vocab_size))
        self.guess_tokens = GUESS_TOKENS
        self.lock = threading.Lock()
        self.init_token_sets()

    @classmethod
    def open(cls, path: str | Path, threads: int | None = None) -> "KernelEngine | None":
        """The engine for the bundle at `path` (decode steps of large models on `threads`), or None where
        it cannot answer: the C step not built or not for this CPU, a bundle that fails its checks or
        cannot be folded (the torch engine then loads it and reports the problem). A missing or damaged
        start file is folded (codellm.fold: a fraction of a second) and written for the next start, where
        that can be done. Never raises."""
        if not available():
            return None
        try:
            read = read_bundle_files(path)
        except Exception:  # noqa: BLE001 - the torch engine reads the bundle again and says what is wrong
            return None
        start = start_file(read.digest)
        if is_file(start):
            touch(start)  # the newest used: kept when others go
            engine = cls._from_start_file(read, start, threads)
            if engine is not None:
                return engine
        data = fold_start_file(read)
        if data is None:
            return None
        save_start_file(start, data)
        return cls._from_start_file(read, start, threads, data)

    @classmethod
    def _from_start_file(cls, read: BundleFiles, start: Path, threads: int | None, data: bytes | None = None):
        """The engine over the start file `start` (bytes `data`, else read from it), or None where it fails
        its checks (then deleted)."""
        try:
            return cls(read, start, threads, data)
        except Exception as exc:  # noqa: BLE001 - a cache file: whatever is wrong with it, it is folded again
            log.warning("start file not used (%s: %s)", type(exc).__name__, exc)
            try:
                start.unlink(missing_ok=True)  # a damaged one would otherwise slow every start
            except OSError as error:
                log.warning("start file %s not deleted (%s)", start, error.strerror or error)
            return None

    @property
    def step_name(self) -> str:
        return f"C ({self._kernel.instructions()}), without torch"

    def num_params(self) -> int:
        return self.start.parameters

    # ------------------------------------------------------------------ model steps

    def run(self, tokens: list[int], pos: int, rows: bool = True) -> list[list[float]]:
        """Logits rows (len(tokens) of vocab floats) for 1-16 `tokens` at positions pos, pos+1, ...,
        their keys and values written to the cache (recording their ids is the caller's)."""
        self._kernel.decode(self._model, tokens, pos, self.logits.buffer_info()[0], self.threads)
        V = self.config.vocab_size
        return [self.logits[t * V:(t + 1) * V].tolist() for t in range(len(tokens))] if rows else []

    def prefill(self, ids: list[int], should_stop=None) -> tuple[list[float] | None, int]:
        """Logits after the prompt `ids` (at least one token), reading only what the cache lacks, 16
        tokens per call; returns (logits, how many tokens' keys and values were reused), or (None, reused)
        once `should_stop()` (polled between calls) is true. Raises ValueError for no tokens."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        reused = self.cache.reuse(ids[:-1])
        for start in range(reused, len(ids) - 1, MAX_TOKENS):
            if should_stop and start > reused and should_stop():
                return None, reused
            piece = ids[start:min(start + MAX_TOKENS, len(ids) - 1)]
            self.run(piece, start, rows=False)
            self.cache.append(piece)
        return self.decode_with_guess(ids[-1], [])[0], reused

    def decode_with_guess(self, token: int, guess: list[int]) -> list[list[float]]:
        rows = self.run([token, *guess], self.cache.position)
        self.cache.append([token, *guess])
        return rows

    # ------------------------------------------------------------------ logits (lists of floats)

    def argmax(self, logits: list[float]) -> int:
        return logits.index(max(logits))

    def probability(self, logits: list[float], token: int) -> float:
        top = max(logits)
        return math.exp(logits[token] - top) / math.fsum(math.exp(x - top) for x in logits)

    def probability_mass(self, logits: list[float], ids: list[int]) -> float:
        """The probability of any of `ids` under the (masked) logits."""
        top = max(logits)
        return math.fsum(math.exp(logits[i] - top) for i in ids) / math.fsum(math.exp(x - top) for x in logits)

    def ban(self, logits: list[float], ids: list[int]) -> list[float]:
        for i in ids:
            logits[i] = NEG_INF
        return logits

    def only(self, logits: list[float], ids: list[int]) -> list[float]:
        masked = [NEG_INF] * len(logits)
        for i in ids:
            masked[i] = logits[i]
        return masked
