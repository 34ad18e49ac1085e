"""Run the Flower app (server.app / client.app) as an in-process simulation.

``python -m simulations.federated fl.strategy=fedavg fl.rounds=3`` composes the Hydra config
with those overrides, starts one SuperNode per site with Flower's ``run_simulation`` and runs
the same ServerApp and ClientApp that ``flwr run .`` runs. The overrides reach both apps
through ``$M4FUSE_OVERRIDES`` (``run_simulation`` passes no run config). After the run it puts
the final model together from the server's ``shared.ckpt`` and the sites' state folders
(:func:`m4fuse.io.assembly.assemble_run`: ``model.ckpt``, the sites' overlays and kept states),
the step ``flwr run .`` leaves to ``m4fuse model assemble``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from m4fuse.io.assembly import CLIENTS_DIR
from m4fuse.run import provision, settings, workspace

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


#: The GPU share of each simulated site, as for ``scripts/setup.sh`` (``flwr run .``).
GPUS_ENV = "M4FUSE_GPUS_PER_SITE"


def gpu_share(sites: int, cuda_devices: int | None = None) -> float:
    """Each simulated site's share of a GPU (Ray's ``num_gpus``): ``$M4FUSE_GPUS_PER_SITE``
    when set, else the visible CUDA devices spread over the sites (at most 1 each; 0.0 without
    a GPU). With 0.0 Ray hides the GPUs from the site's process, so a GPU host would silently
    train on its CPU."""
    text = os.environ.get(GPUS_ENV)
    if text:
        try:
            share = float(text)
        except ValueError:
            raise ValueError(f"{GPUS_ENV} must be a number, got {text!r}") from None
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{GPUS_ENV} must be in [0, 1], got {share}")
        return share
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count()
    return round(min(1.0, cuda_devices / sites), 4) if cuda_devices and sites else 0.0


def simulate(overrides: Sequence[str], cpus_per_site: int = 1,
             gpus_per_site: float | None = None) -> dict[str, Any]:
    """Run the federated experiment of ``overrides``; returns its summary, history and rows
    (read back from the run folder the ServerApp wrote). Each site gets ``cpus_per_site``
    CPUs (default 1) and ``gpus_per_site`` of a GPU (default :func:`gpu_share`)."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import app as server_app

    if cpus_per_site < 1:
        raise ValueError(f"cpus_per_site must be >= 1, got {cpus_per_site}")
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    cfg = settings.compose("config", list(overrides))
    sites = provision.site_names(provision.load_sites(cfg))  # prepares the data once
    if not bool(cfg.fl.resume):  # the simulated sites' folders of an earlier run of this name
        shutil.rmtree(workspace.run_dir(cfg) / CLIENTS_DIR, ignore_errors=True)
    gpus = gpu_share(len(sites)) if gpus_per_site is None else float(gpus_per_site)
    resources = {"num_cpus": cpus_per_site, "num_gpus": gpus}
    previous = os.environ.get(settings.OVERRIDES_ENV)
    os.environ[settings.OVERRIDES_ENV] = shlex.join(list(overrides))
    try:
        run_simulation(server_app, client_app, num_supernodes=len(sites),
                       backend_config={"client_resources": resources})
    finally:
        if previous is None:
            os.environ.pop(settings.OVERRIDES_ENV, None)
        else:
            os.environ[settings.OVERRIDES_ENV] = previous
    rdir = workspace.run_dir(cfg)
    if not (rdir / "summary.json").is_file():
        raise RuntimeError(f"the federated run wrote no summary in {rdir}; see the log above")
    summary = json.loads((rdir / "summary.json").read_text())
    assemble_and_log(cfg, rdir, summary.get("mlflow_run_id"))
    import csv

    with open(rdir / "sites.csv") as handle:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    return {"cfg": cfg, "run_dir": rdir, "site_names": sites, "rows": rows,
            "summary": summary,
            "history": json.loads((rdir / "history.json").read_text())}


def assemble_and_log(cfg: Any, rdir: Any, mlflow_run_id: str | None) -> None:
    """:func:`m4fuse.io.assembly.assemble_run` on the finished run ``rdir``, its files logged to
    the run's MLflow record (``mlflow_run_id``, the one the ServerApp opened)."""
    from m4fuse.io.assembly import assemble_run
    from m4fuse.run.tracking import Tracker

    assembled = assemble_run(rdir)
    if mlflow_run_id is None:  # tracking off
        return
    tracker = Tracker(cfg, workspace.run_name(cfg), mlflow_run_id)
    for path, folder in assembled.artifacts:
        tracker.log_artifact(path, folder)


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.federated [hydra overrides...]``. A bad setting or a folder
    the run may not write (found before training) prints one line and returns 2
    (``M4FUSE_DEBUG=1``: the traceback)."""
    from m4fuse.run.config_check import debug_enabled

    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = settings.compose("config", overrides)
        provision.load_sites(cfg)  # prepares the data once: the folder checks run here
    except (ValueError, FileNotFoundError) as err:
        if debug_enabled():
            raise
        print(f"simulations.federated: error: {str(err).strip().splitlines()[0]}",
              file=sys.stderr)
        return 2
    simulate(overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
