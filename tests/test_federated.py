"""The Flower app end to end (run_simulation through server.app / client.app) and its parts:
shared-keys-only replies, experts that stay personal, case-weighted aggregation, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flower_fixtures import TINY_FL, client_train_round, simulate_two_sites
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from m4fuse.personal.sets import is_personal, split_state
from m4fuse.run import settings, workspace

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("m4fuse-fl"))


def overrides(root: str, *extra: str) -> list[str]:
    return [f"root={root}", *TINY_FL, *extra]


def simulate(monkeypatch, root: str, *extra: str) -> dict:
    """Run the user's ServerApp and ClientApp in Flower's in-process simulation, then the
    simulation driver's assembly of the final model (``simulations.federated``)."""
    from simulations.federated import assemble_and_log

    args = overrides(root, *extra)
    monkeypatch.setenv(settings.OVERRIDES_ENV, " ".join(args))
    simulate_two_sites()
    cfg = settings.compose("config", args)
    rdir = workspace.run_dir(cfg)
    summary_path = rdir / "summary.json"
    assert summary_path.is_file(), f"the run wrote no summary in {rdir}"
    # the ServerApp writes only what the server holds; it never reads a site's folder
    assert (rdir / "shared.ckpt").is_file() and not (rdir / "model.ckpt").exists()
    summary = json.loads(summary_path.read_text())
    assemble_and_log(cfg, rdir, summary["mlflow_run_id"])
    return {"cfg": cfg, "dir": rdir, "summary": summary,
            "history": json.loads((rdir / "history.json").read_text())}


def fake_reply(arrays: dict[str, np.ndarray], cases: int, site: int, node: int) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"loss": float(site), "num-examples": cases,
                                 "site-index": site, "seconds": 1.0}),
    })
    msg = Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
    return msg


def test_aggregation_weights_by_training_cases():
    from server.strategy import make_strategy

    keys = ["a.weight", "b.bias"]
    strategy = make_strategy("personal", 2, 1.0, 1, 0.0, keys)
    one = {"a.weight": np.full((2, 2), 1.0, np.float32), "b.bias": np.array([0.0], np.float32)}
    two = {"a.weight": np.full((2, 2), 5.0, np.float32), "b.bias": np.array([8.0], np.float32)}
    arrays, metrics = strategy.aggregate_train(1, [fake_reply(one, 3, 0, 1),
                                                   fake_reply(two, 1, 1, 2)])
    # by hand: (3 * 1 + 1 * 5) / 4 = 2 and (3 * 0 + 1 * 8) / 4 = 2; loss (3*0 + 1*1)/4
    np.testing.assert_allclose(arrays["a.weight"].numpy(), np.full((2, 2), 2.0))
    np.testing.assert_allclose(arrays["b.bias"].numpy(), [2.0])
    assert metrics["loss"] == pytest.approx(0.25)
    assert metrics["num-examples"] == 4
    assert "site-index" not in metrics
    assert set(strategy.current.train_by_site) == {0, 1}


def test_server_refuses_expert_keys():
    from server.strategy import make_strategy

    strategy = make_strategy("personal", 2, 1.0, 1, 0.0, ["enc.weight"])
    bad = {"enc.weight": np.ones(2, np.float32),
           "enc.site_experts.0.w": np.ones(2, np.float32)}
    # an update with an expert key is dropped (never averaged); with no other site the round
    # has fewer than min_sites usable updates and the run stops naming the key
    from server.robust import QuorumError

    with pytest.raises(QuorumError, match="site_experts"):
        strategy.aggregate_train(1, [fake_reply(bad, 2, 0, 1)])
    with pytest.raises(ValueError, match="must not hold expert"):
        make_strategy("personal", 2, 1.0, 1, 0.0, ["x.site_experts.0.w"])


def _shared_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shape of every weight and buffer of ``model`` outside its site experts, counted from
    the network's own module tree (the ``site_experts`` lists of its expert units), not from
    the state-dict key patterns the code splits on."""
    from m4fuse.nets.model import ExpertUnit

    in_experts = {id(t) for unit in model.modules() if isinstance(unit, ExpertUnit)
                  for t in [*unit.site_experts.parameters(), *unit.site_experts.buffers()]}
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: tuple(t.shape) for name, t in named if id(t) not in in_experts}


def _checksums(record: ArrayRecord) -> dict[str, str]:
    """sha256 of each array's bytes: a copy of what the record holds now."""
    import hashlib

    return {k: hashlib.sha256(a.numpy().tobytes()).hexdigest() for k, a in record.items()}


