"""Shared helpers of the tests: the tiny settings every test that composes the project's
config starts from (:data:`TINY_OVERRIDES`), and for tests/test_engine.py and
tests/test_segment.py a tiny network with the M4Fuse forward signature and learnable toy
batches. A small BraTS-style case on disk: :mod:`m4fuse.data.fake`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from scipy import ndimage
from torch import nn

#: The tiny federation the tests compose the project's config with (Hydra overrides; a later
#: override of the same key wins): 2 synthetic sites x 5 cases of 24x24x20 voxels cropped to
#: 16^3, the narrowest network, batches of 2, no augmentation, on the CPU. Modules add their
#: own keys (rounds, strategy, tracking ...).
TINY_OVERRIDES: tuple[str, ...] = (
    "data.sites=2", "data.cases_per_site=5", "data.shape=[24,24,20]", "data.size=[16,16,16]",
    "model.widths=[4,8,8,8,8,8]", "train.batch_size=2", "train.augment=false", "device=cpu",
)


class TinyNet(nn.Module):
    """A conv net with per-site experts in ``site_experts`` and ``forward(x, expert)``; records
    the expert argument of each call in ``seen``."""

    def __init__(self, experts: int = 2, output: str = "regions", dropout: float = 0.2) -> None:
        super().__init__()
        out = 3 if output == "regions" else 4
        self.config = SimpleNamespace(output=output, num_experts=experts)
        self.body = nn.Sequential(
            nn.Conv3d(4, 8, 3, padding=1), nn.GELU(), nn.Dropout3d(dropout), nn.Conv3d(8, out, 1)
        )
        self.site_experts = nn.ModuleList(nn.Conv3d(4, out, 1) for _ in range(experts))
        self.seen: list[list[int] | None] = []

    def forward(self, x: torch.Tensor, expert: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(None if expert is None else expert.tolist())
        y = self.body(x)
        if expert is not None:
            y = y + torch.cat([self.site_experts[int(e)](x[i : i + 1]) for i, e in enumerate(expert)])
        return y


def toy_batches(n_cases: int, batch_size: int, size: int = 12, seed: int = 0,
                sites: tuple[int, ...] = (0, 1)) -> list[dict]:
    """Batches like make_loader's: the label regions are visible in the image channels."""
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, n_cases, batch_size):
        b = min(batch_size, n_cases - start)
        images, labels = [], []
        for _ in range(b):
            field = ndimage.gaussian_filter(rng.standard_normal((size,) * 3), 2.0)
            field /= field.std()
            wt = field > 0.3
            tc = field > 0.9
            et = field > 1.4
            label = np.stack([wt, tc, et]).astype(np.float32)
            image = np.stack([field, field * 0.5, label[0], label[2]]).astype(np.float32)
            image += 0.1 * rng.standard_normal(image.shape).astype(np.float32)
            images.append(image)
            labels.append(label)
        batches.append({
            "image": torch.from_numpy(np.stack(images)),
            "label": torch.from_numpy(np.stack(labels)),
            "site": torch.tensor([sites[(start + i) % len(sites)] for i in range(b)]),
            "case": [f"case{start + i}" for i in range(b)],
        })
    return batches
