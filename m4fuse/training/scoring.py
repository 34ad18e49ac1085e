"""Scoring a model (no Flower): loss, Dice and HD95 at the training resolution
(:func:`evaluate`, the validation of every round) and on each test case's original voxel grid
(:func:`score_on_original_grid`, the final test; docs/design.md §5)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from m4fuse.data.regions import labels_to_regions
from m4fuse.evaluation.metrics import lesion_region_scores, mean_scores, region_scores
from m4fuse.inference.predict import (
    autocast,
    eval_mode,
    expert_tensor,
    logits_to_probs,
    output_mode,
    predict_probs,
    probs_to_regions,
)
from m4fuse.training.engine import Expert, TrainConfig, check_batch, make_loss, prepare_device


def _as_spacing(spacing: Sequence[float] | float) -> tuple[float, float, float]:
    if isinstance(spacing, (int, float)):
        return (float(spacing),) * 3
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3:
        raise ValueError(f"spacing must be one number or three (D, H, W), got {spacing!r}")
    return sp  # type: ignore[return-value]


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device | str = "auto",
    expert: Expert = "site",
    spacing: Sequence[float] | float | Mapping[str, Sequence[float]] = 1.0,
    amp: bool = True,
    amp_dtype: str = "bfloat16",
    loss_cfg: TrainConfig | None = None,
    amp_cpu: bool = False,
) -> dict[str, float | int]:
    """Loss, Dice and HD95 per region at the training resolution, mean over cases.

    Args:
        model: network; evaluated in eval mode under ``torch.inference_mode`` (mode restored).
        loader: batches as for :func:`m4fuse.training.trainer.train_epochs`.
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"`` or a torch.device.
        expert: ``"site"`` (default), an int, or ``None`` (shared path only).
        spacing: voxel size (D, H, W) in mm of the resized grid used for HD95: one number or
            triple for every case (default 1.0, i.e. HD95 in voxels unless the grid is 1 mm),
            or ``{case id: (D, H, W)}`` for each case's own grid (batches carry ``"case"``;
            :func:`m4fuse.training.site_steps.training_grid_spacing`).
        amp: autocast on CUDA, default True, in ``amp_dtype`` (default bfloat16), as the
            run's ``train.amp``/``train.amp_dtype``/``train.amp_cpu`` in training.
        loss_cfg: loss term weights (default those of ``TrainConfig()``).
        amp_cpu: with ``amp``, bfloat16 autocast on the CPU too, default False (float32);
            the loss and metrics use float32 logits.

    Returns:
        ``{"loss", "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et",
        "dice_mean", "hd95_mean", "num-examples"}``.
    """
    device = prepare_device(model, device, None)
    per_case = isinstance(spacing, Mapping)
    sp = None if per_case else _as_spacing(spacing)  # type: ignore[arg-type]
    mode = output_mode(model)
    loss_fn = make_loss(mode, loss_cfg)
    rows: list[dict[str, float]] = []
    total_loss = 0.0
    with eval_mode(model), torch.inference_mode():
        for batch in loader:
            check_batch(batch)
            x = batch["image"].to(device).float()
            y = batch["label"].to(device)
            routes = expert_tensor(expert, x.shape[0], device, batch.get("site"))
            with autocast(device, amp, amp_dtype, cpu=amp_cpu):
                logits = model(x, routes)
            logits = logits.float()
            total_loss += float(loss_fn(logits, y)) * x.shape[0]
            probs = logits_to_probs(logits, mode).cpu()
            truth = y.cpu() > 0.5
            for i in range(x.shape[0]):
                case_sp = _case_spacing(spacing, batch, i) if per_case else sp
                rows.append(region_scores(probs_to_regions(probs[i], mode), truth[i], case_sp))
    if not rows:
        raise ValueError("the loader gave no batches: nothing to evaluate")
    out: dict[str, float | int] = {"loss": total_loss / len(rows)}
    out.update(mean_scores(rows))
    out["num-examples"] = len(rows)
    return out


def _case_spacing(spacing: Mapping[str, Sequence[float]], batch: Mapping[str, Any],
                  i: int) -> tuple[float, float, float]:
    """The voxel size of the batch's ``i``-th case from ``{case id: (D, H, W)}``."""
    case = batch.get("case")
    case_id = None if case is None else str(case[i])
    if case_id not in spacing:
        raise KeyError(f"no spacing for case {case_id!r} (batch key 'case'); "
                       f"spacing has {len(spacing)} cases")
    return _as_spacing(spacing[case_id])


