"""The ``m4fuse`` console command: one subcommand per pipeline stage.

Each stage lives in a module of :mod:`m4fuse.cli` that exposes
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
    "m4fuse.cli.model",  # m4fuse model summary
    "m4fuse.cli.data",  # m4fuse data synth|sites|prepare
    "m4fuse.cli.train",  # m4fuse train (pooled / local, no Flower)
    "m4fuse.cli.segment",  # m4fuse segment, m4fuse evaluate
    "m4fuse.cli.certs",  # m4fuse certs
    "m4fuse.cli.bench",  # m4fuse bench model|data
    "m4fuse.cli.site",  # m4fuse site join (a hospital joining later)
    "m4fuse.cli.simulate",  # m4fuse simulate (flwr run, one SuperNode per site)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m4fuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand of ``argv``. A user's mistake (a bad setting, a folder the command
    may not write, a missing input) prints one line ``m4fuse <command>: error: ...`` and
    returns 2; ``M4FUSE_DEBUG=1`` raises it with its traceback."""
    from m4fuse.run.config_check import ConfigError, debug_enabled

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Hydra overrides after an option (`data sites ROOT --out X data=brats`): argparse has
    # matched the overrides positional already and leaves these over
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        return _user_error(args, err, debug_enabled())
    except ValueError as err:
        from m4fuse.data.guard import FolderRefused
        from m4fuse.data.layout import DataError

        if not isinstance(err, (FolderRefused, DataError)):
            raise
        return _user_error(args, err, debug_enabled())
    return int(result or 0)


def _user_error(args: argparse.Namespace, err: BaseException, debug: bool) -> int:
    """Print ``err`` as one line naming the command (raise it under ``debug``); returns 2."""
    if debug:
        raise err
    words = [args.command] + [str(v) for k, v in vars(args).items()
                              if k.endswith("_command") and v]
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"m4fuse {' '.join(words)}: error: {text}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
