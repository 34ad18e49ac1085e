"""BraTS label conventions and the three evaluated regions.

Label maps use 0 background, 1 necrotic / non-enhancing core (NCR), 2 peritumoral oedema (ED)
and an enhancing-tumour (ET) label that is 4 in BraTS 2019-2021 and 3 in BraTS 2023+.
Regions (the network's sigmoid channels, in this order): WT = {1, 2, ET}, TC = {1, ET}, ET.
Inside the project the 4-class ("labels") output always uses 0/1/2/3 (ET = 3).
"""

from __future__ import annotations

import numpy as np
import torch

REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
ET_LABELS: tuple[int, ...] = (4, 3)


def valid_labels(et_label: int) -> set[int]:
    """The label values allowed in a segmentation whose ET label is ``et_label``."""
    if et_label not in ET_LABELS:
        raise ValueError(f"et_label must be one of {ET_LABELS}, got {et_label!r}")
    return {0, 1, 2, et_label}


def labels_to_regions(label: np.ndarray | torch.Tensor, et_label: int = 4):
    """Label map (...spatial) -> boolean region masks (3, ...spatial) ordered WT, TC, ET."""
    valid_labels(et_label)
    et = label == et_label
    tc = (label == 1) | et
    wt = tc | (label == 2)
    if isinstance(label, torch.Tensor):
        return torch.stack([wt, tc, et])
    return np.stack([wt, tc, et])


def regions_to_labels(regions: np.ndarray | torch.Tensor, et_label: int = 4):
    """Boolean region masks (3, ...) ordered WT, TC, ET -> label map with ET = ``et_label``.

    The regions are made nested first (ET inside TC inside WT), as BraTS post-processing does.
    """
    valid_labels(et_label)
    wt, tc, et = (r.astype(bool) if isinstance(r, np.ndarray) else r.bool() for r in regions)
    tc = tc & wt
    et = et & tc
    if isinstance(wt, torch.Tensor):
        out = torch.zeros(wt.shape, dtype=torch.uint8, device=wt.device)
    else:
        out = np.zeros(wt.shape, dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = et_label
    return out


def classes_to_regions(classes: np.ndarray | torch.Tensor):
    """4-class map (0/1/2/3, ET = 3) -> boolean region masks (3, ...) ordered WT, TC, ET."""
    return labels_to_regions(classes, et_label=3)
