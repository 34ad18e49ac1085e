"""Measurement shared by the benchmarks (``bench_model``, ``profile_model``, ``bench_speed``):
peak memory of a block of code, the median wall time of a step, the device of a ``--device``
flag.

Peak memory: CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; CPU
(Linux), the process's peak resident set (``VmHWM`` in ``/proc/self/status``), reset before the
run by writing ``5`` to ``/proc/self/clear_refs`` after ``malloc_trim(0)``; it includes
allocator slack and, for small runs, reuse of pages still resident can hide part of the peak.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch


def _rss_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM`` ...), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes above the starting level while the ``with`` block runs (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: float = math.nan

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif sys.platform.startswith("linux"):
            # Give freed heap pages back to the OS first; otherwise a run that follows the
            # warm-up reuses them without raising the resident set and reads as ~0 MiB.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current resident set
            self._base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif sys.platform.startswith("linux"):
            self.peak_bytes = _rss_kib("VmHWM") * 1024 - self._base


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(step: Callable[[], None], device: torch.device, repeats: int,
                warmup: int) -> float:
    """Median wall seconds of ``step`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync_device(device)
        start = time.perf_counter()
        step()
        sync_device(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pick_device(name: str) -> torch.device:
    """The device of a ``--device`` flag: ``auto`` (CUDA if available, else the CPU), ``cpu``
    or ``cuda`` (exits when no CUDA device is available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)
