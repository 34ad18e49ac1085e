"""The Flower ServerApp: compose the run's Hydra config and run the federated experiment.

The Flower run config names the Hydra config (``config-name``, default ``config``) and its
``overrides`` (a space-separated string, e.g. ``"fl.rounds=5 fl.strategy=fedavg"``); the
ClientApp composes the same config (``$M4FUSE_OVERRIDES`` is applied after both, see
:func:`m4fuse.run.settings.compose_run`). Everything else is in :mod:`server.runner`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from m4fuse.run import settings
from m4fuse.run.logs import configure_logging
from server import failure
from server.runner import prepare_run, run_federated

configure_logging()
failure.install()  # a refused run's last log line is the one-line reason (server/failure.py)

app = ServerApp()

#: What a run refuses before it trains: bad settings (m4fuse.run.config_check.ConfigError, a
#: ValueError), folders it may not write (m4fuse.data.guard.FolderRefused, a ValueError),
#: missing data, fewer SuperNodes than sites (server.runner.SitesMismatch, a ValueError).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment of the run config on ``grid``; prints the per-site table. A
    mistake found before training (:data:`USER_ERRORS`) fails the run with one line
    (:class:`server.failure.RunRefused`)."""
    try:
        cfg = settings.compose_run(context.run_config)
        names = prepare_run(grid, cfg)
    except USER_ERRORS as err:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        raise failure.RunRefused(text.strip().splitlines()[0] if text.strip()
                                 else type(err).__name__) from err
    run_federated(grid, cfg, names)
