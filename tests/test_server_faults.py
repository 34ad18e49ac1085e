"""Faults over whole simulated runs, through the project's ServerApp and ClientApp
with the ClientApp's config-driven faults (``fl.faults``):

* a NaN update is dropped and a crashing site is tolerated while ``fl.min_sites`` answered;
  the dropped sites are in the history, the MLflow run and the log;
* with fewer than ``fl.min_sites`` answers the run stops with a message naming the site, and
  ``fl.resume=true`` continues at the round after the checkpoint with the checkpoint's shared
  weights and each site's own expert (tests/test_federated.py covers a resume after a run
  that ended normally and the MLflow continuation; this one starts from a stopped run and
  checks what the sites start the resumed round from).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flower_fixtures import TINY_FL, project_client_app_with, simulate_two_sites
from flwr.app import Context, Message, MessageType

from m4fuse.personal.sets import is_personal, split_state
from m4fuse.run import settings, workspace

START_ENV = "M4FUSE_TEST_START_DIR"
TINY = [*TINY_FL, "fl.local_epochs=1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One root for the module: the synthetic data is generated once (runs differ by name)."""
    return tmp_path_factory.mktemp("m4fuse-faults")


def record_start(msg: Message, context: Context,
                 call_next: Callable[[Message, Context], Message]) -> Message:
    """Client mod: before a train message, save the model the site starts it from (the
    server's arrays plus what the site kept) to ``$START_ENV/<site>-r<round>.pt``."""
    if msg.metadata.message_type == MessageType.TRAIN and START_ENV in os.environ:
        from client import app as project

        site = project._site(msg, context)
        model, _ = project._build(site, msg, context, str(site.cfg.fl.strategy))
        rnd = int(msg.content.config_records["config"]["server-round"])
        torch.save(model.state_dict(), Path(os.environ[START_ENV]) / f"{site.name}-r{rnd}.pt")
    return call_next(msg, context)


start_recording_app = project_client_app_with(record_start)


def simulate(monkeypatch, args: list[str], client_app=None) -> Path:
    """Run the project's ServerApp (and ClientApp unless given) on 2 SuperNodes."""
    monkeypatch.setenv(settings.OVERRIDES_ENV, " ".join(args))
    simulate_two_sites(client_app)
    return workspace.run_dir(settings.compose("config", args))


@pytest.mark.slow
def test_nan_update_dropped_and_crash_tolerated(monkeypatch, root):
    args = [f"root={root}", *TINY, "run_name=faults", "fl.rounds=2", "fl.min_sites=1",
            "+fl.faults={site1:{nan_round:1},site0:{crash_round:2}}"]
    rdir = simulate(monkeypatch, args)
    summary = json.loads((rdir / "summary.json").read_text())
    history = json.loads((rdir / "history.json").read_text())
    assert [e["round"] for e in history] == [1, 2]
    first, second = history
    assert list(first["failed"]) == ["train/site1"]
    assert "not finite" in first["failed"]["train/site1"]
    assert set(first["train_by_site"]) == {"0"}
    assert list(second["failed"]) == ["train/site0"]
    assert "injected crash" in second["failed"]["train/site0"]
    assert set(second["train_by_site"]) == {"1"}
    for entry in history:  # both sites still validate in every round
        assert set(entry["val_by_site"]) == {"0", "1"}
    ckpt = torch.load(rdir / "server_checkpoint.pt", weights_only=True)
    assert ckpt["server_round"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["arrays"].values())
    assert not (rdir / "failure.txt").exists()

    from mlflow.tracking import MlflowClient

    from m4fuse.run.tracking import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(settings.compose("config", args)))
    run_id = summary["mlflow_run_id"]
    assert [m.value for m in client.get_metric_history(run_id, "failed_sites")] == [1.0, 1.0]
    artifacts = {a.path for a in client.list_artifacts(run_id, "failed")}
    assert artifacts == {"failed/round-001.json", "failed/round-002.json"}
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_too_few_sites_stop_the_run_then_resume(monkeypatch, root, tmp_path):
    from server.robust import QuorumError

    base = [f"root={root}", *TINY, "run_name=stop", "fl.min_sites=2"]
    with pytest.raises(QuorumError) as info:
        simulate(monkeypatch, [*base, "fl.rounds=3", "+fl.faults={site0:{crash_round:2}}"])
    message = str(info.value)
    assert "round 2" in message and "min_sites=2" in message
    assert "site0: error reply" in message and "injected crash" in message
    cfg = settings.compose("config", base)
    rdir = workspace.run_dir(cfg)
    assert "site0" in (rdir / "failure.txt").read_text()
    assert not (rdir / "summary.json").exists()
    stopped = torch.load(rdir / "server_checkpoint.pt", weights_only=True)
    assert stopped["server_round"] == 1  # the last complete round

    from m4fuse.personal.site_store import newest_kept

    experts = {s: newest_kept(rdir / "clients" / s, before_round=2)["state"]
               for s in ("site0", "site1")}
    assert all(newest_kept(rdir / "clients" / s)["round"] == r
               for s, r in (("site0", 1), ("site1", 2)))  # site1 trained round 2 too

    starts = tmp_path / "starts"
    starts.mkdir()
    monkeypatch.setenv(START_ENV, str(starts))
    simulate(monkeypatch, [*base, "fl.rounds=2", "fl.resume=true"], start_recording_app)
    summary = json.loads((rdir / "summary.json").read_text())
    history = json.loads((rdir / "history.json").read_text())
    assert summary["first_round"] == 2
    assert [e["round"] for e in history] == [1, 2]
    assert not (rdir / "failure.txt").exists()
    assert sorted(p.name for p in starts.iterdir()) == ["site0-r2.pt", "site1-r2.pt"]
    initial = settings.build_model(cfg, num_experts=1).state_dict()
    for site in ("site0", "site1"):
        start = torch.load(starts / f"{site}-r2.pt", weights_only=True)
        shared, personal = split_state(start)
        # the shared weights of the checkpoint of round 1
        assert set(shared) == set(stopped["arrays"])
        assert all(torch.equal(shared[k], stopped["arrays"][k]) for k in shared)
        # the site's own expert after round 1 (not its round-2 one, not the initial one)
        assert personal and all(is_personal(k) for k in personal)
        assert all(torch.equal(personal[k], experts[site][k]) for k in personal)
        assert any(not torch.equal(personal[k], initial[k]) for k in personal)
    assert any(not torch.equal(experts["site0"][k], experts["site1"][k]) for k in personal)
