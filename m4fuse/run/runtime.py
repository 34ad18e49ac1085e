"""The process a run trains in: which device, how many CPU threads, the seeds, and the
numerical platform a result was computed on.

:func:`resolve_device` is the one device check of the project (the CLI, the engine, the
ClientApp and the baselines all use it).
"""

from __future__ import annotations

import platform
import random

import numpy as np
import torch
from omegaconf import DictConfig


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A torch device from ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``; ``None`` or ``""`` (a config's ``device`` left unset) mean ``"auto"``. Asking
    for CUDA where there is none, or an index past the last GPU, is an error naming the
    request."""
    if spec is None or spec == "":
        spec = "auto"
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif device.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    return device


def apply_threads(cfg: DictConfig) -> None:
    """``torch.set_num_threads(cfg.threads)`` when ``threads`` > 0 (0: torch's default)."""
    threads = int(cfg.get("threads", 0) or 0)
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (all devices) global RNGs."""
    # Not monai.utils.set_determinism: besides these three seeds it sets
    # cudnn.deterministic=True and cudnn.benchmark=False on every call (overriding
    # TrainConfig.cudnn_benchmark, slower CUDA training) and MONAI's global seed, so it
    # would change what a run does on a GPU; the seeding itself is these three calls.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _cpu_model() -> str:
    """The CPU's model name (Linux: ``/proc/cpuinfo``; elsewhere :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def numerics_platform() -> dict[str, str]:
    """What a run's floating-point results depend on besides its code, data and seed: the
    versions of Python, torch and NumPy, the CPU kernels torch dispatches to (e.g. ``AVX2``,
    ``AVX512``: the same run computes different last bits with each, and training amplifies
    them), the CPU model and, when torch sees one, the GPU. A run is deterministic on one
    platform; on another its table can differ (see the README's main job)."""
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "numpy": np.__version__, "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
             "cpu": _cpu_model()}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


def platform_text(found: dict[str, str]) -> str:
    """:func:`numerics_platform`'s result in one line, e.g. ``torch 2.13.0 (CPU kernels
    AVX512), NumPy 2.4.6, Python 3.11.2, AMD EPYC``."""
    text = (f"torch {found.get('torch', '?')} (CPU kernels {found.get('cpu_kernels', '?')}), "
            f"NumPy {found.get('numpy', '?')}, Python {found.get('python', '?')}, "
            f"{found.get('cpu', '?')}")
    return text + (f", GPU {found['gpu']}" if found.get("gpu") else "")
