"""MLflow: one run with the flattened config as params, per-round and per-site metrics and
artifacts, read back through the MLflow client; default store under the project root."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from m4fuse.run import settings
from m4fuse.run.tracking import Tracker, round_metrics, tracking_uri


def test_tracker_writes_a_run_that_reads_back(tmp_path):
    cfg = settings.compose("config", [f"root={tmp_path}", "fl.rounds=2"])
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(cfg, "unit", tags={"kind": "test"})
    for rnd in (1, 2):
        entry = {"round": rnd, "train": {"loss": 1.0 / rnd},
                 "val": {"dice_et": 0.1 * rnd, "num-examples": 3.0},
                 "train_by_site": {0: {"loss": 0.5}}, "val_by_site": {3: {"dice_et": 0.2 * rnd}},
                 "bytes_sent": 1000, "bytes_received": 500, "seconds": 2.5}
        tracker.log_metrics(round_metrics(entry), step=rnd)
    artifact = tmp_path / "sites.csv"
    artifact.write_text("site,dice\nsite3,0.4\n")
    tracker.log_artifact(artifact)
    tracker.finish()

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["fl.rounds"] == "2" and run.data.params["data.size.0"] == "32"
    history = client.get_metric_history(tracker.run_id, "site3/dice_et")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.2), (2, 0.4)]
    assert run.data.metrics["bytes_sent"] == 1000
    assert run.data.metrics["site0/train_loss"] == 0.5
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["sites.csv"]
    assert (tmp_path / "mlruns").is_dir()  # artifacts under the project root, no server


def test_disabled_tracking_writes_nothing(tmp_path):
    cfg = settings.compose("config", [f"root={tmp_path}", "tracking.enabled=false"])
    tracker = Tracker(cfg, "off")
    tracker.log_metrics({"x": 1.0}, step=1)
    tracker.finish()
    assert tracker.run_id is None and not (tmp_path / "mlflow.db").exists()
