"""Training pipeline over the cache: MONAI dictionary augmentation, a Dataset and a site's loader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch.utils.data import Dataset

from m4fuse.data.cache import CaseRecord

KEYS = ("image", "label")
# Largest rotation about each axis, radians (about 10 degrees: "small rotations").
MAX_ROTATION = 0.18


def train_transforms() -> Compose:
    """Augmentation for ``{"image": (4, D, H, W), "label": (3, D, H, W)}`` float tensors.

    Flips on each axis (p 0.5 each), small rotations (±10°, p 0.3; bilinear image, nearest
    masks), per-channel intensity scale (±10 %, p 0.5) and shift (±0.1 SD, p 0.5), Gaussian
    noise (SD 0.05, p 0.2) and gamma (0.7-1.5, p 0.2) on the image only.
    """
    return Compose([
        EnsureTyped(keys=KEYS, data_type="tensor", dtype=torch.float32, track_meta=False),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
        RandRotated(keys=KEYS, range_x=MAX_ROTATION, range_y=MAX_ROTATION, range_z=MAX_ROTATION,
                    prob=0.3, mode=("bilinear", "nearest"), padding_mode="zeros", keep_size=True),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5, channel_wise=True),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5, channel_wise=True),
        RandGaussianNoised(keys="image", prob=0.2, std=0.05),
        RandAdjustContrastd(keys="image", prob=0.2, gamma=(0.7, 1.5)),
        EnsureTyped(keys=KEYS, data_type="tensor", dtype=torch.float32, track_meta=False),
    ])


class PreparedCaseDataset(Dataset):
    """Cached cases of one site as dicts: ``image`` float32 (4, D, H, W), ``label`` float32
    (3, D, H, W) region masks (WT, TC, ET), ``site`` long scalar, ``case`` str.

    Arrays are memory-mapped and copied per item, so the dataset is cheap to build and to
    pickle into loader workers. ``transform`` (default none) is applied to each item.
    """

    def __init__(self, records: Sequence[CaseRecord], site_index: int, transform: Any = None) -> None:
        if not records:
            raise ValueError("PreparedCaseDataset needs at least one record")
        if not isinstance(site_index, int) or site_index < 0:
            raise ValueError(f"site_index must be an int >= 0, got {site_index!r}")
        for r in records:
            if r.label_path is None:
                raise ValueError(f"case {r.case_id} has no cached label; training needs one")
        self.records = list(records)
        self.site_index = site_index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.array(r.image(), dtype=np.float32)),  # copy out of the mmap
            "label": torch.from_numpy(np.array(r.label(), dtype=np.float32)),
        }
        if self.transform is not None:
            item = self.transform(item)
        item["site"] = torch.tensor(self.site_index, dtype=torch.long)
        item["case"] = r.case_id
        return item


def make_loader(records: Sequence[CaseRecord], site_index: int, batch_size: int, augment: bool,
                shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A site's loader: batches of ``image`` float32 (B, 4, D, H, W), ``label`` float32
    (B, 3, D, H, W), ``site`` long (B,) (all equal to ``site_index``), ``case`` list[str].

    ``augment`` applies :func:`train_transforms`; ``shuffle`` reshuffles every epoch; both
    are seeded by ``seed`` (MONAI's DataLoader reseeds the transforms per worker).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    transform = None
    if augment:
        transform = train_transforms()
        transform.set_random_state(seed=seed)
    dataset = PreparedCaseDataset(records, site_index, transform)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, persistent_workers=num_workers > 0)
