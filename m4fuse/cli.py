"""The ``m4fuse`` console command: one subcommand per pipeline stage.

Each stage lives in a module of :mod:`m4fuse.commands` that exposes
``register(subparsers)``; it adds its parser(s) and sets ``func`` to a thin wrapper over an
importable function. Heavy imports (torch, monai, flwr) happen inside those wrappers, so
``m4fuse --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that add subcommands, in the order --help lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "m4fuse.commands.model",  # m4fuse model summary
    "m4fuse.commands.data",  # m4fuse data synth|sites|prepare
    "m4fuse.commands.train",  # m4fuse train (pooled / local, no Flower)
    "m4fuse.commands.segment",  # m4fuse segment, m4fuse evaluate
    "m4fuse.commands.certs",  # m4fuse certs
    "m4fuse.commands.bench",  # m4fuse bench model|data
    "m4fuse.commands.site",  # m4fuse site join (a hospital joining later)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m4fuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
