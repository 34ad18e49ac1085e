"""Lesion-wise Dice and HD95: the scores the BraTS challenges rank by since 2023.

The rule (the BraTS 2023 lesion-wise evaluation; docs/metrics.md, docs/design.md §5), per
region (WT, TC, ET) on boolean masks:

1. Ground-truth lesions: the truth is dilated ``dilation`` times with the 3-D structure of
   connectivity 2 (``scipy.ndimage.generate_binary_structure(3, 2)``); every 26-connected blob
   of the dilated truth is one lesion, made of the truth voxels inside it (so nearby
   components of the truth are merged into one lesion; the truth itself is not changed).
2. Predicted components: the 26-connected components of the prediction. A component matches
   a lesion when it overlaps that lesion's own dilation (same structure, ``dilation``
   times). A component may match several lesions.
3. Each lesion is scored against the union of the components it matches: Dice and HD95 (mm,
   at the voxel spacing). A lesion matching nothing scores Dice 0 and HD95
   :data:`LESION_MISS_HD95_MM` (374 mm).
4. Lesions of volume ≤ ``threshold_mm3`` (voxel count × voxel volume) are left out of the
   score and the counts, matched or not (their matches are not false positives either).
   Every component matching no lesion at all is a false positive: Dice 0, HD95 374.
5. Score = sum over the kept lesions / (kept lesions + false positives); with neither kept
   lesions nor false positives, Dice 1 and HD95 0.

HD95 here is the challenge's: surfaces are the surface elements ("surfels") of the 2×2×2
neighbourhoods of the voxel corners, each weighted by its area in mm² at the given spacing,
and HD95 is the larger of the two directed area-weighted 95th percentiles (the first distance
at which the cumulative surface area reaches 95 %, no interpolation). MONAI computes these
surfels, their areas and the distances (``get_mask_edges`` with a spacing, ``get_surface_distance``);
numpy takes the weighted percentile (``method="inverted_cdf"``). This is not the voxel-wise
HD95 of :mod:`m4fuse.evaluation.metrics` (voxel surfaces, unweighted, interpolated percentile), which
keeps its own definition.

Speed: connected components and dilations are computed with :mod:`scipy.ndimage` on the
bounding box of the truth (resp. of each lesion, resp. of each lesion and its matches) grown
by ``dilation`` voxels, never on the whole volume per lesion; the result is the same as on
the whole volume because a dilation of ``dilation`` steps never reaches further than
``dilation`` voxels.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from m4fuse.data.regions import REGIONS

LESION_MISS_HD95_MM: float = 374.0
"""HD95 (mm) of a missed lesion and of a false-positive component, as the challenge counts."""

LESION_PRESETS: dict[str, tuple[int, float]] = {
    "gli": (3, 50.0),  # adult glioma
    "ssa": (3, 50.0),  # sub-Saharan Africa glioma
    "men": (1, 50.0),  # meningioma
    "ped": (3, 50.0),  # paediatric tumours
    "met": (1, 2.0),   # brain metastases
}
"""Challenge name -> ``(dilation in voxels, lesion volume threshold in mm³)``."""

DEFAULT_LESION_PRESET: str = "gli"

LESION_SCORE_KEYS: tuple[str, ...] = tuple(
    f"lesion_{m}_{r.lower()}" for m in ("dice", "hd95") for r in REGIONS
)
"""``lesion_dice_wt, lesion_dice_tc, lesion_dice_et, lesion_hd95_wt, lesion_hd95_tc,
lesion_hd95_et``."""

LESION_MEAN_KEYS: tuple[str, ...] = ("lesion_dice_mean", "lesion_hd95_mean")
"""Means over the three regions of the lesion-wise Dice and HD95."""

LESION_REPORTED_KEYS: tuple[str, ...] = LESION_SCORE_KEYS + LESION_MEAN_KEYS
"""The lesion-wise keys a site's final test reports (its means over cases), the results
tables show and MLflow logs, beside :data:`m4fuse.evaluation.metrics.REPORTED_METRIC_KEYS`."""

LESION_COUNT_KEYS: tuple[str, ...] = tuple(
    f"lesion_{c}_{r.lower()}" for c in ("found", "missed", "fp") for r in REGIONS
)
"""Per region: lesions found (matched), missed, and false-positive components."""

LESION_KEYS: tuple[str, ...] = LESION_SCORE_KEYS + LESION_MEAN_KEYS + LESION_COUNT_KEYS
"""Every key :func:`lesion_region_scores` returns."""

_STRUCT_26 = np.ones((3, 3, 3), dtype=bool)
_STRUCT_DILATION = ndimage.generate_binary_structure(3, 2)


@dataclass(frozen=True)
class LesionScores:
    """Lesion-wise scores of one region.

    Attributes:
        dice: lesion-wise Dice. hd95: lesion-wise HD95 in mm.
        found: kept lesions matched by at least one predicted component.
        missed: kept lesions matched by none.
        false_positives: predicted components matching no lesion.
        dropped: lesions left out for their volume (≤ the threshold).
    """

    dice: float
    hd95: float
    found: int
    missed: int
    false_positives: int
    dropped: int


def lesion_parameters(
    preset: str = DEFAULT_LESION_PRESET,
    dilation: int | None = None,
    threshold_mm3: float | None = None,
) -> tuple[int, float]:
    """``(dilation, threshold_mm3)`` of a preset, either overridden when given.

    Args:
        preset: one of :data:`LESION_PRESETS` (default ``"gli"``), any case.
        dilation: dilation steps in voxels (default None: the preset's); 0 merges nothing and
            matches on plain overlap.
        threshold_mm3: lesions of at most this volume are left out (default None: the
            preset's).
    """
    name = str(preset).lower()
    if name not in LESION_PRESETS:
        raise ValueError(f"lesion preset {preset!r} is not one of {sorted(LESION_PRESETS)}")
    dil, thr = LESION_PRESETS[name]
    if dilation is not None:
        if isinstance(dilation, bool) or int(dilation) != dilation or dilation < 0:
            raise ValueError(f"lesion dilation must be a whole number >= 0, got {dilation!r}")
        dil = int(dilation)
    if threshold_mm3 is not None:
        if not (math.isfinite(float(threshold_mm3)) and float(threshold_mm3) >= 0):
            raise ValueError(f"lesion threshold must be a volume >= 0 in mm^3, got {threshold_mm3!r}")
        thr = float(threshold_mm3)
    return dil, thr


def _as_bool_array(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr
    values = np.unique(arr)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must be a binary mask (0/1 or bool), found values {values[:8].tolist()}")
    return arr != 0


def _spacing(spacing: Sequence[float] | float, ndim: int) -> tuple[float, ...]:
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive finite numbers (mm), got {tuple(spacing)!r}")
    return sp


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Tight bounding box of a non-empty mask."""
    out = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def _grow(box: Sequence[slice], margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    """``box`` grown by ``margin`` voxels per side, clipped to ``shape``."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _shift(box: Sequence[slice], offset: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s.start + o, s.stop + o) for s, o in zip(box, offset))


def _dilate(mask: np.ndarray, dilation: int) -> np.ndarray:
    # iterations=0 would mean "until nothing changes" in scipy; 0 here means no dilation.
    if dilation == 0:
        return mask
    return ndimage.binary_dilation(mask, structure=_STRUCT_DILATION, iterations=dilation)


def surfel_hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """The challenge's HD95 (mm) of two non-empty 3-D masks: the larger of the two directed
    area-weighted 95th percentiles of the surfel distances (see the module docstring).

    MONAI gives the surfels with their areas (``get_mask_edges`` with ``spacing``) and the
    distances (``get_surface_distance``); the masks get the one-voxel empty border the 2×2×2
    neighbourhoods need here (MONAI's own cropping, which would add it, costs more than the
    rest on a small lesion). The area-weighted percentile, which MONAI does not offer, is
    numpy's weighted ``inverted_cdf`` percentile.
    """
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    p = torch.from_numpy(np.pad(pred, 1))
    t = torch.from_numpy(np.pad(truth, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI-internal deprecations
        edges_p, edges_t, areas_p, areas_t = get_mask_edges(p, t, crop=False, spacing=tuple(spacing))
        d_pt = get_surface_distance(edges_p, edges_t, distance_metric="euclidean", spacing=tuple(spacing))
        d_tp = get_surface_distance(edges_t, edges_p, distance_metric="euclidean", spacing=tuple(spacing))
    directed = []
    for distances, areas, edges in ((d_pt, areas_p, edges_p), (d_tp, areas_t, edges_t)):
        d = torch.as_tensor(distances).reshape(-1).double().numpy()
        w = torch.as_tensor(areas)[torch.as_tensor(edges)].reshape(-1).double().numpy()
        directed.append(float(np.percentile(d, 95.0, weights=w, method="inverted_cdf")))
    return max(directed)


def _pred_components(p: np.ndarray) -> tuple[np.ndarray, int, list[tuple[slice, ...]]]:
    """``(component id per voxel (0: none), number of components, bounding box of each)`` of
    the prediction's 26-connected components, labelled on its bounding box (global ids and
    coordinates)."""
    pred_cc = np.zeros(p.shape, dtype=np.int32)
    n_pred = 0
    pred_boxes: list[tuple[slice, ...]] = []
    if p.any():
        pbox = _bbox(p)
        labelled, n_pred = ndimage.label(p[pbox], structure=_STRUCT_26)
        pred_cc[pbox] = labelled
        offset = [s.start for s in pbox]
        pred_boxes = [_shift(b, offset) for b in ndimage.find_objects(labelled)]
    return pred_cc, n_pred, pred_boxes


@dataclass
class _Tally:
    """Running sums over the reference's lesions (see :func:`_tally_lesions`)."""

    dice_sum: float = 0.0
    hd_sum: float = 0.0
    found: int = 0
    missed: int = 0
    dropped: int = 0


def _tally_lesions(t: np.ndarray, dil: int, thr: float, sp: tuple[float, ...], pred_cc: np.ndarray,
                   pred_boxes: Sequence[tuple[slice, ...]], matched_any: np.ndarray) -> _Tally:
    """Score each lesion of the reference ``t`` (its voxels grouped by the 26-connected blobs
    of the dilated reference) against the predicted components it touches after dilation;
    marks those components in ``matched_any``. Lesions of ``thr`` mm³ or less are dropped."""
    tally = _Tally()
    if not t.any():
        return tally
    voxel_mm3 = float(np.prod(sp))
    tbox = _grow(_bbox(t), dil, t.shape)
    t_box = t[tbox]
    blobs, _ = ndimage.label(_dilate(t_box, dil), structure=_STRUCT_26)
    lesions = np.where(t_box, blobs, 0)
    toff = [s.start for s in tbox]
    for index, lbox in enumerate(ndimage.find_objects(lesions), start=1):
        # lesion bbox (box coords) grown by the dilation: holds the lesion's dilation
        near = _grow(lbox, dil, t_box.shape)
        lesion_near = lesions[near] == index
        reach = _dilate(lesion_near, dil)
        ids = np.unique(pred_cc[_shift(near, toff)][reach])
        ids = ids[ids != 0]
        matched_any[ids] = True
        volume = int(lesion_near.sum()) * voxel_mm3
        if volume <= thr:
            tally.dropped += 1
            continue
        if ids.size == 0:
            tally.missed += 1
            tally.hd_sum += LESION_MISS_HD95_MM  # Dice 0
            continue
        tally.found += 1
        dice, hd95 = _matched_lesion_scores(pred_cc, ids, pred_boxes, _shift(lbox, toff),
                                            lesions[lbox] == index, sp)
        tally.dice_sum += dice
        tally.hd_sum += hd95
    return tally


def _matched_lesion_scores(pred_cc: np.ndarray, ids: np.ndarray, pred_boxes: Sequence[tuple[slice, ...]],
                           gbox: tuple[slice, ...], lesion: np.ndarray, sp: tuple[float, ...]
                           ) -> tuple[float, float]:
    """``(Dice, HD95)`` of one lesion (``lesion``: its mask on its box ``gbox``, global
    coordinates) against the union of the predicted components ``ids``, on the union box of
    the lesion and those components."""
    boxes = [gbox] + [pred_boxes[i - 1] for i in ids]
    ubox = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes))
                 for a in range(3))
    p_u = np.isin(pred_cc[ubox], ids)
    g_u = np.zeros(p_u.shape, dtype=bool)
    g_u[tuple(slice(g.start - u.start, g.stop - u.start) for g, u in zip(gbox, ubox))] = lesion
    dice = 2.0 * float(np.logical_and(p_u, g_u).sum()) / float(p_u.sum() + g_u.sum())
    return dice, surfel_hd95(p_u, g_u, sp)


