"""Preprocessing, the cache (reuse/rebuild), every bad input, and mapping back to the original grid."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest

from m4fuse.cli.main import main
from m4fuse.data import (
    DataError,
    PrepareError,
    load_split,
    prepare_dataset,
    preprocess_case,
    preprocess_label,
    read_index,
    restore_to_original,
)
from m4fuse.data.fake import fake_volumes, write_fake_case
from m4fuse.data.regions import labels_to_regions

SIZE = (8, 16, 16)


def _hashes(root):
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_preprocess_case_alone(tmp_path):
    files = write_fake_case(tmp_path, "BraTS2021_00001", shape=(24, 20, 16))
    image, meta = preprocess_case([files[m] for m in ("t1", "t1ce", "t2", "flair")], SIZE)
    assert image.shape == (4, *SIZE) and image.dtype == np.float32
    assert meta["original_shape"] == [24, 20, 16] and meta["spacing"] == [1.0, 1.0, 1.0]
    assert meta["case_id"] == "BraTS2021_00001"
    # brain voxels z-scored per modality: mean ~0, SD ~1 over the crop's non-zero voxels
    raw = nib.load(files["t1"]).get_fdata()
    sl = tuple(slice(s, e) for s, e in zip(meta["crop_start"], meta["crop_end"]))
    assert (raw != 0).sum() == (raw[sl] != 0).sum()  # the crop keeps the whole brain
    assert all(e - s < n for s, e, n in zip(meta["crop_start"], meta["crop_end"], raw.shape))


def test_restore_label_agrees_with_original(tmp_path):
    shape = (28, 26, 20)
    files = write_fake_case(tmp_path, "BraTS2021_00002", shape=shape, seed=4)
    _, meta = preprocess_case({m: files[m] for m in ("t1", "t1ce", "t2", "flair")}, (16, 24, 24))
    regions = preprocess_label(files["seg"], meta, et_label=4)
    assert regions.shape == (3, 16, 24, 24) and regions.dtype == np.uint8
    back = restore_to_original(regions.astype(bool), meta)
    assert back.shape == (3, *shape) and back.dtype == bool
    truth = labels_to_regions(np.asarray(nib.load(files["seg"]).dataobj), 4)
    for k in range(3):
        assert _dice(back[k], truth[k]) > 0.85, k
    probs = restore_to_original(regions.astype(np.float32), meta, mode="linear")
    assert probs.dtype == np.float32 and _dice(probs[0] > 0.5, truth[0]) > 0.85
    with pytest.raises(ValueError, match="cubic"):
        restore_to_original(regions, meta, mode="cubic")


def test_prepare_reuse_and_rebuild(tmp_path):
    root = tmp_path / "root"
    for i in range(3):
        write_fake_case(root, f"BraTS2021_0000{i}", seed=i)
    before = _hashes(root)
    cache = tmp_path / "cache"
    rep = prepare_dataset(root, cache, SIZE, workers=1, progress=False)
    assert rep.prepared == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"] and not rep.skipped
    img = np.load(cache / "cases/BraTS2021_00001/image.npy", mmap_mode="r")
    assert isinstance(img, np.memmap) and img.shape == (4, *SIZE)
    assert read_index(cache)["size"] == list(SIZE)
    rep = prepare_dataset(root, cache, SIZE, workers=1, progress=False)
    assert rep.reused == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"] and not rep.prepared
    # a source changes -> only that case is rebuilt
    path = root / "BraTS2021_00001/BraTS2021_00001_flair.nii.gz"
    images, _ = fake_volumes(seed=9)
    nib.save(nib.Nifti1Image(images[3].astype(np.int16), np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    os.utime(path, ns=(1, 1))
    rep = prepare_dataset(root, cache, SIZE, workers=1, progress=False)
    assert rep.prepared == ["BraTS2021_00001"] and len(rep.reused) == 2
    # another training size -> everything rebuilt
    rep = prepare_dataset(root, cache, (8, 8, 8), workers=1, progress=False)
    assert len(rep.prepared) == 3
    assert np.load(cache / "cases/BraTS2021_00000/image.npy").shape == (4, 8, 8, 8)
    assert _hashes(root).keys() == before.keys()
    assert not any(p.name.startswith(".tmp") for p in cache.rglob("*"))


def test_prepare_two_workers_and_split(tmp_path):
    root = tmp_path / "root"
    for i, cid in enumerate(["BraTS19_CBICA_AAA_1", "BraTS19_CBICA_AAB_1", "BraTS19_TMC_00001_1",
                             "BraTS19_TMC_00002_1"]):
        write_fake_case(root, cid, "2019", grade="HGG" if i % 2 else "LGG", seed=i)
    write_fake_case(tmp_path / "gli", "BraTS-GLI-00000-000", "2023")
    rep = prepare_dataset(root, tmp_path / "cache", SIZE, workers=2, progress=False)
    assert len(rep.prepared) == 4
    split = load_split(tmp_path / "cache", seed=0, val_fraction=0.0, test_fraction=0.5)
    assert list(split) == ["CBICA", "TMC"]
    for site, parts in split.items():
        assert len(parts["train"]) == 1 and len(parts["test"]) == 1 and parts["val"] == []
        assert all(r.site == site for r in parts["train"] + parts["test"])
    rec = split["TMC"]["train"][0]
    assert rec.et_label == 4 and rec.original_shape == (24, 24, 16) and rec.affine.shape == (4, 4)
    assert rec.image().dtype == np.float32 and rec.label().shape == (3, *SIZE)
    # 2023 layout: ET label 3 is mapped into the ET channel
    prepare_dataset(tmp_path / "gli", tmp_path / "c23", SIZE, workers=1, progress=False)
    (split23,) = load_split(tmp_path / "c23", random_sites=1, val_fraction=0, test_fraction=0).values()
    lab = split23["train"][0].label()
    assert split23["train"][0].et_label == 3 and lab[2].sum() > 0 and (lab[2] <= lab[1]).all()


def _corrupt(kind, files):
    """Make one case bad in the way ``kind`` says; returns the file the error must name."""
    t1ce = files["t1ce"]
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    if kind == "missing":
        os.remove(files["t2"])
        return "t2.nii.gz"
    if kind == "shape":
        nib.save(nib.Nifti1Image(np.ones((24, 24, 15), np.int16), aff), t1ce)
        return t1ce.name
    if kind == "affine":
        img = nib.load(t1ce)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([-1.0, -1.0, 2.0, 1.0])), t1ce)
        return t1ce.name
    if kind == "truncated":
        data = t1ce.read_bytes()
        t1ce.write_bytes(data[: len(data) // 2])
        return t1ce.name
    if kind == "not_nifti":
        t1ce.write_bytes(gzip.compress(b"this is not an image" * 50))
        return t1ce.name
    if kind in ("nan", "inf"):
        data = np.asarray(nib.load(files["flair"]).dataobj).astype(np.float32)
        data[3, 4, 5] = np.nan if kind == "nan" else np.inf
        nib.save(nib.Nifti1Image(data, aff), files["flair"])
        return files["flair"].name
    if kind == "labels":
        seg = np.asarray(nib.load(files["seg"]).dataobj).copy()
        seg[10, 10, 8] = 3  # 3 is not a label in the 2021 convention (ET = 4)
        nib.save(nib.Nifti1Image(seg, aff), files["seg"])
        return files["seg"].name
    if kind == "empty":
        for m in ("t1", "t1ce", "t2", "flair"):
            nib.save(nib.Nifti1Image(np.zeros((24, 24, 16), np.int16), aff), files[m])
        return files["t1"].name
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "shape", "affine", "truncated", "not_nifti", "nan", "inf",
                                  "labels", "empty"])
def test_bad_input_skipped_and_named(tmp_path, kind, capsys):
    root = tmp_path / "root"
    write_fake_case(root, "BraTS2021_00000")
    bad = write_fake_case(root, "BraTS2021_00001", seed=1)
    expected_file = _corrupt(kind, bad)
    before = _hashes(root)
    cache = tmp_path / "cache"
    rep = prepare_dataset(root, cache, SIZE, workers=1, progress=False)
    assert rep.prepared == ["BraTS2021_00000"]
    ((case, reason),) = rep.skipped
    assert case == "BraTS2021_00001" and "case BraTS2021_00001" in reason and expected_file in reason
    assert list(json.loads((cache / "index.json").read_text())["cases"]) == ["BraTS2021_00000"]
    assert _hashes(root) == before  # sources never written
    # CLI: skipped cases listed at the end; non-zero exit only with --strict
    args = ["data", "prepare", str(root), "--cache", str(cache), "--size", "8", "16", "16", "--workers", "1"]
    assert main(args) == 0
    assert "skipped BraTS2021_00001" in capsys.readouterr().out
    assert main(args + ["--strict"]) == 1
    with pytest.raises(PrepareError, match="BraTS2021_00001"):
        prepare_dataset(root, cache, SIZE, workers=1, strict=True, progress=False)
    assert _hashes(root) == before


def test_preprocess_errors_name_case_and_file(tmp_path):
    files = write_fake_case(tmp_path, "BraTS2021_00003")
    paths = [files[m] for m in ("t1", "t1ce", "t2", "flair")]
    with pytest.raises(DataError, match="case X, file .*nope.nii.gz: file not found"):
        preprocess_case(paths[:3] + [tmp_path / "nope.nii.gz"], SIZE, case_id="X")
    with pytest.raises(ValueError, match=r"\(8, 16\)"):
        preprocess_case(paths, (8, 16))
    with pytest.raises(ValueError, match="got 3"):
        preprocess_case(paths[:3], SIZE)


def test_missing_seg_is_skipped_for_training(tmp_path):
    write_fake_case(tmp_path / "root", "BraTS2021_00000", with_seg=False)
    rep = prepare_dataset(tmp_path / "root", tmp_path / "cache", SIZE, workers=1, progress=False)
    assert "no segmentation" in rep.skipped[0][1] and "BraTS2021_00000_seg" in rep.skipped[0][1]


def _resave_permuted(files, out_dir, case_id):
    """Re-save a case with its voxel axes permuted (Y, Z, X) and X flipped, with the affine
    that keeps every voxel at the same physical position; returns the new files."""
    out_dir.mkdir(parents=True)
    out = {}
    for name, path in files.items():
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        # new voxel (i, j, k) = old (X-1-k, i, j): axes (Y, Z, X) with X flipped
        new = np.flip(data, axis=0).transpose(1, 2, 0)
        n_x = data.shape[0]
        old_from_new = np.array([[0, 0, -1, n_x - 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]],
                                dtype=np.float64)
        affine = img.affine @ old_from_new
        out[name] = out_dir / path.name.replace(files["t1"].parent.name, case_id)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(new), affine), out[name])
    return out


def test_stored_orientation_does_not_change_what_the_network_sees(tmp_path):
    """A hospital storing its files with other axis order and flips (and the matching affine)
    feeds the network the same canonical volume and gets predictions back on its own grid at
    the same physical positions."""
    files = write_fake_case(tmp_path / "a", "BraTS2021_00007", shape=(28, 24, 20), seed=7)
    moved = _resave_permuted(files, tmp_path / "b" / "BraTS2021_00008", "BraTS2021_00008")
    assert nib.aff2axcodes(nib.load(moved["t1"]).affine) != nib.aff2axcodes(nib.load(files["t1"]).affine)
    size = (16, 24, 24)
    modalities = ("t1", "t1ce", "t2", "flair")
    image_a, meta_a = preprocess_case([files[m] for m in modalities], size)
    image_b, meta_b = preprocess_case([moved[m] for m in modalities], size)
    np.testing.assert_allclose(image_b, image_a, rtol=0, atol=1e-5)
    labels_a = preprocess_label(files["seg"], meta_a, et_label=4)
    labels_b = preprocess_label(moved["seg"], meta_b, et_label=4)
    np.testing.assert_array_equal(labels_b, labels_a)
    assert meta_b["original_shape"] == [24, 20, 28] and meta_b["canonical_shape"] == [28, 24, 20]
    # the same prediction mapped back lands on each file's own grid at the same physical voxels
    back_a = restore_to_original(labels_a.astype(bool), meta_a)
    back_b = restore_to_original(labels_b.astype(bool), meta_b)
    assert back_b.shape == (3, 24, 20, 28)
    np.testing.assert_array_equal(back_b, np.flip(back_a, axis=1).transpose(0, 2, 3, 1))
    truth_b = labels_to_regions(np.asarray(nib.load(moved["seg"]).dataobj), 4)
    for k in range(3):
        assert _dice(back_b[k], truth_b[k]) > 0.85, k


def test_training_grid_spacing_follows_the_canonical_axes(tmp_path):
    """Anisotropic voxels: a case stored with permuted axes has its spacing listed in its own
    axis order; the training grid's voxel size (validation HD95 in mm) is the same as for the
    case stored LPS."""
    from m4fuse.data import CaseRecord
    from m4fuse.training.site_steps import training_grid_spacing

    files = write_fake_case(tmp_path / "a", "BraTS2021_00009", shape=(28, 24, 20), seed=9,
                            affine=np.diag([-1.0, -1.5, 2.5, 1.0]))
    moved = _resave_permuted(files, tmp_path / "b" / "BraTS2021_00010", "BraTS2021_00010")
    modalities = ("t1", "t1ce", "t2", "flair")
    spacings = []
    for case in (files, moved):
        _, meta = preprocess_case([case[m] for m in modalities], (16, 24, 24))
        record = CaseRecord(meta["case_id"], None, tmp_path / "x.npy", None, 4, meta)
        spacings.append(training_grid_spacing(record))
    assert spacings[1] == pytest.approx(spacings[0])
    assert len(set(np.round(spacings[0], 6))) == 3  # really anisotropic, so the order matters
