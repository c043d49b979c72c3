"""How codellm's processes share the CPU with others; imports nothing heavy, so that an entry point can
call it before torch (and with it the OpenMP runtime) is loaded.

OpenMP threads that finish their part of a parallel region spin, by default, waiting for the next one.
On a machine whose cores other processes also want (a browser, a build, a test run), a spinning thread
holds a core the thread it waits for needs: a decode step that takes 2 ms on an idle machine was measured
at 20-50 ms, a prompt read 3-20x slower (`codellm bench --background 2`). With the passive policy a
waiting thread sleeps; on an idle machine that costs little, since small models' decode steps run
without a team at all (codellm.kernel.ONE_THREAD_BELOW).
"""
from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_waits() -> bool:
    """Ask the OpenMP runtime for the passive wait policy unless the user chose one ($OMP_WAIT_POLICY).
    Only works before the runtime loads (before `import torch`); returns whether it applies."""
    if "torch" in sys.modules:
        return os.environ.get(WAIT_POLICY, "").upper() == "PASSIVE"
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    return os.environ[WAIT_POLICY].upper() == "PASSIVE"