def _expert_for(expert: Expert | Mapping[str, int], site: str | None) -> int | None:
    if isinstance(expert, Mapping):
        if site not in expert:
            raise KeyError(f"no expert index for site {site!r}; known sites: {sorted(expert)}")
        return int(expert[site])
    if isinstance(expert, str):
        raise ValueError(
            f"score_on_original_grid takes an expert index, None or {{site: index}}, got {expert!r}"
        )
    return expert


def score_on_original_grid(
    model: nn.Module,
    records: Sequence[Any],
    device: torch.device | str = "auto",
    expert_index: int | None | Mapping[str, int] = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    amp: bool = True,
    amp_dtype: str = "bfloat16",
    amp_cpu: bool = False,
) -> list[dict[str, Any]]:
    """Score test cases on their original voxel grid, at their original spacing (docs/design.md §5).

    For each record (``m4fuse.data.CaseRecord``): predict on the cached volume (sliding window
    when it is larger than ``roi_size``, else one forward), map the probabilities back with
    ``m4fuse.data.restore_to_original`` (linear), threshold / argmax there, and compare with the
    case's segmentation file read by nibabel.

    Args:
        model: network.
        records: cases with a segmentation (``seg_file``).
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"`` or a torch.device.
        expert_index: an expert index for every case, ``None`` (shared path only), or
            ``{site name: index}`` for a model with one expert per site.
        roi_size: sliding-window size (D, H, W); default None = the cached volume whole.
        overlap: sliding-window overlap, default 0.5.
        amp: autocast on CUDA, default True (``amp_dtype`` default bfloat16); on the CPU
            too, in bfloat16, with ``amp_cpu`` (default False: float32).

    Returns:
        One row per case: ``{"case", "site", "dice_wt", "dice_tc", "dice_et", "hd95_wt",
        "hd95_tc", "hd95_et", "dice_mean", "hd95_mean"}`` and the lesion-wise scores and
        counts of the BraTS 2023+ rule, ``gli`` parameters (:data:`m4fuse.evaluation.metrics.LESION_KEYS`:
        ``lesion_dice_wt``, ..., ``lesion_fp_et``).
    """
    from m4fuse.data import restore_to_original  # data imports heavy MONAI transforms

    device = prepare_device(model, device, None)
    mode = output_mode(model)
    rows: list[dict[str, Any]] = []
    for record in records:
        seg_file = getattr(record, "seg_file", None)
        if not seg_file:
            raise ValueError(f"case {record.case_id} has no segmentation file to score against")
        probs = predict_probs(
            model, np.array(record.image(), dtype=np.float32), device,
            _expert_for(expert_index, record.site), roi_size, overlap, amp=amp, amp_dtype=amp_dtype,
            amp_cpu=amp_cpu,
        )
        pred = probs_to_regions(restore_to_original(probs.numpy(), record, mode="linear"), mode)
        truth_regions = _truth_regions(record, tuple(pred.shape[1:]))
        scores = region_scores(pred.numpy(), truth_regions, record.spacing)
        scores.update(lesion_region_scores(pred.numpy(), truth_regions, record.spacing))
        rows.append({"case": record.case_id, "site": record.site, **scores})
    return rows


def _truth_regions(record: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The WT/TC/ET masks of ``record``'s segmentation file, checked against ``shape``."""
    truth = np.asarray(nib.load(record.seg_file).dataobj)
    if truth.shape != shape:
        raise ValueError(
            f"case {record.case_id}: segmentation {record.seg_file} has shape {truth.shape}, "
            f"restored prediction {shape}"
        )
    return labels_to_regions(np.rint(truth).astype(np.int16), record.et_label)


__all__ = ["evaluate", "score_on_original_grid"]
