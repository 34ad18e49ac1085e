"""MLflow for experiments: one run per experiment, params = the flattened config.

Default store (``tracking.tracking_uri: null``): ``sqlite:///<root>/mlflow.db`` with artifacts
in ``<root>/mlruns`` (no server). Any tracking URI by config. Used by the federated run
(``server.runner``), the pooled/local baselines (:mod:`m4fuse.training.baselines`) and the comparison
(``simulations.compare``), so all runs land in one place with the same metric keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from m4fuse.evaluation.metrics import LESION_REPORTED_KEYS, REPORTED_METRIC_KEYS
from m4fuse.run.settings import flatten
from m4fuse.run.workspace import project_root


def tracking_uri(cfg: DictConfig) -> str:
    """The configured tracking URI, or the local SQLite store under the project root."""
    if cfg.tracking.tracking_uri:
        return str(cfg.tracking.tracking_uri)
    root = project_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def experiment_id(cfg: DictConfig, client: MlflowClient) -> str:
    """The id of ``tracking.experiment``, created (artifacts under ``<root>/mlruns``) if new."""
    name = str(cfg.tracking.experiment)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if not cfg.tracking.tracking_uri:
        location = (project_root(cfg) / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


class Tracker:
    """One MLflow run; every method is a no-op when ``tracking.enabled`` is false."""

    def __init__(self, cfg: DictConfig, run_name: str, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        self.enabled = bool(cfg.tracking.enabled)
        self.run_id: str | None = None
        if not self.enabled:
            return
        self.client = MlflowClient(tracking_uri=tracking_uri(cfg))
        if run_id is not None:
            self.run_id = self.client.get_run(run_id).info.run_id
            return
        exp = experiment_id(cfg, self.client)
        run = self.client.create_run(exp, run_name=run_name, tags=dict(tags or {}))
        self.run_id = run.info.run_id
        params = flatten(OmegaConf.to_container(cfg, resolve=True))
        self.log_params({k: ("null" if v is None else v) for k, v in params.items()})

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        now = int(time.time() * 1000)
        items = [mlflow.entities.Metric(k.replace("-", "_"), float(v), now, step)
                 for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        if not Path(path).exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """``data`` as a JSON artifact at ``artifact_file`` (e.g. the sites dropped in a round)."""
        if self.enabled:
            self.client.log_dict(self.run_id, dict(data), artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)


def site_metrics(by_site: Mapping[int, Mapping[str, float]], prefix: str = "",
                 keys: tuple[str, ...] = REPORTED_METRIC_KEYS) -> dict[str, float]:
    """``{k: {dice_et: ..}}`` -> ``{"site<k>/<prefix>dice_et": ..}`` (MLflow keys)."""
    out: dict[str, float] = {}
    for index, metrics in by_site.items():
        for key in keys:
            if key in metrics:
                out[f"site{index}/{prefix}{key}"] = float(metrics[key])
    return out


def round_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of one round: aggregate and ``site<k>/`` keys, bytes and seconds."""
    out: dict[str, float] = {}
    if "loss" in entry["train"]:
        out["train_loss"] = entry["train"]["loss"]
    out.update({f"val_{k}": v for k, v in entry["val"].items() if k in REPORTED_METRIC_KEYS})
    out.update(site_metrics(entry["val_by_site"]))
    for index, m in entry["train_by_site"].items():
        out[f"site{index}/train_loss"] = m["loss"]
        if "steps" in m:  # the site's optimiser steps this round
            out[f"site{index}/train_steps"] = float(m["steps"])
    if "steps" in entry["train"]:  # pooled: one model's steps
        out["train_steps"] = float(entry["train"]["steps"])
    out["bytes_sent"] = entry["bytes_sent"]
    out["bytes_received"] = entry["bytes_received"]
    out["round_seconds"] = entry["seconds"]
    # sites dropped this round (error, no reply, rejected update), train and evaluate
    out["failed_sites"] = float(len(entry.get("failed", {})))
    return out


def final_test_metrics(mean_row: Mapping[str, Any],
                       test_by_site: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """MLflow metrics of the final test: the case-weighted ``test_*`` means of the results
    table's ``mean`` row (:func:`m4fuse.run.report.site_rows`) and the ``site<k>/test_*`` scores
    (voxel- and lesion-wise)."""
    out = {k: float(v) for k, v in mean_row.items()
           if k.startswith("test_") and isinstance(v, float) and not k.endswith("num-examples")}
    out.update(site_metrics(test_by_site, prefix="test_",
                            keys=REPORTED_METRIC_KEYS + LESION_REPORTED_KEYS))
    return out


def log_to_recorded_run(run_dir: Path, artifacts: list[tuple[Path, str | None]]) -> str:
    """Log ``artifacts`` (``(file, artifact folder)``, e.g. :func:`m4fuse.io.assembly.assemble_run`'s
    model.ckpt and overlays) to the MLflow run the run folder's ``summary.json`` records
    (``mlflow_run_id`` in the store ``mlflow_tracking_uri``), so that ``flwr run`` followed by
    ``m4fuse model assemble`` leaves in MLflow what ``python -m simulations.federated`` does.
    Returns one line saying what was done (nothing when tracking was off, or when the store
    is a SQLite file that is not on this machine, e.g. a hospital assembling its own model)."""
    import json

    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return f"MLflow: {run_dir} has no readable summary.json; nothing logged"
    run_id, uri = summary.get("mlflow_run_id"), summary.get("mlflow_tracking_uri")
    if not run_id:
        return "MLflow: the run had tracking off; nothing logged"
    if not uri:
        return (f"MLflow: summary.json records run {run_id} but not its store (a run of an "
                "earlier version); nothing logged")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"MLflow: the store {uri} is not on this machine; nothing logged"
    client = MlflowClient(tracking_uri=uri)
    for path, folder in artifacts:
        client.log_artifact(run_id, str(path), folder)
    return f"MLflow: logged {len(artifacts)} file(s) to run {run_id} ({uri})"
