"""The process a run trains in: which device, how many CPU threads, the seeds.

:func:`resolve_device` is the one device check of the project (the CLI, the engine, the
ClientApp and the baselines all use it).
"""

from __future__ import annotations

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
