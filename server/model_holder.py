"""The resident model and its hot-swap: a watched bundle directory replaced atomically when a new,
valid bundle appears; an invalid or half-written one is rejected and the old model keeps serving."""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codellm.engine import Engine
    from codellm.kernel_engine import KernelEngine
# codellm.bundle, .device and .engine import torch: they are imported where used, so that the server's
# start can answer before torch has loaded, or load it on the model thread while the rest loads (EarlyLoad)

log = logging.getLogger("codellm.server")
WARM_UP = "#!/bin/sh\n# copy the logs to the backup folder, then compress them\nset -eu\nfor f in /var/log/*.log; do\n    cp "


class ModelHolder:
    """Owns the engine and the one thread that runs torch. `engine` is swapped as one reference
    assignment, so a request that already took the old engine finishes on it while the next request
    gets the new one.

    Every torch operation of the server, loading included, runs on `executor`: once two threads have
    run parallel CPU kernels, each keeps its own OpenMP worker team and the teams contend for the cores
    (a completion was measured 3-4x slower that way)."""

    def __init__(self, notify: Callable[[str, bool], None], early: "EarlyLoad | None" = None):
        self.notify = notify  # (message, is_error) -> shown to the user
        self.engine: Engine | None = None
        self.path: Path | None = None
        self.device: str | None = None
        self.threads: int | None = None
        self.precision = "auto"  # codellm.engine.PRECISIONS
        self.load_error: str | None = None
        self.version = 0  # bumped on every model change; results of an older model are not reused
        self.stamp: tuple | None = None  # bundle_stamp of what is loaded
        self.seen_stamp: tuple | None = None  # bundle_stamp at the last load tried, loaded or not
        self._watch_stop: threading.Event | None = None
        self._load_lock = threading.Lock()
        self.quiet = False
        self.stopped = False  # set by stop(): the model thread takes no more work
        self.answered = threading.Event()  # set by the first completion the model gave (CompletionService)
        # a load started with the process, before the editor's settings came (codellm.server.cli)
        self.early = early
        self.executor = early.executor if early else new_model_thread()

    @property
    def started(self) -> "KernelEngine | None":
        """The engine without torch (codellm.kernel_engine) while it serves, until the torch engine replaces
        it; a reload replaces it even with the same files (the torch engine failed to load from them once)."""
        from codellm.kernel_engine import KernelEngine

        return self.engine if isinstance(self.engine, KernelEngine) else None

    def configure(self, path: str | None, device: str | None, threads: int | None, quiet: bool = False) -> None:
        """Load the model at `path` (None: $CODELLM_MODEL or the packaged default) and watch it.
        quiet: record a failure without telling the user yet (before the client is initialized)."""
        from codellm.bundle_files import BundleError

        self.quiet = quiet
        try:
            resolved = resolve_model_path(path)
        except (BundleError, OSError, ValueError) as exc:
            self._fail(str(exc))
            return
        if resolved == self.path and device == self.device and threads == self.threads and self.engine:
            if bundle_stamp(self.path) == self.stamp:
                self.load_error = None  # the settings name the model serving, as it is on disk
            return
        serving = (self.path, self.device, self.threads) if self.engine is not None else None
        self.path, self.device, self.threads = resolved, device, threads
        if not self.reload(initial=True) and serving is not None:
            self.path, self.device, self.threads = serving  # the model serving stays, watched where it is
            return
        self._watch(resolved)

    def reload(self, initial: bool = False) -> bool:
        """Load the bundle at self.path. A hot swap (not `initial`) of files that did not change, or while
        the folder is missing (between the two renames of a swap), does nothing."""
        with self._load_lock:
            from codellm.bundle_files import BundleError, bundle_digest

            stamp = bundle_stamp(self.path)
            self.seen_stamp = stamp
            if not initial and self.engine is not None and (stamp is None or stamp == self.stamp):
                return False
            if not initial and self.engine is not None and self.engine is not self.started \
                    and self.engine.digest and bundle_digest(self.path) == self.engine.digest:
                self.stamp = stamp  # files touched or copied over with the same bytes: nothing to load or say
                self.load_error = None  # what serves is what is on disk: a rejected swap's error is past
                log.info("model files at %s changed on disk with the same content: not reloaded", self.path)
                return False
            try:
                bundle, engine = self.executor.submit(self._build, stamp).result()
            except Exception as exc:  # noqa: BLE001 - whatever a bundle does, the old model keeps serving
                message = str(exc) if isinstance(exc, (BundleError, ValueError, OSError)) else \
                    f"{type(exc).__name__}: {exc}"
                if not initial and self.engine is not None and bundle_stamp(self.path) is None:
                    log.info("model folder gone while loading (a swap in progress?); waiting for it")
                elif self.engine is None:
                    self._fail(message, no_bundle=bundle_stamp(self.path) is None)
                elif initial:  # a settings change the new model failed: the one serving keeps serving
                    self.load_error = message
                    self.notify(f"codellm: the model settings were not applied ({message}); still serving "
                                "the previous model", True)
                else:
                    self.load_error = message  # in status until a model loads
                    self.notify(f"codellm: new model rejected, still serving the previous one: {message}", True)
                return False
            self.stamp = stamp
            same_model = self.engine is not None and bool(engine.digest) and engine.digest == self.engine.digest
            self.engine = engine
            self.version += 1
            self.load_error = None
            log.info("model loaded from %s (%.2fM parameters, %s, decode steps: %s)", self.path,
                     engine.num_params() / 1e6, engine.device, engine.step_name)
            if not initial and not same_model:  # same_model: the torch engine after the one without torch
                self.notify(f"codellm: switched to the new model in {self.path}", False)
            return True

    def _build(self, stamp: tuple | None) -> tuple:
        """(bundle, engine) read from self.path, whose bundle_stamp was `stamp` just before. The early load
        is taken if it read the same settings and the same files (a folder swapped since is read again;
        one missing now, half-way through a swap, keeps it: the watcher loads what comes)."""
        early, self.early = self.early, None
        if early is not None:
            try:
                settings, early_stamp, bundle, engine = early.future.result()  # done: it ran on this thread before
                if settings == (self.path, self.device, self.threads, self.precision) \
                        and stamp in (early_stamp, None):
                    if bundle is None:  # the engine without torch: the torch engine replaces it once loaded
                        early.load_torch_engine(lambda future: self._upgrade(engine, future), self.answered)
                    return bundle, engine
            except Exception:  # noqa: BLE001 - loaded again below, and the error reported from there
                pass
        return build_engine(self.path, self.device, self.threads, self.precision)

    def _upgrade(self, started: "KernelEngine", future) -> None:
        """Serve with the torch engine the early load built after `started`, unless another model or other
        settings came meanwhile. If it failed, `started` keeps serving and the next change of the model
        folder loads the torch engine (even with the same files)."""
        try:
            _bundle, engine = future.result()
        except Exception as exc:  # noqa: BLE001 - the engine serving keeps serving
            log.warning("the torch engine did not load (%s: %s); decode steps stay on the C step until the model "
                        "folder changes", type(exc).__name__, exc)
            return
        with self._load_lock:
            if self.engine is started and engine.digest == started.digest:
                # the same weights and decode steps (prompts read in bf16 there may tip a near tie): the
                # suggestions cached meanwhile stay
                self.engine = engine
                log.info("torch engine loaded: prompts are read with PyTorch, decode steps: %s", engine.step_name)

    def _fail(self, message: str, no_bundle: bool = True) -> None:
        """No model serves: say why, and where there is no bundle at all, how to get one."""
        from codellm.defaults import HOW_TO_GET_A_MODEL

        if no_bundle and HOW_TO_GET_A_MODEL not in message:
            message = f"{message}. {HOW_TO_GET_A_MODEL[0].upper()}{HOW_TO_GET_A_MODEL[1:]}"
        self.load_error = message
        log.warning("no model: %s", message)
        if not self.quiet:
            self.notify(f"codellm: {message}", True)

    def _watch(self, path: Path) -> None:
        if self._watch_stop:
            self._watch_stop.set()
        stop = threading.Event()
        self._watch_stop = stop
        thread = threading.Thread(target=self._watch_loop, args=(path, stop), daemon=True, name="codellm-watch")
        thread.start()

    def _watch_loop(self, path: Path, stop: threading.Event) -> None:
        """Watch the bundle folder, its parent's entries and, for a symlink, the folder it points to (not
        recursively: a parent may be a home directory). A bundle replaced by rename, or a symlink pointed
        elsewhere, is a new folder: the watch is then set up again. Nothing stops this loop but `stop`."""
        try:
            from watchfiles import watch
        except ImportError:
            log.warning("watchfiles not installed: the model is not reloaded on change")
            return
        while not stop.is_set():
            try:
                identity = folder_identity(path)
                target = path.resolve()
                watched = {p for p in (path.parent, target.parent) if p.is_dir()}
                watched |= {target} if target.is_dir() else set()
                if not watched:
                    stop.wait(1.0)
                    continue
                names = {path.name, target.name}
                tops = (str(path) + "/", str(target) + "/")

                def relevant(_change, changed: str) -> bool:
                    name = os.path.basename(changed)
                    return name in names or changed.startswith(tops) or \
                        any(name.startswith(f".{n}.") for n in names)

                for changes in watch(*sorted(watched), watch_filter=relevant, stop_event=stop, debounce=400,
                                     step=100, recursive=False, raise_interrupt=False, rust_timeout=WATCH_CHECK_MS,
                                     yield_on_timeout=True):
                    if stop.is_set():
                        return
                    if not changes and bundle_stamp(path) == self.seen_stamp:
                        continue  # a quiet second; a change made before the watch was set up is caught here
                    if path.is_dir():
                        self.reload()
                    if folder_identity(path) != identity:
                        break  # the folder was replaced or the link repointed: watch the new one
                else:
                    if not stop.is_set():
                        stop.wait(0.5)  # the watch ended (a watched folder went away): set it up again
            except Exception as exc:  # noqa: BLE001 - the watcher must never stop for good
                log.warning("model watcher: %s (%s); watching again", type(exc).__name__, exc)
                stop.wait(1.0)

    def serving(self) -> tuple:
        """(version, engine) of the model serving, for a run whose answers are kept under that version. The
        version is read first: a load sets the engine, then bumps the version, so the pair can hold a
        newer engine with an older version (its answers then never match) but never the reverse."""
        version = self.version
        return version, self.engine

    def stop(self) -> None:
        self.stopped = True
        if self._watch_stop:
            self._watch_stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)


