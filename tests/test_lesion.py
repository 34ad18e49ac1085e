"""Lesion-wise Dice and HD95 (the BraTS 2023+ rule) on hand-built label maps.

Every expected value is worked out by hand in the test from the rule (m4fuse/evaluation/lesion.py):
score = sum over the kept lesions / (kept lesions + false positives), a missed lesion or a
false positive adds Dice 0 and HD95 374 mm, lesions of volume <= the threshold are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from m4fuse.cli.main import main
from m4fuse.cli.segment import evaluate_paths
from m4fuse.evaluation.metrics import (
    LESION_KEYS,
    LESION_PRESETS,
    label_scores,
    lesion_label_scores,
    lesion_parameters,
    lesion_region_scores,
    lesion_scores,
)

SHAPE = (32, 32, 24)
MISS = 374.0


def _cube(mask: np.ndarray, corner: tuple[int, int, int], size: int | tuple[int, int, int],
          value: int | bool = True) -> np.ndarray:
    sizes = (size,) * 3 if isinstance(size, int) else size
    mask[tuple(slice(c, c + s) for c, s in zip(corner, sizes))] = value
    return mask


def _empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=bool)


def test_presets_and_overrides() -> None:
    assert LESION_PRESETS == {"gli": (3, 50.0), "ssa": (3, 50.0), "men": (1, 50.0),
                              "ped": (3, 50.0), "met": (1, 2.0)}
    assert lesion_parameters() == (3, 50.0)
    assert lesion_parameters("MET") == (1, 2.0)
    assert lesion_parameters("men", dilation=2, threshold_mm3=10) == (2, 10.0)
    with pytest.raises(ValueError, match="'brats' is not one of"):
        lesion_parameters("brats")
    with pytest.raises(ValueError, match="dilation must be a whole number"):
        lesion_parameters(dilation=-1)
    with pytest.raises(ValueError, match="threshold"):
        lesion_parameters(threshold_mm3=float("nan"))


def test_two_lesions_one_missed() -> None:
    truth = _cube(_cube(_empty(), (2, 2, 2), 4), (20, 20, 14), 4)  # 64 voxels each > 50 mm^3
    pred = _cube(_empty(), (2, 2, 2), 4)  # the first lesion exactly
    s = lesion_scores(pred, truth)
    # (Dice 1 + Dice 0) / 2 lesions; (HD95 0 + 374) / 2
    assert (s.dice, s.hd95) == pytest.approx((0.5, 187.0))
    assert (s.found, s.missed, s.false_positives, s.dropped) == (1, 1, 0, 0)
    # the voxel-wise Dice hardly notices: 2 * 64 / (64 + 128)
    assert label_scores(pred.astype(np.uint8), truth.astype(np.uint8))["dice_wt"] == pytest.approx(2 / 3)


def test_far_false_positive() -> None:
    truth = _cube(_empty(), (2, 2, 2), 4)
    pred = _cube(_cube(_empty(), (2, 2, 2), 4), (26, 26, 18), 2)  # the lesion + an 8-voxel blob far away
    s = lesion_scores(pred, truth)
    # one lesion (Dice 1, HD95 0) and one false positive (0, 374) over 1 + 1
    assert (s.dice, s.hd95) == pytest.approx((0.5, 187.0))
    assert (s.found, s.missed, s.false_positives) == (1, 0, 1)


def test_two_lesions_merged_by_the_dilation() -> None:
    # two 4^3 cubes along axis 0 at z 2..5 and 11..14: a gap of 5 empty voxels. Dilated 3 times
    # (gli) each reaches 3 voxels into the gap: the blobs overlap -> one lesion of 128 voxels.
    # Dilated once (men) they stay apart -> two lesions.
    truth = _cube(_cube(_empty(), (2, 2, 2), 4), (11, 2, 2), 4)
    pred = _cube(_empty(), (2, 2, 2), 4)  # the first cube only
    gli = lesion_scores(pred, truth, preset="gli")
    # one lesion matched by the prediction: Dice 2 * 64 / (64 + 128), nothing missed
    assert gli.dice == pytest.approx(2 / 3)
    assert (gli.found, gli.missed, gli.false_positives) == (1, 0, 0)
    # its HD95: the predicted surface lies on the lesion's (0 mm); on the grid of voxel corners
    # the second cube spans x 11..15, 5 to 9 mm from the prediction's face at x = 6, and holds
    # half of the lesion's surface: the 95th percentile lies in (5, 9] mm
    assert 5.0 < gli.hd95 <= 9.0
    men = lesion_scores(pred, truth, preset="men")
    assert (men.dice, men.hd95) == pytest.approx((0.5, 187.0))
    assert (men.found, men.missed, men.false_positives) == (1, 1, 0)


def test_a_lesion_under_the_threshold_that_is_missed_is_not_counted() -> None:
    truth = _cube(_cube(_empty(), (2, 2, 2), 4), (20, 20, 14), 3)  # 64 and 27 voxels at 1 mm
    pred = _cube(_empty(), (2, 2, 2), 4)
    gli = lesion_scores(pred, truth)  # 27 mm^3 <= 50: left out
    assert (gli.dice, gli.hd95) == pytest.approx((1.0, 0.0))
    assert (gli.found, gli.missed, gli.false_positives, gli.dropped) == (1, 0, 0, 1)
    met = lesion_scores(pred, truth, preset="met")  # 27 > 2 mm^3: counted, missed
    assert (met.dice, met.hd95) == pytest.approx((0.5, 187.0))
    assert (met.found, met.missed, met.dropped) == (1, 1, 0)
    # a threshold set by hand: 64 mm^3 is at most 64 -> both left out, nothing to score
    both = lesion_scores(pred, truth, threshold_mm3=64)
    assert (both.dice, both.hd95, both.dropped) == (1.0, 0.0, 2)
    # a prediction matching a left-out lesion is not a false positive either
    small_hit = lesion_scores(_cube(pred.copy(), (20, 20, 14), 1), truth)
    assert (small_hit.dice, small_hit.false_positives) == (1.0, 0)


def test_matching_through_the_dilation_without_overlap() -> None:
    truth = _cube(_empty(), (2, 2, 2), 4)  # x 2..5
    pred = _cube(_empty(), (9, 2, 2), 4)  # x 9..12: 3 empty voxels between them
    # gli: the lesion dilated 3 times reaches x = 8 < 9 -> no overlap: missed + a false positive
    gli = lesion_scores(pred, truth)
    assert (gli.dice, gli.hd95) == pytest.approx((0.0, MISS))
    assert (gli.found, gli.missed, gli.false_positives) == (0, 1, 1)
    # dilation 4 by hand reaches x = 9: matched; Dice 0 (no overlap), HD95 finite, no false positive
    near = lesion_scores(pred, truth, dilation=4)
    assert near.dice == 0.0 and (near.found, near.missed, near.false_positives) == (1, 0, 0)
    # on the grid of voxel corners the surfaces span x 2..6 and x 9..13 (same y, z): every
    # surface point is 3 (facing faces) to 7 mm (far face to facing face) from the other
    # surface, so the 95th percentile lies in [3, 7] mm
    assert 3.0 <= near.hd95 <= 7.0


def test_no_et_in_either_map_and_et_only_in_the_prediction() -> None:
    truth = _cube(np.zeros(SHAPE, np.uint8), (4, 4, 4), 6, 2)  # oedema
    _cube(truth, (6, 6, 6), 2, 1)  # necrosis (8 voxels: a TC lesion under 50 mm^3)
    pred = truth.copy()
    none = lesion_label_scores(pred, truth, et_label=3)
    # ET: no lesion, no predicted component -> Dice 1, HD95 0
    assert (none["lesion_dice_et"], none["lesion_hd95_et"]) == (1.0, 0.0)
    assert (none["lesion_found_et"], none["lesion_missed_et"], none["lesion_fp_et"]) == (0, 0, 0)
    # WT: one lesion of 216 voxels predicted exactly; TC: its only lesion is left out -> 1, 0
    assert (none["lesion_dice_wt"], none["lesion_hd95_wt"], none["lesion_found_wt"]) == (1.0, 0.0, 1)
    assert (none["lesion_dice_tc"], none["lesion_hd95_tc"], none["lesion_found_tc"]) == (1.0, 0.0, 0)
    et_pred = _cube(pred.copy(), (8, 8, 8), 1, 3)  # one ET voxel inside the oedema
    only = lesion_label_scores(et_pred, truth, et_label=3)
    # ET: no lesion, one false positive -> 0 / 1 and 374 / 1
    assert (only["lesion_dice_et"], only["lesion_hd95_et"], only["lesion_fp_et"]) == (0.0, MISS, 1)
    # TC gains the ET voxel (TC = 1 + ET): its 9-voxel component matches the left-out lesion
    assert (only["lesion_dice_tc"], only["lesion_fp_tc"]) == (1.0, 0)
    assert set(only) == set(LESION_KEYS)
    assert only["lesion_dice_mean"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)


def test_anisotropic_voxels() -> None:
    truth = _cube(_empty(), (4, 4, 4), 4)
    pred = _cube(_empty(), (5, 4, 4), 4)  # shifted one voxel along axis 0
    for spacing, hd in (((1.0, 1.0, 1.0), 1.0), ((2.0, 1.0, 1.0), 2.0), ((0.5, 3.0, 3.0), 0.5)):
        s = lesion_scores(pred, truth, spacing=spacing, threshold_mm3=0)
        # overlap 3 * 4 * 4 = 48 of 64 + 64 voxels. On the grid of voxel corners the surfaces
        # span x 4..8 and x 5..9: no surface point is more than one step along axis 0 from the
        # other surface, and each surface's outer face (x = 4, resp. x = 9; a sixth of its area
        # or more, over 5 %) is exactly one step away: HD95 = one voxel along axis 0, in mm
        assert s.dice == pytest.approx(2 * 48 / 128)
        assert s.hd95 == pytest.approx(hd)
    # the volume threshold is in mm^3: 27 voxels are 27 mm^3 at 1 mm (left out under 50) and
    # 54 mm^3 at 2 x 1 x 1 mm (kept, and missed by an empty prediction)
    small = _cube(_empty(), (4, 4, 4), 3)
    assert lesion_scores(_empty(), small, spacing=1.0).dropped == 1
    wide = lesion_scores(_empty(), small, spacing=(2.0, 1.0, 1.0))
    assert (wide.dice, wide.hd95, wide.missed, wide.dropped) == (0.0, MISS, 1, 0)


def test_empty_prediction_and_empty_maps() -> None:
    truth = _cube(_cube(_empty(), (2, 2, 2), 4), (20, 20, 14), 5)
    s = lesion_scores(_empty(), truth)
    assert (s.dice, s.hd95) == (0.0, MISS)
    assert (s.found, s.missed, s.false_positives) == (0, 2, 0)
    both = lesion_scores(_empty(), _empty())
    assert (both.dice, both.hd95, both.found, both.missed, both.false_positives) == (1.0, 0.0, 0, 0, 0)
    regions = lesion_region_scores(np.zeros((3, *SHAPE), bool), np.zeros((3, *SHAPE), bool))
    assert regions["lesion_dice_mean"] == 1.0 and regions["lesion_hd95_mean"] == 0.0


def test_a_component_matching_two_lesions_counts_for_both() -> None:
    # two lesions 8 voxels apart (not merged by gli), one predicted bar across both
    truth = _cube(_cube(_empty(), (2, 2, 2), 4), (14, 2, 2), 4)
    pred = _cube(_empty(), (2, 2, 2), (16, 4, 4))  # covers both cubes and the gap
    s = lesion_scores(pred, truth)
    # each lesion against the whole bar: Dice 2 * 64 / (64 + 256) = 0.4
    assert s.dice == pytest.approx(0.4)
    assert (s.found, s.missed, s.false_positives) == (2, 0, 0)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="shape"):
        lesion_scores(_empty(), np.zeros((8, 8, 8), bool))
    with pytest.raises(ValueError, match="binary mask"):
        lesion_scores(np.full(SHAPE, 2), _empty())
    with pytest.raises(ValueError, match="spacing"):
        lesion_scores(_empty(), _empty(), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3-D"):
        lesion_scores(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match=r"prediction: unknown label values \[5\]"):
        lesion_label_scores(np.full(SHAPE, 5, np.uint8), np.zeros(SHAPE, np.uint8))


def _write(path: Path, labels: np.ndarray, spacing: tuple[float, float, float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.int16), np.diag([*spacing, 1.0])), path)
    return path


def test_evaluate_command_json_and_table(tmp_path: Path, capsys) -> None:
    truth = np.zeros(SHAPE, np.int16)
    _cube(truth, (2, 2, 2), 4, 2)
    _cube(truth, (20, 20, 14), 4, 2)
    _cube(truth, (3, 3, 3), 2, 4)  # 8 ET voxels (2019-2021 labels) inside the first lesion
    pred = np.zeros(SHAPE, np.int16)
    _cube(pred, (2, 2, 2), 4, 2)  # first WT lesion exactly; second missed; ET missed
    t = _write(tmp_path / "truth" / "case1_seg.nii.gz", truth, (1.0, 1.0, 1.0))
    p = _write(tmp_path / "pred" / "case1.nii.gz", pred, (1.0, 1.0, 1.0))
    assert main(["evaluate", str(p), str(t), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows[0]) == {
        "case", "dice_et", "dice_tc", "dice_wt", "hd95_et", "hd95_tc", "hd95_wt",
        "lesion_dice_et", "lesion_dice_tc", "lesion_dice_wt",
        "lesion_hd95_et", "lesion_hd95_tc", "lesion_hd95_wt",
        "lesion_found_et", "lesion_found_tc", "lesion_found_wt",
        "lesion_missed_et", "lesion_missed_tc", "lesion_missed_wt",
        "lesion_fp_et", "lesion_fp_tc", "lesion_fp_wt",
    }
    row = rows[0]
    # WT: one of two lesions found -> 0.5 / 187; ET (8 voxels, <= 50 mm^3 under gli): left out
    assert (row["lesion_dice_wt"], row["lesion_hd95_wt"]) == pytest.approx((0.5, 187.0))
    assert (row["lesion_found_wt"], row["lesion_missed_wt"], row["lesion_fp_wt"]) == (1, 1, 0)
    assert (row["lesion_dice_et"], row["lesion_hd95_et"], row["lesion_missed_et"]) == (1.0, 0.0, 0)
    # voxel-wise ET: truth has ET, the prediction none -> Dice 0, HD95 373.13
    assert (row["dice_et"], row["hd95_et"]) == (0.0, 373.13)
    # met preset: the 8 mm^3 ET lesion counts (> 2) and is missed
    assert main(["evaluate", str(p), str(t), "--json", "--lesion-preset", "met"]) == 0
    met = json.loads(capsys.readouterr().out)[0]
    assert (met["lesion_dice_et"], met["lesion_hd95_et"], met["lesion_missed_et"]) == (0.0, MISS, 1)
    # dilation / threshold by hand
    rows = evaluate_paths(p, t, lesion_threshold_mm3=100.0)  # both 64-voxel WT lesions left out
    assert rows[0]["lesion_dice_wt"] == 1.0 and rows[0]["lesion_found_wt"] == 0
    # the table shows the lesion-wise columns beside the voxel-wise ones
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "truth")]) == 0
    table = capsys.readouterr().out
    assert "ldice_wt" in table and "dice_wt" in table and "1/1/0" in table and "preset gli" in table


def test_evaluate_bad_input_names_the_file(tmp_path: Path, capsys) -> None:
    truth = _cube(np.zeros(SHAPE, np.int16), (2, 2, 2), 4, 2)
    t = _write(tmp_path / "t.nii.gz", truth, (1.0, 1.0, 1.0))
    p = _write(tmp_path / "p.nii.gz", truth, (1.0, 1.0, 2.0))
    assert main(["evaluate", str(p), str(t)]) == 2
    err = capsys.readouterr().err
    assert "p.nii.gz has voxel spacing (1.0, 1.0, 2.0) mm" in err and "Traceback" not in err
    bad = _write(tmp_path / "bad.nii.gz", np.full(SHAPE, 7, np.int16), (1.0, 1.0, 1.0))
    assert main(["evaluate", str(bad), str(t)]) == 2
    err = capsys.readouterr().err
    assert "bad.nii.gz" in err and "[7]" in err and err.count("\n") == 1
    assert main(["evaluate", str(t), str(t), "--lesion-dilation", "-2"]) == 2
    assert "dilation must be a whole number >= 0, got -2" in capsys.readouterr().err


def test_bench_lesion_prints_a_row_per_grid(capsys) -> None:
    from benchmarks import bench_lesion

    assert bench_lesion.main(["--grids", "32", "32", "24", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32x32x24")]
    assert len(rows) == 1 and rows[0].count("|") == 8


def test_lesion_scores_reach_the_site_table_and_mlflow_keys() -> None:
    from m4fuse.run.report import markdown_table, site_rows
    from m4fuse.run.tracking import final_test_metrics

    def test_means(dice: float, lesion: float, n: float) -> dict[str, float]:
        out = {f"{m}_{g}": dice if m == "dice" else 2.0 for m in ("dice", "hd95")
               for g in ("wt", "tc", "et", "mean")}
        out.update({f"lesion_{m}_{g}": lesion if m == "dice" else 100.0
                    for m in ("dice", "hd95") for g in ("wt", "tc", "et", "mean")})
        out["num-examples"] = n
        return out

    test = {0: test_means(0.8, 0.5, 1.0), 1: test_means(0.9, 0.8, 3.0)}
    rows = site_rows(["a", "b"], {}, test)
    # case-weighted mean row: (0.5 * 1 + 0.8 * 3) / 4 = 0.725
    assert rows[-1]["test_lesion_dice_wt"] == pytest.approx(0.725)
    table = markdown_table(rows)
    assert "test lesion Dice WT" in table and "test lesion HD95 ET" in table
    assert "| 0.725 |" in table and "| 100.0 |" in table
    logged = final_test_metrics(rows[-1], test)
    assert logged["test_lesion_dice_wt"] == pytest.approx(0.725)
    assert logged["site1/test_lesion_dice_et"] == 0.8 and logged["site0/test_lesion_hd95_mean"] == 100.0
