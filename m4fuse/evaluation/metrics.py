"""BraTS segmentation metrics: Dice and HD95 per region (WT, TC, ET), in millimetres.

Conventions (docs/design.md §5):

- Scores are computed per region on boolean masks ordered WT, TC, ET
  (:data:`m4fuse.data.regions.REGIONS`), on the voxel grid the caller gives (the original NIfTI grid
  for reported numbers), with the voxel ``spacing`` in mm per axis (anisotropic spacing is used
  as is, not averaged).
- Both masks empty: Dice 1, HD95 0. Exactly one empty: Dice 0, HD95 :data:`EMPTY_HD95_MM`
  (373.13 mm, the diagonal of the BraTS 240×240×155 box at 1 mm, the usual challenge penalty).
- HD95 is symmetric. Default definition (``hd95="max_directed"``): the larger of the two
  directed 95th percentiles, i.e. ``max(P95(d(∂A→∂B)), P95(d(∂B→∂A)))``; this is what MONAI's
  ``compute_hausdorff_distance(percentile=95)`` returns and what is used here. The other common
  definition (``hd95="pooled"``): the 95th percentile of the pooled surface distances of both
  directions, as ``medpy.metric.binary.hd95`` computes it. Both use surfaces = mask XOR its
  6-connected erosion and exact Euclidean distances scaled by ``spacing``; percentiles use
  linear interpolation (``torch.quantile`` / ``numpy.percentile``). The pooled value is never
  larger than the max-directed one.

Everything is computed with MONAI's metric functions (``compute_dice``,
``compute_hausdorff_distance``, and ``get_edge_surface_distance`` for the pooled definition);
only the empty-mask conventions are decided here, before MONAI is called (MONAI returns
NaN/inf for them).

Lesion-wise Dice and HD95 (the BraTS 2023+ ranking: per lesion, with missed lesions and
false-positive components at Dice 0 / HD95 374 mm) are in :mod:`m4fuse.evaluation.lesion` and re-exported
here (:func:`lesion_scores`, :func:`lesion_region_scores`, :func:`lesion_label_scores`); they
use the challenge's own HD95 (area-weighted surfels), see that module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.metrics.utils import get_edge_surface_distance

from m4fuse.data.regions import ET_LABELS, REGIONS, labels_to_regions

# Lesion-wise (BraTS 2023+ ranking) scores live in m4fuse.evaluation.lesion; re-exported here.
from m4fuse.evaluation.lesion import (  # noqa: F401
    DEFAULT_LESION_PRESET,
    LESION_COUNT_KEYS,
    LESION_KEYS,
    LESION_MEAN_KEYS,
    LESION_MISS_HD95_MM,
    LESION_PRESETS,
    LESION_REPORTED_KEYS,
    LESION_SCORE_KEYS,
    LesionScores,
    lesion_parameters,
    lesion_region_scores,
    lesion_scores,
    mean_lesion_scores,
)

EMPTY_HD95_MM: float = 373.13
"""HD95 (mm) given when exactly one of prediction and truth is empty."""

HD95_DEFINITIONS: tuple[str, ...] = ("max_directed", "pooled")

REGION_METRIC_KEYS: tuple[str, ...] = tuple(f"dice_{r.lower()}" for r in REGIONS) + tuple(
    f"hd95_{r.lower()}" for r in REGIONS
)
"""Per-region keys in the order dice_wt, dice_tc, dice_et, hd95_wt, hd95_tc, hd95_et."""

REPORTED_METRIC_KEYS: tuple[str, ...] = REGION_METRIC_KEYS + ("dice_mean", "hd95_mean")
"""The per-region keys and their means over the regions: what a site's validation and test
report, the results tables hold and MLflow logs."""

ArrayLike = np.ndarray | torch.Tensor


def _as_bool_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if t.dtype != torch.bool:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
        uniq = torch.unique(t)
        if not bool(((uniq == 0) | (uniq == 1)).all()):
            raise ValueError(
                f"{name} must be a binary mask (0/1 or bool), found values {uniq[:8].tolist()}"
            )
        t = t != 0
    return t


def _check_spacing(spacing: Sequence[float] | float, ndim: int) -> tuple[float, ...]:
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise ValueError(f"spacing {tuple(spacing)!r} has {len(sp)} values for {ndim}-D masks")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {sp!r}")
    return sp


def _crop_to_union(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both masks cut to the bounding box of their union plus one background voxel per side.

    Dice, surfaces and surface distances are unchanged by this (erosion treats the outside as
    background either way); it only spares MONAI full-volume passes (on a 240×240×155 BraTS
    grid it makes scoring several times faster).
    """
    union = p | t
    slices = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hit = torch.nonzero(union.any(dim=others) if others else union).reshape(-1)
        lo, hi = int(hit[0]) - 1, int(hit[-1]) + 2
        slices.append(slice(max(lo, 0), min(hi, union.shape[axis])))
    return p[tuple(slices)], t[tuple(slices)]


