"""The pooled baseline (no Flower): `python -m simulations.pooled [hydra overrides]`.

See :mod:`simulations.baselines` for what it trains and how the budget matches the
federated run.
"""

from __future__ import annotations

import sys

from simulations.baselines import main

if __name__ == "__main__":
    sys.exit(main("pooled"))
