"""The training loader over the cache: batch keys, shapes, dtypes, site index, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m4fuse.data import load_split, make_loader, prepare_dataset, train_transforms
from m4fuse.data.fake import write_fake_case

SIZE = (8, 16, 16)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    for i in range(4):
        write_fake_case(root, f"BraTS2021_0000{i}", seed=i)
    (root / "partition.csv").write_text(
        "Partition_ID,Subject_ID\nA,BraTS2021_00000\nA,BraTS2021_00001\nB,BraTS2021_00002\nB,BraTS2021_00003\n")
    cache = root.parent / "cache"
    prepare_dataset(root, cache, SIZE, workers=1, progress=False)
    return load_split(cache, val_fraction=0.0, test_fraction=0.0)


def test_sites_from_partition_csv_recorded_at_prepare(split):
    assert list(split) == ["A", "B"]
    assert [r.case_id for r in split["B"]["train"]] == ["BraTS2021_00002", "BraTS2021_00003"]


def test_batches(split):
    loader = make_loader(split["B"]["train"], site_index=1, batch_size=2, augment=False, shuffle=False)
    (batch,) = list(loader)
    assert set(batch) == {"image", "label", "site", "case"}
    assert batch["image"].shape == (2, 4, *SIZE) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 3, *SIZE) and batch["label"].dtype == torch.float32
    assert batch["site"].dtype == torch.long and batch["site"].tolist() == [1, 1]
    assert batch["case"] == ["BraTS2021_00002", "BraTS2021_00003"]
    lab = batch["label"]
    assert set(lab.unique().tolist()) <= {0.0, 1.0}
    assert (lab[:, 2] <= lab[:, 1]).all() and (lab[:, 1] <= lab[:, 0]).all()
    rec = split["B"]["train"][0]
    assert torch.equal(batch["image"][0], torch.from_numpy(np.asarray(rec.image(), np.float32)))


def test_augmentation_seeded_and_masks_stay_binary(split):
    def first(seed):
        loader = make_loader(split["A"]["train"], 0, batch_size=2, augment=True, shuffle=True, seed=seed)
        return next(iter(loader))

    a, b, c = first(5), first(5), first(6)
    assert torch.equal(a["image"], b["image"]) and a["case"] == b["case"]
    assert not torch.equal(a["image"], c["image"])
    assert set(a["label"].unique().tolist()) <= {0.0, 1.0}
    assert a["image"].shape == (2, 4, *SIZE)
    names = [type(t).__name__ for t in train_transforms().transforms]
    for needed in ("RandFlipd", "RandRotated", "RandScaleIntensityd", "RandShiftIntensityd",
                   "RandGaussianNoised", "RandAdjustContrastd"):
        assert needed in names


def test_loader_argument_checks(split):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        make_loader(split["A"]["train"], 0, 0, False, False)
    with pytest.raises(ValueError, match="site_index must be an int >= 0, got -1"):
        make_loader(split["A"]["train"], -1, 1, False, False)
