"""``python -m simulations.compare ...``: :func:`simulations.compare.cli.main`."""

import sys

from simulations.compare.cli import main

sys.exit(main())