def lesion_scores(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | float = 1.0,
    preset: str = DEFAULT_LESION_PRESET,
    dilation: int | None = None,
    threshold_mm3: float | None = None,
) -> LesionScores:
    """Lesion-wise Dice and HD95 (mm) and the lesion counts of one 3-D binary mask pair.

    Args:
        pred: predicted mask (bool or 0/1), 3-D.
        truth: reference mask, same shape.
        spacing: voxel size in mm per axis (one number = isotropic); default 1 mm.
        preset: challenge parameters, one of :data:`LESION_PRESETS` (default ``"gli"``).
        dilation: dilation steps (voxels), default None = the preset's.
        threshold_mm3: volume (mm³) at or below which a lesion is left out, default None =
            the preset's.

    Returns:
        :class:`LesionScores` following the rule of the module docstring.
    """
    dil, thr = lesion_parameters(preset, dilation, threshold_mm3)
    p = _as_bool_array(pred, "pred")
    t = _as_bool_array(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} != truth shape {t.shape}")
    if p.ndim != 3:
        raise ValueError(f"lesion-wise scores need 3-D masks, got shape {p.shape}")
    sp = _spacing(spacing, 3)
    pred_cc, n_pred, pred_boxes = _pred_components(p)
    matched_any = np.zeros(n_pred + 1, dtype=bool)
    tally = _tally_lesions(t, dil, thr, sp, pred_cc, pred_boxes, matched_any)
    false_positives = int(n_pred - matched_any[1:].sum())
    denominator = tally.found + tally.missed + false_positives
    if denominator == 0:
        return LesionScores(1.0, 0.0, 0, 0, 0, tally.dropped)
    return LesionScores(
        dice=tally.dice_sum / denominator,
        hd95=(tally.hd_sum + LESION_MISS_HD95_MM * false_positives) / denominator,
        found=tally.found, missed=tally.missed, false_positives=false_positives, dropped=tally.dropped,
    )


