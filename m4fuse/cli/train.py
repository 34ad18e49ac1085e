"""``m4fuse train --mode pooled|local [hydra overrides]``: the baselines, no Flower.

A thin wrapper over :func:`m4fuse.training.baselines.run_baseline` (same configs as ``flwr run .``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train the pooled or local baseline (no Flower)")
    parser.add_argument("--mode", choices=("pooled", "local"), default="pooled",
                        help="pooled: one model, one expert per site, all sites' cases; "
                             "local: each site alone (default: pooled)")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides, e.g. fl.rounds=5 model=paper data=brats "
                             "data.source=/abs/BraTS")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from m4fuse.run.settings import compose
    from m4fuse.training.baselines import run_baseline

    run_baseline(compose("config", list(args.overrides)), args.mode)
    return 0
