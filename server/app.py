"""The Flower ServerApp: compose the run's Hydra config and run the federated experiment.

The Flower run config names the Hydra config (``config-name``, default ``config``) and its
``overrides`` (a space-separated string, e.g. ``"fl.rounds=5 fl.strategy=fedavg"``); the
ClientApp composes the same config (``$M4FUSE_OVERRIDES`` is applied after both, see
:func:`m4fuse.settings.compose_run`). Everything else is in :mod:`server.runner`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from m4fuse import settings
from m4fuse.logs import configure_logging
from server.runner import run_federated

configure_logging()

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment of the run config on ``grid``; prints the per-site table."""
    cfg = settings.compose_run(context.run_config)
    run_federated(grid, cfg)