WATCH_CHECK_MS = 1000  # with no event for this long, the watcher compares the files' stamps itself


def new_model_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="codellm-model")


def resolve_model_path(path: str | None) -> Path:
    """The bundle folder a model setting names: absolute, not resolved (a --model that is a symlink is
    followed to wherever it points later); None: $CODELLM_MODEL or the packaged default; `default` (where
    no folder of that name is here): the packaged default."""
    from codellm.defaults import bundle_arg, default_bundle_path

    return Path(os.path.abspath(bundle_arg(path))) if path else default_bundle_path()


def build_engine(path: Path, device: str | None, threads: int | None, precision: str) -> tuple:
    from codellm.bundle import load_bundle
    from codellm.device import choose_device
    from codellm.engine import Engine

    bundle = load_bundle(path, device=choose_device(device))
    engine = Engine(bundle, device, threads, precision)
    warm_up(engine)
    return bundle, engine


def warm_up(engine) -> None:
    """The first prompt read and steps of a process cost more (allocations, kernels' set-up): not on a keystroke."""
    try:
        engine.complete_detailed(WARM_UP, "\n", "line", max_new_tokens=4, clean=False)
    except Exception as exc:  # noqa: BLE001 - a request would meet the same error and report it
        log.info("warm-up failed: %s", type(exc).__name__)


