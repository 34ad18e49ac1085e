"""``python -m simulations.pooled|local [hydra overrides]``: a thin wrapper over
:func:`m4fuse.training.baselines.run_baseline` (what the baselines train and how their budget matches
the federated run: :mod:`m4fuse.training.baselines`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from m4fuse.run.settings import compose
from m4fuse.training.baselines import run_baseline


def main(mode: str, argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.<mode> [hydra overrides...]``: compose the config with the
    overrides (default: the command line) and run the ``mode`` baseline."""
    from m4fuse.run import provision
    from m4fuse.run.config_check import debug_enabled

    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose("config", overrides)
        provision.load_sites(cfg)  # prepares the data once: the folder checks run here
    except (ValueError, FileNotFoundError) as err:  # a bad setting or folder: one line
        if debug_enabled():
            raise
        print(f"simulations.{mode}: error: {str(err).strip().splitlines()[0]}",
              file=sys.stderr)
        return 2
    run_baseline(cfg, mode)
    return 0
