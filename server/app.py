"""The Flower ServerApp: compose the run's Hydra config and run the federated experiment.

The Flower run config names the Hydra config (``config-name``, default ``config``) and its
``overrides`` (a space-separated string, e.g. ``"fl.rounds=5 fl.strategy=fedavg"``); the
ClientApp composes the same config. Everything else is in :mod:`server.runner`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from m4fuse import experiment
from server.runner import run_federated

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment of the run config on ``grid``; prints the per-site table."""
    cfg = experiment.compose(
        str(context.run_config.get("config-name", "config")),
        experiment.parse_overrides(str(context.run_config.get("overrides", ""))),
    )
    run_federated(grid, cfg)