def test_client_sends_only_shared_and_keeps_its_expert(monkeypatch, root, tmp_path):
    from client.weights import load_round_state
    from server.runner import initial_state
    from server.strategy import make_strategy

    args = overrides(root)
    monkeypatch.setenv(settings.OVERRIDES_ENV, " ".join(args))
    cfg = settings.compose("config", args)
    held, full = initial_state(cfg)
    shared_keys, personal_keys = (set(p) for p in split_state(full))
    assert personal_keys and set(held) == shared_keys
    shapes = _shared_shapes(settings.build_model(cfg, num_experts=1))
    start = ArrayRecord({k: v for k, v in held.items()})
    states = [RecordDict(), RecordDict()]
    replies = [client_train_round(p, start, states[p], 1, str(tmp_path)) for p in (0, 1)]
    for reply in replies:
        (record,) = reply.content.array_records.values()
        # exactly the network's weights outside the experts, each whole, nothing else
        assert {k: tuple(a.shape) for k, a in record.items()} == shapes
        assert sum(a.numpy().nbytes for a in record.values()) == \
            4 * sum(int(np.prod(s)) for s in shapes.values())  # float32
        assert not any(is_personal(k) for k in record.keys())
        (metrics,) = reply.content.metric_records.values()
        assert set(metrics) == {"loss", "num-examples", "site-index", "seconds", "steps"}
        # one epoch: one optimiser step per batch of the site's training cases
        assert metrics["steps"] == -(-metrics["num-examples"] // int(cfg.train.batch_size))
    experts = [states[p].array_records["kept"].to_torch_state_dict() for p in (0, 1)]
    assert set(experts[0]) == personal_keys
    assert any(not torch.equal(experts[0][k], experts[1][k]) for k in personal_keys), \
        "the two sites' experts should differ after training on different data"
    # each site's expert bytes, taken before the server aggregates and the next round loads
    before = [_checksums(states[p].array_records["kept"]) for p in (0, 1)]
    strategy = make_strategy("personal", 2, 1.0, 1, 0.0, held.keys())
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert set(aggregated.keys()) == shared_keys
    agg = aggregated.to_torch_state_dict()
    # the next round at each site: the aggregated shared weights and the site's own expert,
    # byte for byte the one it kept (a fresh network of another seed underneath)
    for p in (0, 1):
        kept = states[p].array_records["kept"]
        model = settings.build_model(cfg, num_experts=1, seed=123)
        load_round_state(model, "personal", agg, kept.to_torch_state_dict())
        loaded = model.state_dict()
        assert _checksums(ArrayRecord({k: loaded[k] for k in personal_keys})) == before[p]
        assert _checksums(kept) == before[p]
        assert all(torch.equal(loaded[k], agg[k]) for k in shared_keys)


@pytest.mark.slow
def test_half_the_sites_train_each_round_of_a_real_run(monkeypatch, root):
    """``fl.fraction_train=0.5`` of 2 sites: each round the server asks one site to train and
    evaluates both; the site that trained (the server's history) is the one whose own state
    folder gained that round (the sites' folders keep their 2 newest trained rounds)."""
    run = simulate(monkeypatch, root, "fl.rounds=3", "fl.fraction_train=0.5",
                   "fl.min_train_sites=1", "run_name=half", "tracking.enabled=false")
    history = run["history"]
    assert [e["round"] for e in history] == [1, 2, 3]
    trained = {e["round"]: set(map(int, e["train_by_site"])) for e in history}
    for entry in history:
        assert len(trained[entry["round"]]) == 1, trained
        assert set(map(int, entry["val_by_site"])) == {0, 1}
    for index in (0, 1):
        rounds = [r for r in sorted(trained) if index in trained[r]]
        folder = run["dir"] / "clients" / f"site{index}"
        on_disk = sorted(int(p.stem.rsplit("-r", 1)[1])
                         for p in folder.glob("site-state-r*.pt")) if folder.is_dir() else []
        assert on_disk == rounds[-2:], (index, trained, on_disk)


@pytest.mark.slow
def test_two_site_simulation_then_resume(monkeypatch, root):
    first = simulate(monkeypatch, root, "fl.rounds=2", "run_name=sim")
    assert [e["round"] for e in first["history"]] == [1, 2]
    for entry in first["history"]:
        assert set(map(int, entry["val_by_site"])) == {0, 1}
        assert entry["bytes_sent"] > 0 and entry["bytes_received"] > 0
    ckpt = torch.load(first["dir"] / "server_checkpoint.pt", weights_only=True)
    assert ckpt["server_round"] == 2
    assert ckpt["arrays"] and not any(is_personal(k) for k in ckpt["arrays"])
    rows = (first["dir"] / "sites.csv").read_text().splitlines()
    assert rows[0].startswith("site,name") and len(rows) == 4  # header, 2 sites, mean
    from m4fuse.personal.site_store import newest_state

    saved = [newest_state(first["dir"] / "clients" / s) for s in ("site0", "site1")]
    assert [(x.site, x.round) for x in saved] == [("site0", 2), ("site1", 2)]
    experts = [x.expert for x in saved]
    assert any(not torch.equal(experts[0][k], experts[1][k]) for k in experts[0])
    # the assembled model.ckpt gives each site the expert its folder kept
    from m4fuse.io.checkpoint import load_checkpoint

    final = load_checkpoint(first["dir"])
    assert final.sites == ["site0", "site1"] and final.metadata["site_rounds"] == {
        "site0": 2, "site1": 2}
    for site, x in zip(("site0", "site1"), saved):
        assert set(final.experts[site]) == set(x.expert)
        assert all(torch.equal(final.experts[site][k], v) for k, v in x.expert.items())
    run_id = first["summary"]["mlflow_run_id"]

    # A stopped run continues at the round after its checkpoint, in the same MLflow run.
    second = simulate(monkeypatch, root, "fl.rounds=3", "run_name=sim", "fl.resume=true")
    assert second["summary"]["first_round"] == 3
    assert [e["round"] for e in second["history"]] == [1, 2, 3]
    assert second["summary"]["mlflow_run_id"] == run_id

    from mlflow.tracking import MlflowClient

    from m4fuse.run.tracking import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(second["cfg"]))
    run = client.get_run(run_id)
    assert run.data.params["fl.strategy"] == "personal"
    for key in ("site0/dice_et", "site1/hd95_wt", "val_dice_mean", "bytes_sent",
                "round_seconds", "train_loss"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == [1, 2, 3], (key, steps)
    assert "site1/test_dice_wt" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"sites.csv", "dice_per_round.png", "model", "experts"} <= artifacts


