"""``m4fuse bench model|data``: measured comparisons that print tables (see benchmarks/)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

#: The checkout this package was loaded from: benchmarks/ lives there and is not installed
#: (Opacus installs a top-level ``benchmarks`` package of its own).
CHECKOUT = Path(__file__).resolve().parents[2]


def _import_benchmark(module: str) -> object | None:
    """The benchmark module ``module`` (``benchmarks.X``) of this checkout, or None where the
    package was installed without its checkout (no ``benchmarks/`` next to ``m4fuse/``)."""
    if not (CHECKOUT / "benchmarks" / "__init__.py").is_file():
        return None
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module(module)


def _no_checkout(args: argparse.Namespace) -> int:
    raise SystemExit(f"m4fuse bench {args.bench}: the benchmarks run from a checkout of the "
                     f"project (benchmarks/ is not installed and {CHECKOUT / 'benchmarks'} does "
                     "not exist): clone the repository and run it there")


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run a benchmark and print its table (from a checkout)")
    which = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module, help_ in (
        ("model", "benchmarks.bench_model", "M4Fuse vs SegResNet/UNet, and the scan vs mambapy"),
        ("data", "benchmarks.bench_data", "prepare throughput, cache vs NIfTI read time"),
    ):
        parser = which.add_parser(name, help=help_)
        bench_module = _import_benchmark(module)
        if bench_module is None:
            parser.set_defaults(func=_no_checkout)
            continue
        bench_module.add_arguments(parser)
        parser.set_defaults(func=bench_module.run)
