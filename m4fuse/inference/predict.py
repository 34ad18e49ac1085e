"""Prediction with an M4Fuse model: device choice, forward or sliding window, logits -> regions.

The network's output mode (``model.config.output``) decides how logits become region masks:

- ``"regions"``: sigmoid per channel (WT, TC, ET), threshold 0.5;
- ``"labels"``: softmax over 4 classes (0 background, 1 NCR, 2 ED, 3 ET), argmax.

Predicted regions are always made nested (ET ⊂ TC ⊂ WT), the same rule
:func:`m4fuse.data.regions.regions_to_labels` applies when a label map is written, so the masks that
are scored are exactly those that a written segmentation holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from m4fuse.data.regions import classes_to_regions
from m4fuse.run.runtime import resolve_device

OUTPUT_MODES: tuple[str, ...] = ("regions", "labels")
AMP_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16",
             cpu: bool = False) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass.

    On CUDA: autocast in ``dtype`` when ``enabled``. On the CPU: a no-op (CPU runs stay float32
    and deterministic) unless ``enabled`` and ``cpu`` (``train.amp_cpu``) are both true, then
    CPU autocast in bfloat16. CPU autocast is bfloat16 only: ``dtype="float16"`` with ``cpu``
    on a CPU device raises ``ValueError`` (``train.amp_cpu=true`` needs
    ``train.amp_dtype=bfloat16``). Any other device: a no-op.
    """
    if dtype not in AMP_DTYPES:
        raise ValueError(f"amp dtype must be one of {sorted(AMP_DTYPES)}, got {dtype!r}")
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[dtype])
    if enabled and cpu and device.type == "cpu":
        if dtype != "bfloat16":
            raise ValueError(f"CPU autocast (train.amp_cpu=true) runs in bfloat16 only, got "
                             f"train.amp_dtype={dtype!r}: set train.amp_dtype=bfloat16 or "
                             f"train.amp_cpu=false")
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside wrappers that keep it as ``_module`` (Opacus' GradSampleModule) or
    ``module`` (DataParallel)."""
    while True:
        for attr in ("_module", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def output_mode(model: nn.Module) -> str:
    """``model.config.output`` (``"regions"`` or ``"labels"``); ``"regions"`` when the model
    has no config (any network with the M4Fuse forward signature and 3 sigmoid outputs)."""
    mode = getattr(getattr(unwrap(model), "config", None), "output", "regions")
    if mode not in OUTPUT_MODES:
        raise ValueError(f"model output mode must be one of {OUTPUT_MODES}, got {mode!r}")
    return mode


def expert_tensor(
    expert: str | int | None, batch: int, device: torch.device, site: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The ``expert`` argument of ``M4Fuse.forward`` for a batch of ``batch`` samples.

    Args:
        expert: ``"site"`` (each sample's ``site`` index), an int (every sample uses that
            expert) or ``None`` (shared path only, no expert term).
        batch: number of samples.
        device: where the tensor goes.
        site: the batch's ``site`` tensor (B,), needed for ``"site"``.
    """
    if expert is None:
        return None
    if expert == "site":
        if site is None:
            raise ValueError("expert='site' needs the batch's 'site' tensor")
        site = torch.as_tensor(site).long().reshape(-1)
        if site.numel() != batch:
            raise ValueError(f"'site' has {site.numel()} entries for a batch of {batch}")
        return site.to(device)
    if isinstance(expert, bool) or not isinstance(expert, (int, np.integer)) or expert < 0:
        raise ValueError(f"expert must be 'site', a non-negative int or None, got {expert!r}")
    return torch.full((batch,), int(expert), dtype=torch.long, device=device)


def logits_to_probs(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Sigmoid (``"regions"``) or softmax over channels (``"labels"``) of (B, C, ...) logits."""
    if mode == "regions":
        return torch.sigmoid(logits)
    if mode == "labels":
        return torch.softmax(logits, dim=1)
    raise ValueError(f"mode must be one of {OUTPUT_MODES}, got {mode!r}")


def probs_to_regions(probs: torch.Tensor | np.ndarray, mode: str, threshold: float = 0.5) -> torch.Tensor:
    """Probabilities (C, ...) of one case -> nested boolean region masks (3, ...) WT, TC, ET.

    ``"regions"``: channel > ``threshold`` (default 0.5); ``"labels"``: argmax class, then
    :func:`m4fuse.data.regions.classes_to_regions`. TC is cut to WT and ET to TC.
    """
    probs = torch.as_tensor(probs)
    if mode == "regions":
        if probs.shape[0] != 3:
            raise ValueError(f"'regions' output needs 3 channels, got shape {tuple(probs.shape)}")
        wt, tc, et = probs > threshold
    elif mode == "labels":
        if probs.shape[0] != 4:
            raise ValueError(f"'labels' output needs 4 channels, got shape {tuple(probs.shape)}")
        wt, tc, et = classes_to_regions(probs.argmax(dim=0))
    else:
        raise ValueError(f"mode must be one of {OUTPUT_MODES}, got {mode!r}")
    tc = tc & wt
    et = et & tc
    return torch.stack([wt, tc, et])


def _predictor(model: nn.Module, expert: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x, expert_tensor(expert, x.shape[0], x.device))

    return run


def predict_probs(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    device: torch.device | str = "cpu",
    expert: int | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    amp: bool = True,
    amp_dtype: str = "bfloat16",
    amp_cpu: bool = False,
) -> torch.Tensor:
    """Class/region probabilities of one preprocessed case ``(C_in, D, H, W)`` -> ``(C, D, H, W)``
    float32 on the CPU.

    When ``roi_size`` is given and the volume is larger than it along any axis, MONAI's
    ``sliding_window_inference`` runs (``overlap`` default 0.5, Gaussian blending,
    ``sw_batch_size`` windows per forward, default 1); otherwise one plain forward. ``expert``
    is the expert index for every window, or None for the shared path. AMP (default on, in
    ``amp_dtype``, default bfloat16) applies on CUDA, and on the CPU (in bfloat16) only with
    ``amp_cpu`` (default False: float32; :func:`autocast`).
    """
    device = resolve_device(device)
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if x.ndim != 4:
        raise ValueError(f"image must be (C, D, H, W), got shape {tuple(x.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    x = x.float().unsqueeze(0).to(device)
    mode = output_mode(model)
    run = _predictor(model, expert)
    precision = autocast(device, amp, amp_dtype, cpu=amp_cpu)
    with eval_mode(model), torch.inference_mode(), precision:
        if roi_size is not None:
            roi = tuple(int(r) for r in roi_size)
            if len(roi) != 3 or min(roi) < 1:
                raise ValueError(f"roi_size must be three positive ints, got {roi_size!r}")
        if roi_size is not None and any(s > r for s, r in zip(x.shape[2:], roi)):
            logits = sliding_window_inference(
                x, roi, sw_batch_size, run, overlap=overlap, mode="gaussian"
            )
        else:
            logits = run(x)
        probs = logits_to_probs(torch.as_tensor(logits).float(), mode)
    return probs[0].cpu()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