def _hd95_pooled(pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, ...]) -> float:
    """95th percentile of the pooled surface distances of both directions (medpy's hd95).

    MONAI has no pooled option; it gives the two directed distance sets, and pooling them and
    taking one percentile is the only part written here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI-internal deprecated argument
        _, distances, _ = get_edge_surface_distance(
            pred, truth, distance_metric="euclidean", spacing=spacing, symmetric=True,
            warn_empty=False,
        )
    pooled = torch.cat([d.reshape(-1).double() for d in distances])
    return float(torch.quantile(pooled, 0.95))


def binary_scores(
    pred: ArrayLike,
    truth: ArrayLike,
    spacing: Sequence[float] | float = 1.0,
    hd95: str = "max_directed",
) -> tuple[float, float]:
    """Dice and HD95 (mm) of one binary mask pair of the same spatial shape.

    Args:
        pred: predicted mask (bool or 0/1), any number of spatial dims.
        truth: reference mask, same shape as ``pred``.
        spacing: voxel size in mm per axis (one number = isotropic); default 1 mm.
        hd95: ``"max_directed"`` (default, MONAI) or ``"pooled"`` (medpy); see module docstring.

    Returns:
        ``(dice, hd95_mm)`` following the empty-mask conventions of the module docstring.
    """
    if hd95 not in HD95_DEFINITIONS:
        raise ValueError(f"hd95 must be one of {HD95_DEFINITIONS}, got {hd95!r}")
    p = _as_bool_tensor(pred, "pred")
    t = _as_bool_tensor(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} != truth shape {tuple(t.shape)}")
    sp = _check_spacing(spacing, p.ndim)
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 1.0, 0.0
    if p_any != t_any:
        return 0.0, EMPTY_HD95_MM
    p, t = _crop_to_union(p, t)
    dice = float(compute_dice(p[None, None], t[None, None], include_background=True)[0, 0])
    if hd95 == "pooled":
        return dice, _hd95_pooled(p, t, sp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty cases were handled above
        hd = compute_hausdorff_distance(
            p[None, None], t[None, None], include_background=True, percentile=95, spacing=sp
        )
    return dice, float(hd[0, 0])


def region_scores(
    pred: ArrayLike,
    truth: ArrayLike,
    spacing: Sequence[float] | float = 1.0,
    hd95: str = "max_directed",
) -> dict[str, float]:
    """Dice and HD95 (mm) for each BraTS region, plus their means.

    Args:
        pred: predicted region masks ``(3, *spatial)`` ordered WT, TC, ET (bool or 0/1).
        truth: reference region masks, same shape.
        spacing: voxel size in mm for each spatial axis (default 1 mm isotropic).
        hd95: HD95 definition, ``"max_directed"`` (default) or ``"pooled"``.

    Returns:
        ``{"dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "dice_mean",
        "hd95_mean"}`` as floats.
    """
    shape_p, shape_t = tuple(pred.shape), tuple(truth.shape)
    if shape_p != shape_t:
        raise ValueError(f"pred shape {shape_p} != truth shape {shape_t}")
    if len(shape_p) < 2 or shape_p[0] != len(REGIONS):
        raise ValueError(
            f"expected region masks of shape (3, *spatial) ordered {REGIONS}, got {shape_p}"
        )
    out: dict[str, float] = {}
    for i, region in enumerate(REGIONS):
        dice, hd = binary_scores(pred[i], truth[i], spacing, hd95)
        out[f"dice_{region.lower()}"] = dice
        out[f"hd95_{region.lower()}"] = hd
    return _with_means(out)


def _with_means(scores: dict[str, float]) -> dict[str, float]:
    scores["dice_mean"] = float(np.mean([scores[f"dice_{r.lower()}"] for r in REGIONS]))
    scores["hd95_mean"] = float(np.mean([scores[f"hd95_{r.lower()}"] for r in REGIONS]))
    return scores


def infer_et_label(labels: ArrayLike, default: int = 4, name: str = "label map") -> int:
    """The ET label (4 or 3) a BraTS label map uses, from its values.

    A map containing 4 uses 4, one containing 3 uses 3; a map with neither (no enhancing
    tumour) gets ``default``. Values outside {0, 1, 2, 3, 4}, or both 3 and 4, are an error
    naming ``name``.
    """
    if default not in ET_LABELS:
        raise ValueError(f"default et_label must be one of {ET_LABELS}, got {default!r}")
    values = set(np.unique(np.asarray(labels)).tolist())
    bad = values - {0, 1, 2, 3, 4}
    if bad:
        raise ValueError(f"{name}: unknown label values {sorted(bad)} (BraTS uses 0/1/2 and 3 or 4)")
    if {3, 4} <= values:
        raise ValueError(f"{name}: contains both 3 and 4; a BraTS map uses one of them for ET")
    if 4 in values:
        return 4
    if 3 in values:
        return 3
    return default


def label_scores(
    pred_labels: ArrayLike,
    truth_labels: ArrayLike,
    spacing: Sequence[float] | float = 1.0,
    et_label: int | None = None,
    hd95: str = "max_directed",
) -> dict[str, float]:
    """:func:`region_scores` of two BraTS label maps (0/1/2/ET) of the same grid.

    Args:
        pred_labels: predicted label map ``(*spatial)``.
        truth_labels: reference label map, same shape.
        spacing: voxel size in mm per axis (default 1 mm isotropic).
        et_label: ET label (4 or 3) of both maps; ``None`` (default) infers it from each map's
            values separately (:func:`infer_et_label`), so a 0/1/2/3 prediction can be scored
            against a 0/1/2/4 truth.
        hd95: HD95 definition, see :func:`region_scores`.
    """
    return region_scores(*label_regions(pred_labels, truth_labels, et_label), spacing, hd95)


def label_regions(
    pred_labels: ArrayLike, truth_labels: ArrayLike, et_label: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Region masks ``(3, *spatial)`` (WT, TC, ET) of a prediction and a reference label map,
    after checking their shapes and labels (``et_label`` as in :func:`label_scores`)."""
    p = np.asarray(pred_labels.cpu() if isinstance(pred_labels, torch.Tensor) else pred_labels)
    t = np.asarray(truth_labels.cpu() if isinstance(truth_labels, torch.Tensor) else truth_labels)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != truth shape {t.shape}")
    et_t = infer_et_label(t, name="truth") if et_label is None else et_label
    et_p = infer_et_label(p, default=et_t, name="prediction") if et_label is None else et_label
    for arr, et, name in ((p, et_p, "prediction"), (t, et_t, "truth")):
        bad = set(np.unique(arr).tolist()) - {0, 1, 2, et}
        if bad:
            raise ValueError(f"{name}: label values {sorted(bad)} not in {{0, 1, 2, {et}}}")
    return labels_to_regions(p, et_p), labels_to_regions(t, et_t)