@pytest.mark.slow
def test_a_dp_recipe_run_from_a_checkpoint_reports_epsilon_per_site(monkeypatch, root, tmp_path):
    """privacy=dp from a pre-trained checkpoint end to end: the run starts (the checkpoint
    fits), every site spends at most its target, and the per-site table shows ε and δ."""
    import csv

    from m4fuse.io.checkpoint import save_checkpoint
    from m4fuse.personal.sets import expert_state, split_state

    base = settings.compose("config", overrides(root))
    state = settings.build_model(base, num_experts=1, seed=11).state_dict()
    shared, personal = split_state(state)
    path = tmp_path / "public.ckpt"
    save_checkpoint(path, settings.model_config(base, num_experts=1), shared,
                    {"public": expert_state(personal, 0)})
    run = simulate(monkeypatch, root, "privacy=dp", "fl.strategy=personal",
                   "privacy.expected_batch=2", "fl.rounds=2", f"fl.init_checkpoint={path}",
                   "run_name=dp-recipe", "tracking.enabled=false")
    assert "ε spent" in (run["dir"] / "results.md").read_text()
    rows = list(csv.DictReader(open(run["dir"] / "sites.csv")))
    sites = [r for r in rows if r["site"] != "mean"]
    assert len(sites) == 2
    for row in sites:
        assert 0 < float(row["dp_epsilon"]) <= 10.0 and 0 < float(row["dp_delta"]) < 1
    last = run["history"][-1]["train_by_site"]
    assert all(m["dp-steps"] == 4 for m in last.values())  # 2 rounds x fl.local_steps=2