TORCH_AFTER_S = 1.0  # after the start without torch, seconds before torch loads if no suggestion came first


class EarlyLoad:
    """The model loaded on the model thread from the moment the server starts, with the command line's
    settings, while the rest of the server loads and the editor starts and initialises: the client's
    `initialize` then finds it loaded (or loading) instead of starting the load. Not used if the editor's
    settings name another model, nor if the folder changed since it was read (its bundle_stamp, taken
    before reading, is kept for that); a failure is reported by the load `initialize` starts.

    Where the bundle has a start file (codellm.kernel_engine) and the settings are the C step's (CPU,
    precision auto), the engine first loaded is a KernelEngine, with no torch: `load_torch_engine` then
    imports torch on a thread of its own and builds the torch engine on the model thread."""

    def __init__(self, path: str | None, device: str | None, threads: int | None, precision: str):
        self.executor = new_model_thread()
        self.settings = (path, device, threads, precision)
        self.future = self.executor.submit(self._load, path, device, threads, precision)

    @staticmethod
    def _load(path, device, threads, precision) -> tuple:
        """(settings, bundle_stamp before reading, bundle or None for a KernelEngine, engine)."""
        resolved = resolve_model_path(path)
        stamp = bundle_stamp(resolved)
        if device in (None, "cpu") and precision == "auto":
            from codellm.kernel_engine import KernelEngine

            engine = KernelEngine.open(resolved, threads)
            if engine is not None:
                warm_up(engine)
                log.info("model read at start from %s; answering without torch until it loads", resolved)
                return (resolved, device, threads, precision), stamp, None, engine
        bundle, engine = build_engine(resolved, device, threads, precision)
        log.info("model read at start from %s", resolved)
        return (resolved, device, threads, precision), stamp, bundle, engine

    def load_torch_engine(self, done: Callable, answered: threading.Event) -> None:
        """Import torch on a thread of its own (the model thread goes on answering meanwhile), then build
        the torch engine on the model thread; `done(future)` is called with its (bundle, engine), on that
        thread of its own: never on the model thread, which a reload holding the holder's lock may be
        waiting for. The import starts once `answered` is set or TORCH_AFTER_S have passed: importing
        takes the interpreter's lock most of the time, and the first suggestion would wait twice as long."""
        def imports() -> None:
            answered.wait(TORCH_AFTER_S)
            try:
                import codellm.engine  # noqa: F401 - torch and the engine, imported off the model thread
                future = self.executor.submit(self._load_torch, *self.settings)
            except RuntimeError:  # the server stopped meanwhile
                return
            wait([future])
            done(future)

        threading.Thread(target=imports, daemon=True, name="codellm-torch-import").start()

    @staticmethod
    def _load_torch(path, device, threads, precision) -> tuple:
        return build_engine(resolve_model_path(path), device, threads, precision)


def folder_identity(path: Path) -> tuple | None:
    """Which folder `path` names now (following symlinks), or None."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino, str(path.resolve()))
    except OSError:
        return None


def bundle_stamp(path: Path | None) -> tuple | None:
    """What changes when any file of the bundle at `path` does; None where there is no folder."""
    from codellm.bundle_files import BUNDLE_FILES

    if path is None:
        return None
    folder = folder_identity(path)
    if folder is None:
        return None
    stamps = []
    for name in BUNDLE_FILES:
        try:
            st = os.stat(path / name)
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append(None)
    return (folder, tuple(stamps))