def lesion_label_scores(
    pred_labels: ArrayLike,
    truth_labels: ArrayLike,
    spacing: Sequence[float] | float = 1.0,
    et_label: int | None = None,
    preset: str = DEFAULT_LESION_PRESET,
    dilation: int | None = None,
    threshold_mm3: float | None = None,
) -> dict[str, float]:
    """Lesion-wise scores and counts (:data:`LESION_KEYS`) of two BraTS label maps of the same
    3-D grid, by the BraTS 2023+ rule (:mod:`m4fuse.evaluation.lesion`).

    Args:
        pred_labels, truth_labels, spacing, et_label: as :func:`label_scores`.
        preset: challenge parameters, ``"gli"`` (default), ``"ssa"``, ``"men"``, ``"ped"`` or
            ``"met"`` (:data:`LESION_PRESETS`).
        dilation, threshold_mm3: override the preset's dilation (voxels) and lesion volume
            threshold (mm³); default None keeps the preset's.
    """
    p, t = label_regions(pred_labels, truth_labels, et_label)
    return lesion_region_scores(p, t, spacing, preset, dilation, threshold_mm3)


def mean_scores(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean over cases of each metric key (:data:`REGION_METRIC_KEYS`, plus the two means).

    Raises ValueError for no rows or a row missing a key.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("mean_scores needs at least one row")
    out: dict[str, float] = {}
    for key in REGION_METRIC_KEYS:
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing:
            raise ValueError(f"row {missing[0]} has no {key!r}")
        out[key] = float(np.mean([float(r[key]) for r in rows]))
    return _with_means(out)
