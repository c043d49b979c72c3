"""How codellm's processes share the CPU with others; imports nothing heavy, so that an entry point can
call it before torch (and with it the OpenMP runtime) is loaded.

OpenMP threads that finish their part of a parallel region spin, by default, waiting for the next one.
On a machine whose cores other processes also want (a browser, a build, a test run), a spinning thread
holds a core the thread it waits for needs: a decode step that takes 2 ms on an idle machine was measured
at 20-50 ms, a prompt read 3-20x slower (`codellm bench --background 2`). With the passive policy a
waiting thread sleeps; on an idle machine that costs little, since small models' decode steps run
without a team at all (codellm.kernel.ONE_THREAD_BELOW). Prompt reading, where a team pays on an idle
machine, takes as many threads as other processes leave cores free (LoadWatch).
"""
from __future__ import annotations

import os
import sys
import time

WAIT_POLICY = "OMP_WAIT_POLICY"
MAX_THREADS = 1024
THREADS_ENV = "CODELLM_THREADS"


def check_threads(threads: int, name: str = "--threads") -> int:
    """`threads` if it is a whole number from 1 to MAX_THREADS; ValueError naming the setting otherwise."""
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"{name} {threads!r}: a thread count is a whole number from 1 to {MAX_THREADS}")
    return threads


def threads_from_env() -> int | None:
    """The thread count $CODELLM_THREADS asks for; None when unset, empty or 0 (the default). Raises
    ValueError, naming the variable, for anything else that is not 1..MAX_THREADS."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw in ("", "0"):
        return None
    try:
        return check_threads(int(raw), THREADS_ENV)
    except ValueError:
        raise ValueError(f"{THREADS_ENV}={raw!r}: a thread count is a whole number from 1 to {MAX_THREADS}") from None


def prefer_passive_waits() -> bool:
    """Ask the OpenMP runtime for the passive wait policy unless the user chose one ($OMP_WAIT_POLICY).
    Only works before the runtime loads (before `import torch`); returns whether it applies."""
    if "torch" in sys.modules:
        return os.environ.get(WAIT_POLICY, "").upper() == "PASSIVE"
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    return os.environ[WAIT_POLICY].upper() == "PASSIVE"


MIN_INTERVAL = 0.05  # seconds between two readings of the machine's load; closer calls reuse the last choice
ROUNDING = 0.25  # a core counts as free when others leave at least 3/4 of it


class LoadWatch:
    """How many cores other processes leave free, between two readings of /proc/stat (Linux): the busy
    time of all CPUs less this process's own CPU time, over the wall time between the readings.

    `team(limit)` is the thread team a parallel step should use now: the free cores, at least 1, at most
    `limit`. Where /proc/stat cannot be read (macOS, Windows) it is always `limit`."""

    def __init__(self, path: str = "/proc/stat"):
        self.path = path
        self._last = self._reading()
        self._free: float | None = None

    def _reading(self) -> tuple[float, float, int, float] | None:
        """(wall s, busy CPU s of the machine, CPUs, own CPU s), or None where the machine's counters are unreadable."""
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
            fields = [int(v) for v in lines[0].split()[1:]] if lines and lines[0].startswith("cpu ") else []
            if len(fields) < 4:
                return None
            cpus = sum(1 for l in lines if l.startswith("cpu") and l[3:4].isdigit())
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
            busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user time
        except (OSError, ValueError, OverflowError):
            return None
        own = sum(os.times()[:2])
        return time.monotonic(), busy, max(1, cpus), own

    def free_cores(self) -> float | None:
        """Cores left free by other processes since the last reading (None: unknown)."""
        if self._last is None:
            return None
        now = self._reading()
        if now is None or now[0] - self._last[0] < MIN_INTERVAL:
            return self._free
        wall = now[0] - self._last[0]
        others = max(0.0, (now[1] - self._last[1]) - (now[3] - self._last[3])) / wall
        self._last, self._free = now, max(0.0, now[2] - others)
        return self._free

    def team(self, limit: int) -> int:
        free = self.free_cores()
        return limit if free is None else max(1, min(limit, int(free + ROUNDING)))
