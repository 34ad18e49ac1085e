"""Dice / HD95 against MONAI and medpy, and the BraTS empty-mask conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

from m4fuse.data.regions import labels_to_regions
from m4fuse.evaluation.metrics import (
    EMPTY_HD95_MM,
    binary_scores,
    infer_et_label,
    label_scores,
    mean_scores,
    region_scores,
)

SPACING = (1.0, 0.7, 2.5)
SHAPE = (24, 28, 20)


def _blob(rng: np.random.Generator, shape=SHAPE, thresh: float = 0.6) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.5)
    mask = noise > thresh * noise.std()
    assert mask.any() and not mask.all()
    return mask


def _medpy_directed_p95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    surf = getattr(medpy_binary, "__surface_distances")  # medpy's own directed surface distances
    return float(np.percentile(surf(a, b, spacing, 1), 95))


def _scores_agreeing_with_medpy(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """``(dice, hd95 max, hd95 pooled)`` of binary_scores on ``SPACING``, each asserted equal to
    medpy's value."""
    dice, hd_max = binary_scores(a, b, SPACING)
    _, hd_pooled = binary_scores(a, b, SPACING, hd95="pooled")
    assert dice == pytest.approx(medpy_binary.dc(a, b), abs=1e-6)
    # medpy pools both directions: that is our "pooled" definition.
    assert hd_pooled == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=SPACING), rel=1e-5)
    # the default is the larger directed 95th percentile (MONAI's definition)
    expected_max = max(_medpy_directed_p95(a, b, SPACING), _medpy_directed_p95(b, a, SPACING))
    assert hd_max == pytest.approx(expected_max, rel=1e-5)
    return dice, hd_max, hd_pooled


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binary_scores_agree_with_medpy_and_monai(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = _blob(rng), _blob(rng)
    dice, hd_max, hd_pooled = _scores_agreeing_with_medpy(a, b)
    monai_hd = compute_hausdorff_distance(
        torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
        include_background=True, percentile=95, spacing=SPACING,
    )
    assert hd_max == pytest.approx(float(monai_hd), abs=1e-6)
    monai_dc = compute_dice(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])
    assert dice == pytest.approx(float(monai_dc), abs=1e-6)
    assert hd_pooled <= hd_max + 1e-6
    assert 0.0 < dice < 1.0 and hd_max > 0.0


def test_anisotropic_spacing_matters() -> None:
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    a[5:10, 5:10, 5:10] = True
    b[5:10, 5:10, 9:14] = True  # shifted 4 voxels along the last axis only
    _, hd_iso = binary_scores(a, b, 1.0)
    _, hd_aniso = binary_scores(a, b, (1.0, 1.0, 2.5))
    assert hd_iso == pytest.approx(4.0)
    assert hd_aniso == pytest.approx(10.0)


def test_empty_conventions() -> None:
    z = np.zeros(SHAPE, bool)
    m = np.zeros(SHAPE, bool)
    m[3:6, 3:6, 3:6] = True
    assert binary_scores(z, z, SPACING) == (1.0, 0.0)
    assert binary_scores(m, z, SPACING) == (0.0, EMPTY_HD95_MM)
    assert binary_scores(z, m, SPACING) == (0.0, EMPTY_HD95_MM)
    assert binary_scores(m, m, SPACING) == (1.0, 0.0)
    assert EMPTY_HD95_MM == 373.13


def test_region_scores_keys_and_values() -> None:
    rng = np.random.default_rng(7)
    pred = np.stack([_blob(rng) for _ in range(3)])
    truth = np.stack([_blob(rng) for _ in range(3)])
    truth[2] = False  # ET absent from truth, present in prediction
    s = region_scores(pred, truth, SPACING)
    assert set(s) == {
        "dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et", "dice_mean", "hd95_mean"
    }
    assert s["dice_et"] == 0.0 and s["hd95_et"] == EMPTY_HD95_MM
    assert s["dice_wt"] == pytest.approx(medpy_binary.dc(pred[0], truth[0]), abs=1e-6)
    assert s["dice_mean"] == pytest.approx((s["dice_wt"] + s["dice_tc"] + s["dice_et"]) / 3)
    # torch input gives the same numbers
    st = region_scores(torch.from_numpy(pred), torch.from_numpy(truth).float(), SPACING)
    assert st == pytest.approx(s)


def test_bad_inputs_are_named() -> None:
    m = np.zeros((3, *SHAPE), bool)
    with pytest.raises(ValueError, match="shape"):
        region_scores(m, m[:, :-1])
    with pytest.raises(ValueError, match=r"\(3, \*spatial\)"):
        region_scores(m[:2], m[:2])
    with pytest.raises(ValueError, match="spacing"):
        region_scores(m, m, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        region_scores(m, m, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="binary"):
        binary_scores(np.full(SHAPE, 2), np.zeros(SHAPE))
    with pytest.raises(ValueError, match="hd95"):
        binary_scores(m[0], m[0], hd95="mean")


def _label_map(rng: np.random.Generator, et: int) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[_blob(rng, thresh=0.3)] = 2
    lab[_blob(rng, thresh=0.8)] = 1
    lab[_blob(rng, thresh=1.2)] = et
    return lab


def test_label_scores_matches_region_scores_and_mixed_conventions() -> None:
    rng = np.random.default_rng(11)
    p, t = _label_map(rng, 4), _label_map(rng, 4)
    expected = region_scores(labels_to_regions(p, 4), labels_to_regions(t, 4), SPACING)
    assert label_scores(p, t, SPACING, et_label=4) == pytest.approx(expected)
    p3 = np.where(p == 4, 3, p)  # same prediction written with the 2023 convention
    assert label_scores(p3, t, SPACING) == pytest.approx(expected)
    with pytest.raises(ValueError, match="not in"):
        label_scores(p3, t, SPACING, et_label=4)
    with pytest.raises(ValueError, match="unknown label"):
        label_scores(np.full(SHAPE, 7), t, SPACING)
    s = label_scores(t, t, SPACING)
    assert all(s[f"dice_{r}"] == 1.0 and s[f"hd95_{r}"] == 0.0 for r in ("wt", "tc", "et"))


def test_infer_et_label_and_mean_scores() -> None:
    assert infer_et_label(np.array([0, 1, 4])) == 4
    assert infer_et_label(np.array([0, 3])) == 3
    assert infer_et_label(np.array([0, 1, 2]), default=3) == 3
    with pytest.raises(ValueError, match="both 3 and 4"):
        infer_et_label(np.array([3, 4]))
    rows = [
        dict(dice_wt=1, dice_tc=0.5, dice_et=0, hd95_wt=0, hd95_tc=2, hd95_et=4),
        dict(dice_wt=0, dice_tc=0.5, dice_et=1, hd95_wt=2, hd95_tc=2, hd95_et=0),
    ]
    m = mean_scores(rows)
    assert m["dice_wt"] == 0.5 and m["hd95_tc"] == 2.0 and m["dice_mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="hd95_et"):
        mean_scores([{k: v for k, v in rows[0].items() if k != "hd95_et"}])


def test_masks_touching_the_volume_border_agree_with_medpy() -> None:
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    a[0:6, 3:12, 14:20] = True  # touches three faces
    b[0:4, 0:10, 15:20] = True
    b[20:24, 20:28, 0:3] = True  # a far second component in the opposite corner
    _scores_agreeing_with_medpy(a, b)
