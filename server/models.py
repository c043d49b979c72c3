"""The resident model and its hot-swap: a watched bundle directory replaced atomically when a new,
valid bundle appears; an invalid or half-written one is rejected and the old model keeps serving."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from codellm.bundle import BundleError, load_bundle
from codellm.defaults import HOW_TO_GET_A_MODEL, default_bundle_path
from codellm.device import choose_device
from codellm.engine import Engine

log = logging.getLogger("codellm.server")


class ModelHolder:
    """Owns the engine and the one thread that runs torch. `engine` is swapped as one reference
    assignment, so a request that already took the old engine finishes on it while the next request
    gets the new one.

    Every torch operation of the server, loading included, runs on `executor`: once two threads have
    run parallel CPU kernels, each keeps its own OpenMP worker team and the teams contend for the cores
    (a completion was measured 3-4x slower that way)."""

    def __init__(self, notify: Callable[[str, bool], None]):
        self.notify = notify  # (message, is_error) -> shown to the user
        self.engine: Engine | None = None
        self.path: Path | None = None
        self.device: str | None = None
        self.threads: int | None = None
        self.precision = "auto"  # codellm.engine.PRECISIONS
        self.load_error: str | None = None
        self.version = 0  # bumped on every model change; results of an older model are not reused
        self._watch_stop: threading.Event | None = None
        self._load_lock = threading.Lock()
        self.quiet = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codellm-model")

    def configure(self, path: str | None, device: str | None, threads: int | None, quiet: bool = False) -> None:
        """Load the model at `path` (None: $CODELLM_MODEL or the packaged default) and watch it.
        quiet: record a failure without telling the user yet (before the client is initialized)."""
        self.quiet = quiet
        try:
            resolved = Path(path).expanduser().resolve() if path else default_bundle_path()
        except BundleError as exc:
            self._fail(str(exc))
            return
        if resolved == self.path and device == self.device and threads == self.threads and self.engine:
            return
        self.path, self.device, self.threads = resolved, device, threads
        self.reload(initial=True)
        self._watch(resolved)

    def reload(self, initial: bool = False) -> bool:
        with self._load_lock:
            try:
                bundle, engine = self.executor.submit(self._build).result()
            except (BundleError, ValueError, OSError) as exc:
                if initial or self.engine is None:
                    self._fail(str(exc))
                else:
                    self.notify(f"codellm: new model rejected, still serving the previous one: {exc}", True)
                return False
            self.engine = engine
            self.version += 1
            self.load_error = None
            log.info("model loaded from %s (%.2fM parameters, %s, decode steps: %s)", self.path,
                     bundle.model.num_params() / 1e6, engine.device, engine.decoder.step_name)
            if not initial:
                self.notify(f"codellm: switched to the new model in {self.path}", False)
            return True

    def _build(self) -> tuple:
        bundle = load_bundle(self.path, device=choose_device(self.device))
        return bundle, Engine(bundle, self.device, self.threads, self.precision)

    def _fail(self, message: str) -> None:
        if HOW_TO_GET_A_MODEL not in message:
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
        """Watch the bundle folder and its parent's entries (not recursively: the parent may be a home
        directory). A bundle replaced by rename is a new folder, so the watch is then set up again."""
        try:
            from watchfiles import watch
        except ImportError:
            log.warning("watchfiles not installed: the model is not reloaded on change")
            return
        prefix = str(path)

        def relevant(_change, changed: str) -> bool:
            return changed == prefix or changed.startswith(prefix + "/") or \
                Path(changed).name.startswith(f".{path.name}.")

        while not stop.is_set():
            if not path.parent.is_dir():
                return
            watched = [path.parent] + ([path] if path.is_dir() else [])
            inode = path.stat().st_ino if path.is_dir() else None
            try:
                for _changes in watch(*watched, watch_filter=relevant, stop_event=stop, debounce=400, step=100,
                                      recursive=False, raise_interrupt=False):
                    if stop.is_set():
                        return
                    if path.is_dir():
                        self.reload()
                    if (path.stat().st_ino if path.is_dir() else None) != inode:
                        break  # the folder was replaced: watch the new one
                else:
                    return
            except Exception as exc:  # the watcher must never take the server down
                log.warning("model watcher stopped: %s", exc)
                return

    def stop(self) -> None:
        if self._watch_stop:
            self._watch_stop.set()
        self.executor.shutdown(wait=False, cancel_futures=True)
