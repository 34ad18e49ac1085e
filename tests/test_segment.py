"""Checkpoints, ``m4fuse segment`` and ``m4fuse evaluate``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from m4fuse.cli.main import main
from m4fuse.cli.segment import evaluate_paths, segment_case
from m4fuse.data.fake import write_spaced_case
from m4fuse.evaluation.metrics import label_scores
from m4fuse.io.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    save_checkpoint,
    save_model_checkpoint,
)
from m4fuse.nets.model import M4Fuse, M4FuseConfig
from m4fuse.personal.sets import split_state

SIZE = (16, 16, 16)


def _model(experts: int = 2, seed: int = 0) -> M4Fuse:
    torch.manual_seed(seed)
    model = M4Fuse(M4FuseConfig(widths=(8, 8, 8, 8, 8, 8), num_experts=experts, d_state=2))
    with torch.no_grad():  # make the experts' contributions non-zero and distinct
        for name, p in model.named_parameters():
            if "site_experts" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run") / "model.ckpt"
    save_model_checkpoint(path, _model(), sites=["siteA", "siteB"], size=SIZE, metadata={"rounds": 3})
    return path


def test_checkpoint_round_trip_gives_same_outputs(ckpt: Path) -> None:
    model = _model()
    x = torch.randn(1, 4, *SIZE)
    loaded = load_checkpoint(ckpt.parent)  # a run folder works too
    assert loaded.sites == ["siteA", "siteB"] and loaded.size == SIZE
    assert loaded.metadata == {"rounds": 3}
    with torch.no_grad():
        for site, index in (("siteA", 0), ("siteB", 1)):
            net, expert = build_model(loaded, site)
            assert expert == 0
            assert torch.allclose(net(x, torch.tensor([0])), model(x, torch.tensor([index])), atol=1e-6)
        shared_net, expert = build_model(loaded, "siteZ")  # no expert: shared path only
        assert expert is None
        assert torch.allclose(shared_net(x, None), model(x, None), atol=1e-6)
        assert not torch.allclose(model(x, torch.tensor([0])), model(x, None), atol=1e-4)


def test_save_checkpoint_checks_its_input(tmp_path: Path) -> None:
    model = _model()
    shared, personal = split_state(model.state_dict())
    with pytest.raises(ValueError, match="site-expert keys"):
        save_checkpoint(tmp_path / "x.ckpt", model.config, model.state_dict())
    with pytest.raises(KeyError, match="index-free"):
        save_checkpoint(tmp_path / "x.ckpt", model.config, shared, {"a": personal})
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(tmp_path / "x.ckpt", model.config, shared, metadata={"f": object()})
    with pytest.raises(ValueError, match="size"):
        save_checkpoint(tmp_path / "x.ckpt", model.config, shared, size=(16, 16))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_checkpoint_files_give_clear_errors(tmp_path: Path, ckpt: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.ckpt.*not a readable M4Fuse checkpoint"):
        load_checkpoint(text)
    data = ckpt.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt.*truncated"):
        load_checkpoint(cut)
    other = tmp_path / "other.ckpt"
    torch.save({"format": "something-else", "state": {}}, other)
    with pytest.raises(CheckpointError, match="other.ckpt.*format 'something-else'"):
        load_checkpoint(other)
    plain = tmp_path / "plain.ckpt"
    torch.save(_model().state_dict(), plain)
    with pytest.raises(CheckpointError, match="plain.ckpt.*not an M4Fuse checkpoint"):
        load_checkpoint(plain)
    payload = torch.load(ckpt, weights_only=True)
    del payload["shared"]
    partial = tmp_path / "partial.ckpt"
    torch.save(payload, partial)
    with pytest.raises(CheckpointError, match=r"partial.ckpt.*lacks \['shared'\]"):
        load_checkpoint(partial)
    with pytest.raises(FileNotFoundError, match="model.ckpt"):
        load_checkpoint(tmp_path)  # a folder without model.ckpt
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_segment_writes_input_grid_and_valid_labels(tmp_path: Path, ckpt: Path) -> None:
    folder, labels, affine = write_spaced_case(tmp_path / "in", spacing=(1.0, 1.2, 2.0))
    out = tmp_path / "out" / "seg.nii.gz"
    assert main(["segment", str(folder), "--model", str(ckpt), "--site", "siteB", "--out", str(out),
                 "--device", "cpu"]) == 0
    img = nib.load(out)
    data = np.asarray(img.dataobj)
    assert data.shape == labels.shape
    assert np.allclose(img.affine, affine)
    assert set(np.unique(data).tolist()) <= {0, 1, 2, 4}
    assert img.get_data_dtype() == np.uint8
    ref = nib.load(folder / f"{folder.name}_t1.nii.gz")
    assert int(img.header["sform_code"]) == int(ref.header["sform_code"])
    assert img.header.get_zooms() == ref.header.get_zooms()


def test_segment_png_outlines_prediction_and_reference(tmp_path: Path, ckpt: Path) -> None:
    """``--png`` writes a picture of axial slices; the slices go through the case's tumour and
    the drawing refuses masks that do not match the images."""
    from PIL import Image

    from m4fuse.data.regions import labels_to_regions
    from m4fuse.inference.overlay import overlay_png, tumour_slices

    folder, labels, _ = write_spaced_case(tmp_path / "in", spacing=(1.0, 1.2, 2.0))
    png = tmp_path / "pics" / "case.png"
    assert main(["segment", str(folder), "--model", str(ckpt), "--site", "siteA", "--out",
                 str(tmp_path / "seg.nii.gz"), "--device", "cpu", "--png", str(png)]) == 0
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.size[0] > 300 and picture.size[1] > 300
    regions = np.asarray(labels_to_regions(labels, 4))
    zs = np.flatnonzero(regions[0].any(axis=(0, 1)))
    picks = tumour_slices(regions, labels.shape[-1])
    assert picks and all(zs.min() <= z <= zs.max() for z in picks)
    assert int(np.argmax(regions[0].sum(axis=(0, 1)))) in picks
    flair = np.zeros(labels.shape, np.float32)
    with pytest.raises(ValueError, match="prediction masks have shape"):
        overlay_png({"flair": flair}, tmp_path / "x.png", prediction=regions[:, :-1])
    with pytest.raises(ValueError, match="needs one of"):
        overlay_png({"t2": flair}, tmp_path / "x.png")


def test_segment_site_choice_and_et_convention(tmp_path: Path, ckpt: Path) -> None:
    folder, _, _ = write_spaced_case(tmp_path / "in", case_id="BraTS-GLI-00001-000", et_label=3, layout="2023")
    a = segment_case(folder, ckpt, tmp_path / "a.nii.gz", site="siteA", device="cpu")
    z = segment_case(folder, ckpt, tmp_path / "z.nii.gz", site=None, device="cpu")
    assert a["expert"] == 0 and z["expert"] is None
    # a site the model does not have is an error listing its sites, not the shared model
    with pytest.raises(ValueError, match=r"--site 'unknown'.*its sites: siteA, siteB"):
        segment_case(folder, ckpt, tmp_path / "u.nii.gz", site="unknown", device="cpu")
    assert not (tmp_path / "u.nii.gz").exists()
    assert a["et_label"] == 3  # 2023 naming -> ET = 3
    values = set(np.unique(np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj)).tolist())
    assert values <= {0, 1, 2, 3}
    four = segment_case(folder, ckpt, tmp_path / "four.nii.gz", site="siteA", device="cpu", et_label=4)
    assert four["et_label"] == 4
    a_data = np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj)
    four_data = np.asarray(nib.load(tmp_path / "four.nii.gz").dataobj)
    assert np.array_equal(np.where(a_data == 3, 4, a_data), four_data)
    write_spaced_case(tmp_path / "two", case_id="BraTS2021_00001")
    write_spaced_case(tmp_path / "two", case_id="BraTS2021_00002")
    with pytest.raises(ValueError, match="exactly one BraTS case, found BraTS2021_00001, BraTS2021_00002"):
        segment_case(tmp_path / "two", ckpt, tmp_path / "x.nii.gz", device="cpu")
    with pytest.raises(ValueError, match="--out"):
        segment_case(folder, ckpt, tmp_path / "x.png", device="cpu")


def test_segment_without_recorded_size_needs_size(tmp_path: Path) -> None:
    model = _model(experts=1)
    shared, _ = split_state(model.state_dict())
    path = save_checkpoint(tmp_path / "run" / "model.ckpt", model.config, shared)
    folder, _, _ = write_spaced_case(tmp_path / "in")
    with pytest.raises(ValueError, match="training size.*--size"):
        segment_case(folder, path.parent, tmp_path / "x.nii.gz", device="cpu")
    info = segment_case(folder, path.parent, tmp_path / "x.nii.gz", device="cpu", size=SIZE)
    assert info["expert"] is None


def test_segment_then_evaluate_equals_direct_metrics(tmp_path: Path, ckpt: Path, capsys) -> None:
    spacing = (1.0, 1.2, 2.0)
    folder, labels, _ = write_spaced_case(tmp_path / "data", spacing=spacing)
    out = tmp_path / "preds" / f"{folder.name}.nii.gz"
    segment_case(folder, ckpt, out, site="siteA", device="cpu")
    pred = np.asarray(nib.load(out).dataobj)
    seg = folder / f"{folder.name}_seg.nii.gz"
    # the spacing `evaluate` reads: the header's zooms, stored as float32 (1.2 -> 1.2000000477)
    header_spacing = tuple(float(z) for z in nib.load(seg).header.get_zooms()[:3])
    assert header_spacing == pytest.approx(spacing)
    direct = label_scores(pred, labels, header_spacing, et_label=4)
    # files
    capsys.readouterr()
    assert main(["evaluate", str(out), str(seg), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and set(rows[0]) == {
        "case", "dice_et", "dice_tc", "dice_wt", "hd95_et", "hd95_tc", "hd95_wt",
        *(f"lesion_{m}_{r}" for m in ("dice", "hd95", "found", "missed", "fp")
          for r in ("et", "tc", "wt")),
    }
    assert rows[0]["case"] == folder.name
    for key in ("dice_wt", "dice_tc", "dice_et", "hd95_wt", "hd95_tc", "hd95_et"):
        assert rows[0][key] == pytest.approx(direct[key], abs=1e-9), key
    # folders: predictions folder vs a BraTS-layout reference folder
    row = evaluate_paths(out.parent, tmp_path / "data")[0]
    assert {k: row[k] for k in ("case", *direct)} == pytest.approx({"case": folder.name, **direct})
    # the table output names the case and a mean row
    assert main(["evaluate", str(out.parent), str(tmp_path / "data")]) == 0
    table = capsys.readouterr().out
    assert folder.name in table and "mean" in table


def test_evaluate_truth_against_itself_and_mismatches(tmp_path: Path, capsys) -> None:
    _, labels, affine = write_spaced_case(tmp_path / "a", case_id="BraTS2021_00001", seed=1)
    write_spaced_case(tmp_path / "a", case_id="BraTS2021_00002", seed=2)
    rows = evaluate_paths(tmp_path / "a", tmp_path / "a")
    assert [r["case"] for r in rows] == ["BraTS2021_00001", "BraTS2021_00002"]
    for r in rows:
        assert all(r[f"dice_{k}"] == 1.0 and r[f"hd95_{k}"] == 0.0 for k in ("wt", "tc", "et"))
    # flat folder of predictions missing one case
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(tmp_path / "a" / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz", flat)
    with pytest.raises(ValueError, match="no prediction for \\['BraTS2021_00002'\\]"):
        evaluate_paths(flat, tmp_path / "a")
    # a prediction on another grid
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(labels[:-1], affine), bad)
    with pytest.raises(ValueError, match="shape"):
        evaluate_paths(bad, tmp_path / "a" / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz")
    with pytest.raises(ValueError, match="both be files or both folders"):
        evaluate_paths(bad, tmp_path / "a")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not nifti")
    with pytest.raises(ValueError, match="junk.nii.gz.*not a readable NIfTI"):
        evaluate_paths(junk, bad)


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    folder, _, _ = write_spaced_case(tmp_path / "in")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    assert main(["segment", str(folder), "--model", str(notes), "--out", str(tmp_path / "o.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m4fuse segment: error:") and "notes.txt" in err and "Traceback" not in err
    assert main(["evaluate", str(tmp_path / "nothing"), str(folder)]) == 2
    assert "prediction path not found" in capsys.readouterr().err
