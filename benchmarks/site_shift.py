"""Is the synthetic site shift real? Train on site 0, test on site 0 vs the other sites.

Synthesises the default set (4 sites x 12 cases, 96 x 96 x 64 grid), prepares it at the
synthetic training size, trains a small MONAI U-Net (or ``--model m4fuse``: preset T) on site
0's (or ``--train-site``'s) training cases for a wall-clock budget, then prints the Dice (WT,
TC, ET, mean; training resolution, threshold 0.5, both-empty = 1) on that site's held-out cases
(val + test, never used for training or selection) and on every case of each other site, as a
markdown table. Training on the most shifted site (``--train-site 3``) checks that its data
stay learnable.

Run: ``python -m benchmarks.site_shift [--minutes 8] [--train-site 0] [--dir /tmp/site-shift]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet

from m4fuse.data import SYNTH_SIZE, load_split, make_loader, prepare_dataset, synthesize


def build_model(kind: str) -> torch.nn.Module:
    """``unet``: MONAI UNet (8, 16, 32, 64) with residual units; ``m4fuse``: M4Fuse preset T."""
    if kind == "unet":
        return UNet(spatial_dims=3, in_channels=4, out_channels=3, channels=(8, 16, 32, 64),
                    strides=(2, 2, 2), num_res_units=1, norm="instance")
    if kind == "m4fuse":
        from m4fuse.nets.model import M4Fuse, M4FuseConfig

        return M4Fuse(M4FuseConfig.preset("T"))
    raise ValueError(f"--model must be unet or m4fuse, got {kind!r}")


@torch.no_grad()
def dice_on(model: torch.nn.Module, records: list, site_index: int) -> list[float]:
    """Mean Dice per region (WT, TC, ET) over ``records``."""
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
    model.eval()
    for batch in make_loader(records, site_index, batch_size=2, augment=False, shuffle=False):
        pred = (torch.sigmoid(model(batch["image"])) > 0.5).float()
        metric(pred, batch["label"])
    return [float(v) for v in metric.aggregate()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/m4fuse-site-shift", help="work folder (default /tmp/m4fuse-site-shift)")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget (default 8)")
    p.add_argument("--train-site", type=int, default=0, help="index of the training site (default 0)")
    p.add_argument("--model", default="unet", help="unet (default) or m4fuse")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training (default 0)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    p.add_argument("--augment", action="store_true",
                   help="augment while training (default off: ~3x more epochs per minute on CPU)")
    args = p.parse_args(argv)
    work = Path(args.dir)
    raw, cache = work / f"raw-seed{args.seed}", work / f"cache-seed{args.seed}"
    if not (raw / "partition.csv").is_file():
        synthesize(raw, sites=4, cases_per_site=12, seed=args.seed)
    prepare_dataset(raw, cache, SYNTH_SIZE, workers=2)
    split = load_split(cache, seed=args.seed)
    sites = list(split)
    if not 0 <= args.train_site < len(sites):
        raise ValueError(f"--train-site must be in 0..{len(sites) - 1}, got {args.train_site}")
    own = sites[args.train_site]
    torch.manual_seed(args.seed)
    model = build_model(args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(sigmoid=True)
    loader = make_loader(split[own]["train"], args.train_site, batch_size=2, augment=args.augment, shuffle=True,
                         seed=args.seed)
    start, epochs = time.time(), 0
    while time.time() - start < args.minutes * 60:
        model.train()
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
        epochs += 1
    print(f"\ntrained {args.model} on {own} ({len(split[own]['train'])} cases) for {epochs} epochs "
          f"({time.time() - start:.0f} s), last loss {loss.item():.3f}; size {SYNTH_SIZE}\n")
    print("| test site | cases | Dice WT | Dice TC | Dice ET | mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, site in enumerate(sites):
        parts = split[site]
        own_site = k == args.train_site
        records = parts["val"] + parts["test"] if own_site else parts["train"] + parts["val"] + parts["test"]
        d = dice_on(model, records, k)
        label = f"{site} (own, held out)" if own_site else site
        print(f"| {label} | {len(records)} | {d[0]:.3f} | {d[1]:.3f} | {d[2]:.3f} | {sum(d) / 3:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
