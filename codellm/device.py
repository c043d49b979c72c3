"""Device and thread choice."""
from __future__ import annotations

import os

import torch

from .threads import check_threads, threads_from_env


def choose_device(preference: str | None = None) -> torch.device:
    """cuda > mps > cpu unless `preference` (or $CODELLM_DEVICE) names one.

    Raises ValueError for a device that is not cuda, mps or cpu, or one that is not available here."""
    preference = preference or os.environ.get("CODELLM_DEVICE") or None
    if preference and preference != "auto":
        try:
            device = torch.device(preference)
        except RuntimeError as exc:
            raise ValueError(f"device {preference!r} is not one of cuda, mps, cpu") from exc
        if device.type not in ("cuda", "mps", "cpu"):
            raise ValueError(f"device {preference!r} is not one of cuda, mps, cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' asked for, but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def physical_cores() -> int:
    """Physical cores available to this process (hyperthreads don't help small matmuls)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        siblings = [int(l.split(":")[1]) for l in info.splitlines() if l.startswith("siblings")]
        cores = [int(l.split(":")[1]) for l in info.splitlines() if l.startswith("cpu cores")]
        if siblings and cores and siblings[0] > cores[0]:
            usable = max(1, usable * cores[0] // siblings[0])
    except (OSError, ValueError, IndexError):
        pass
    return max(1, usable)


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads: `threads`, else $CODELLM_THREADS, else the physical cores. Raises ValueError
    for a count outside 1..MAX_THREADS."""
    n = check_threads(threads) if threads else threads_from_env() or physical_cores()
    torch.set_num_threads(n)
    return n


def cpu_has_bf16() -> bool:
    """bf16 matrix hardware (AMX or AVX-512 BF16) makes bf16 matrix products about twice as fast on CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags
