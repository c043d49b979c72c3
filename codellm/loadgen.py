"""Background load for the benches (`--background N`): N busy processes, each spinning on one core the way
a browser tab, a build or a test run does on a person's laptop, started and ended by the bench itself.

    with BackgroundLoad(2):
        ...  # measure under load

The processes are ended when the block exits, whatever way it exits (an error, Ctrl-C), and at
interpreter exit (atexit) for any still running; only processes this module started are ever ended.
"""
from __future__ import annotations

import argparse
import atexit
import os
import re
import subprocess
import sys
import threading

# a pure-Python busy loop: no threads, no imports, no output; ends by itself when its parent goes
# (the bench killed with SIGKILL never runs its atexit handlers)
BUSY = ("import os, sys, time\n"
        "parent = int(sys.argv[1])\n"
        "t = time.monotonic()\n"
        "while True:\n"
        "    for _ in range(200000):\n"
        "        pass\n"
        "    if time.monotonic() - t > 1.0:\n"
        "        t = time.monotonic()\n"
        "        if os.getppid() != parent:\n"
        "            break\n")

MAX_BACKGROUND = 64  # each process spins on a core: more only thrashes the machine the bench measures

_started: set[subprocess.Popen] = set()
_lock = threading.Lock()


def _end(processes) -> None:
    for p in processes:
        if p.poll() is None:
            p.kill()
    for p in processes:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    with _lock:
        _started.difference_update(processes)


def _end_all() -> None:
    with _lock:
        processes = list(_started)
    _end(processes)


atexit.register(_end_all)


class BackgroundLoad:
    """A context manager that keeps `n` busy processes running (n = 0: nothing). `pids` lists them."""

    def __init__(self, n: int):
        if n < 0:
            raise ValueError("the number of background processes must be 0 or more")
        self.n = n
        self.processes: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def start(self) -> "BackgroundLoad":
        try:
            for _ in range(self.n):
                p = subprocess.Popen([sys.executable, "-c", BUSY, str(os.getpid())], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
                with _lock:
                    _started.add(p)
                self.processes.append(p)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _end(self.processes)

    def __enter__(self) -> "BackgroundLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def background_count(text: str) -> int:
    """The argparse type of `--background N`: a whole number from 0 to MAX_BACKGROUND, so that a wrong
    value is refused before any measuring starts. Raises argparse.ArgumentTypeError otherwise."""
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) > MAX_BACKGROUND:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of busy processes from 0 to {MAX_BACKGROUND}")
    return int(text)


def label(n: int) -> str:
    return "idle" if n == 0 else f"{n} busy"


def described(n: int) -> str:
    """`2 busy background processes`, `1 busy background process`."""
    return f"{n} busy background process{'' if n == 1 else 'es'}"


def run_bench(main) -> None:
    """Run a bench's `main()` as a command: Ctrl-C exits with status 130 and a closed output pipe
    (`| head`) with 1, neither with a traceback; the busy processes are ended on the way out (atexit)."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # what was left to print goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
