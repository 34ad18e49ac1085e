"""``m4fuse bench model|data``: measured comparisons that print tables (see benchmarks/)."""

from __future__ import annotations

import argparse
import importlib


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run a benchmark and print its table")
    which = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module, help_ in (
        ("model", "benchmarks.bench_model", "M4Fuse vs SegResNet/UNet, and the scan vs mambapy"),
        ("data", "benchmarks.bench_data", "prepare throughput, cache vs NIfTI read time"),
    ):
        parser = which.add_parser(name, help=help_)
        bench_module = importlib.import_module(module)
        bench_module.add_arguments(parser)
        parser.set_defaults(func=bench_module.run)