def lesion_region_scores(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | float = 1.0,
    preset: str = DEFAULT_LESION_PRESET,
    dilation: int | None = None,
    threshold_mm3: float | None = None,
) -> dict[str, float]:
    """Lesion-wise scores of each BraTS region (:data:`LESION_KEYS`).

    Args:
        pred: predicted region masks ``(3, D, H, W)`` ordered WT, TC, ET (bool or 0/1).
        truth: reference region masks, same shape.
        spacing, preset, dilation, threshold_mm3: as :func:`lesion_scores` (defaults 1 mm,
            ``"gli"``, the preset's dilation and threshold).

    Returns:
        ``{"lesion_dice_wt", ..., "lesion_hd95_et", "lesion_dice_mean", "lesion_hd95_mean",
        "lesion_found_wt", ..., "lesion_fp_et"}``; scores as floats, counts as floats of
        whole numbers (so that rows average like every other metric).
    """
    shape_p, shape_t = tuple(pred.shape), tuple(truth.shape)
    if shape_p != shape_t:
        raise ValueError(f"pred shape {shape_p} != truth shape {shape_t}")
    if len(shape_p) != 4 or shape_p[0] != len(REGIONS):
        raise ValueError(f"expected region masks of shape (3, D, H, W) ordered {REGIONS}, got {shape_p}")
    out: dict[str, float] = {}
    for i, region in enumerate(REGIONS):
        s = lesion_scores(pred[i], truth[i], spacing, preset, dilation, threshold_mm3)
        r = region.lower()
        out[f"lesion_dice_{r}"] = s.dice
        out[f"lesion_hd95_{r}"] = s.hd95
        out[f"lesion_found_{r}"] = float(s.found)
        out[f"lesion_missed_{r}"] = float(s.missed)
        out[f"lesion_fp_{r}"] = float(s.false_positives)
    out["lesion_dice_mean"] = float(np.mean([out[f"lesion_dice_{r.lower()}"] for r in REGIONS]))
    out["lesion_hd95_mean"] = float(np.mean([out[f"lesion_hd95_{r.lower()}"] for r in REGIONS]))
    return {k: out[k] for k in LESION_KEYS}


def mean_lesion_scores(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean over cases of every :data:`LESION_KEYS` key the rows all hold (empty dict if none)."""
    rows = list(rows)
    return {k: float(np.mean([float(r[k]) for r in rows])) for k in LESION_KEYS
            if rows and all(k in r for r in rows)}
