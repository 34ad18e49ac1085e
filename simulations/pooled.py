"""The pooled baseline (no Flower): `python -m simulations.pooled [hydra overrides]`.

See :mod:`simulations.baselines` for what it trains and how the budget matches the
federated run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from m4fuse import experiment
from simulations.baselines import BaselineSummary, run_baseline


def run(overrides: Sequence[str] = ()) -> BaselineSummary:
    """Compose the config with ``overrides`` and run the pooled baseline."""
    return run_baseline(experiment.compose("config", list(overrides)), "pooled")


def main(argv: Sequence[str] | None = None) -> int:
    run(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
