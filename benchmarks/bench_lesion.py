"""Lesion-wise scoring time beside the voxel-wise scoring of the same case, on one core.

A synthetic case per grid (default the BraTS grid 240 x 240 x 155 and the small cached test
grid 48 x 48 x 40): a tumour of nested oedema / core / enhancing rim, a satellite lesion and
a small one, and a prediction that is the truth shifted by a voxel, missing the satellite,
with two false-positive blobs and scattered single voxels. Each scoring is timed ``--repeats``
times, interleaved, after one warm-up; prints the medians, the lesion-wise / voxel-wise ratio
and the lesion-wise scores themselves. ``torch.set_num_threads(1)``: one core.

    python -m benchmarks.bench_lesion [--grids 240 240 155 48 48 40] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np


def synthetic_case(shape: Sequence[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, truth)`` label maps (0/1/2/3, ET = 3) on ``shape``; sizes scale with it."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.indices(shape, dtype=np.float32)
    scale = min(shape) / 155.0

    def ball(center: Sequence[float], radius: float) -> np.ndarray:
        return sum(((g - c) / radius) ** 2 for g, c in zip(grid, center)) <= 1.0

    centre = [s * 0.45 for s in shape]
    truth = np.zeros(shape, np.uint8)
    truth[ball(centre, 30 * scale) & (rng.random(shape) > 0.01)] = 2
    truth[ball(centre, 16 * scale)] = 3
    truth[ball(centre, 10 * scale)] = 1
    satellite = [c + 45 * scale for c in centre]
    truth[ball(satellite, 7 * scale)] = 2
    truth[ball([s * 0.2 for s in shape], 2.0)] = 3  # a small one (~33 voxels)
    pred = np.roll(truth, 1, axis=0)
    pred[ball([c + 45 * scale + 1 for c in centre], 9 * scale)] = 0  # satellite missed
    pred[ball([s * 0.75 for s in shape], 5 * scale)] = 2  # false positives
    pred[ball([s * 0.8 for s in shape], 3)] = 1
    noise = rng.random(shape) < 5e-7
    pred[noise] = 2
    return pred, truth


def bench(shape: Sequence[int], repeats: int) -> dict[str, float]:
    """Median seconds of the voxel-wise and the lesion-wise scoring of one case's three
    regions, and the lesion-wise scores (gli preset, 1 mm)."""
    from m4fuse.data.regions import labels_to_regions
    from m4fuse.evaluation.metrics import lesion_region_scores, region_scores

    pred, truth = synthetic_case(shape)
    p, t = labels_to_regions(pred, 3), labels_to_regions(truth, 3)
    voxel, lesion = [], []
    scores = lesion_region_scores(p, t)  # warm-up (imports, MONAI tables)
    region_scores(p, t)
    for _ in range(repeats):
        start = time.perf_counter()
        region_scores(p, t)
        voxel.append(time.perf_counter() - start)
        start = time.perf_counter()
        lesion_region_scores(p, t)
        lesion.append(time.perf_counter() - start)
    out = {"voxel_s": statistics.median(voxel), "lesion_s": statistics.median(lesion)}
    out.update(scores)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[240, 240, 155, 48, 48, 40],
                        help="grids as X Y Z triples (default 240 240 155 48 48 40)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per scoring (default 5)")
    args = parser.parse_args(argv)
    if len(args.grids) % 3:
        parser.error("--grids takes X Y Z triples")
    import torch

    torch.set_num_threads(1)
    print("| grid | voxel-wise s (median) | lesion-wise s (median) | lesion / voxel | "
          "lesion Dice WT/TC/ET | lesion HD95 WT/TC/ET | WT found/missed/fp |")
    print("|---|---|---|---|---|---|---|")
    for i in range(0, len(args.grids), 3):
        shape = args.grids[i:i + 3]
        r = bench(shape, args.repeats)
        print(f"| {'x'.join(map(str, shape))} | {r['voxel_s']:.3f} | {r['lesion_s']:.3f} | "
              f"{r['lesion_s'] / r['voxel_s']:.2f} | "
              + "/".join(f"{r[f'lesion_dice_{g}']:.3f}" for g in ("wt", "tc", "et")) + " | "
              + "/".join(f"{r[f'lesion_hd95_{g}']:.1f}" for g in ("wt", "tc", "et")) + " | "
              + "/".join(f"{r[f'lesion_{c}_wt']:.0f}" for c in ("found", "missed", "fp")) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
