"""The personalisation strategies (m4fuse.personal.sets.STRATEGIES): personal sets, the
"+FT" fine-tuning, the personal learning rate, bad settings, and a whole run of
``personal-norm-ft`` through the project's ServerApp/ClientApp in Flower's simulation: what
each reply carries and what stays at the site."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flower_fixtures import TINY_FL, project_client_app_with, simulate_recorded
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord

from m4fuse.personal.finetune import finetune_site, personal_lr_scale
from m4fuse.personal.sets import (
    PERSONAL_SETS,
    STRATEGIES,
    check_personal_set,
    is_expert,
    split_state,
)
from m4fuse.run import provision, settings

RECORD_ENV = "M4FUSE_TEST_PERSONAL_DIR"
TINY = [*TINY_FL, "tracking.enabled=false", "fl.local_epochs=1"]


def _names(strategy: str = "personal") -> list[str]:
    cfg = settings.compose("config", [*TINY, f"fl.strategy={strategy}"])
    return list(settings.build_model(cfg, num_experts=1).state_dict())


def _assert_model_ckpt_is_each_sites_final_model(strategy: str, cfg, rdir: Path,
                                                 sites: list[str]) -> None:
    """Each site's model rebuilt from the run's model.ckpt (as the comparison does) holds,
    weight for weight, the site's final model put together here from the raw files: the
    server's last shared arrays (``server_checkpoint.pt``), then what the site's newest state
    file in its own folder holds (its own layers, and its expert at the model's expert index)."""
    from simulations.compare import site_models

    server = torch.load(rdir / "server_checkpoint.pt", weights_only=True)
    for site, (model, expert) in site_models(strategy, cfg, rdir, sites).items():
        files = sorted((rdir / "clients" / site).glob("site-state-r*.pt"),
                       key=lambda p: int(p.stem.rsplit("-r", 1)[1]))
        own = torch.load(files[-1], weights_only=True)
        assert own["site"] == site
        expected = {k: torch.as_tensor(v) for k, v in server["arrays"].items()}
        expected.update(own["shared"] or {})
        expected.update({k.replace("site_experts.*.", f"site_experts.{expert}."): v
                         for k, v in own["expert"].items()})
        built = model.state_dict()
        assert set(expected) == set(built), sorted(set(expected) ^ set(built))[:5]
        differ = [k for k, v in expected.items() if not torch.equal(built[k], v)]
        assert not differ, (site, differ[:5])


def test_personal_sets_nest_and_split_disjointly():
    names = _names()
    chosen = {s: set(split_state(dict.fromkeys(names), s)[1]) for s in PERSONAL_SETS}
    assert chosen["none"] == set() and chosen["all"] == set(names)
    assert chosen["experts"] == {n for n in names if is_expert(n)} and chosen["experts"]
    assert chosen["experts"] < chosen["norms"] < chosen["stem"] < chosen["all"]
    norms = chosen["norms"] - chosen["experts"]
    assert "encoder.norm1.weight" in norms and "decoder.mix1.norm.bias" in norms
    assert all(".norm" in n and n.endswith((".weight", ".bias")) for n in norms)
    assert chosen["stem"] - chosen["norms"] == {"encoder.conv1.weight", "encoder.conv1.bias"}
    assert chosen["norms"] < chosen["head"] < chosen["decoder"] < chosen["all"]
    assert chosen["head"] - chosen["norms"] == {"decoder.head.weight", "decoder.head.bias"}
    decoder = {n for n in names if n.startswith("decoder.")}
    assert chosen["decoder"] - chosen["norms"] == decoder - norms and decoder & norms
    for s in PERSONAL_SETS:
        shared, mine = split_state(dict.fromkeys(names), s)
        assert not set(shared) & set(mine) and set(shared) | set(mine) == set(names)


def test_bad_settings_fail_before_training():
    with pytest.raises(ValueError, match="fl.strategy.*'fedbogus'"):
        settings.compose("config", [*TINY, "fl.strategy=fedbogus"])
    with pytest.raises(ValueError, match="fl.finetune_epochs"):
        settings.compose("config", [*TINY, "fl.finetune_epochs=-1"])
    with pytest.raises(ValueError, match="fl.personal_lr_scale"):
        settings.compose("config", [*TINY, "fl.personal_lr_scale=0"])
    with pytest.raises(ValueError, match="fl.strategy=personal-norm-ft with privacy.enabled"):
        settings.compose("config", [*TINY, "fl.strategy=personal-norm-ft", "privacy=dp"])
    settings.compose("config", [*TINY, "fl.strategy=personal-norm", "privacy=dp"])
    # a personal set naming layers the model does not have
    no_norms = [n for n in _names() if ".norm" not in n]
    with pytest.raises(ValueError, match="fl.strategy.*'norms'.*no norm layer"):
        check_personal_set(no_norms, "norms")
    no_head = [n for n in _names() if not n.startswith("decoder.head.")]
    with pytest.raises(ValueError, match="fl.strategy.*'head'.*no decoder.head"):
        check_personal_set(no_head, "head")
    check_personal_set(no_head, "decoder")  # the rest of the decoder is still there
    with pytest.raises(ValueError, match="unknown personal set 'bogus'"):
        check_personal_set(no_norms, "bogus")


def test_finetune_changes_only_the_personal_set(tmp_path):
    cfg = settings.compose("config", [f"root={tmp_path}", *TINY, "fl.finetune_epochs=1",
                                        "fl.personal_lr_scale=2.0"])
    split = provision.load_sites(cfg)
    site = provision.site_names(split)[0]
    model = settings.build_model(cfg, num_experts=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = finetune_site(model, split[site]["train"], 0, cfg, torch.device("cpu"),
                                   personal="norms", epochs=1, seed=3)
    assert out["steps"] >= 1
    after = model.state_dict()
    mine = set(split_state(dict(after), "norms")[1])
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and changed <= mine, sorted(changed - mine)[:5]
    assert all(p.requires_grad for p in model.parameters())  # freezing undone


def test_expert_output_stats_see_a_zero_expert(tmp_path):
    from m4fuse.evaluation.diagnostics import expert_output_stats

    cfg = settings.compose("config", [f"root={tmp_path}", *TINY])
    split = provision.load_sites(cfg)
    records = split[provision.site_names(split)[0]]["test"]
    model = settings.build_model(cfg, num_experts=1)
    stats = expert_output_stats(model, records, 0)
    assert set(stats) == {"encoder.unit4", "encoder.unit5", "encoder.bottleneck"}
    assert all(v["ratio"] > 0 and -1 <= v["cosine"] <= 1 for v in stats.values())
    for unit in (model.encoder.unit4, model.encoder.unit5, model.encoder.bottleneck):
        unit.site_experts[0] = unit.new_expert()  # zero output projection
    assert all(v["ratio"] == 0 for v in expert_output_stats(model, records, 0).values())


def test_personal_lr_scale_makes_its_own_param_group():
    from m4fuse.training.engine import make_optimizer

    cfg = settings.compose("config", [*TINY, "fl.strategy=personal-norm",
                                        "fl.personal_lr_scale=3.0"])
    model = settings.build_model(cfg, num_experts=1)
    scales = personal_lr_scale(model, cfg)
    assert scales and set(scales) == set(split_state(dict(model.named_parameters()), "norms")[1])
    optimizer, _ = make_optimizer(model, settings.train_config(cfg, 1), 10, lr_scale=scales)
    lrs = sorted(g["initial_lr"] for g in optimizer.param_groups)
    assert lrs == pytest.approx([float(cfg.train.lr), 3.0 * float(cfg.train.lr)])
    sizes = sorted(sum(p.numel() for p in g["params"]) for g in optimizer.param_groups)
    assert sum(sizes) == sum(p.numel() for p in model.parameters())
    with pytest.raises(KeyError, match="lacks"):
        make_optimizer(model, settings.train_config(cfg, 1), 10, lr_scale={"nope": 2.0})


# --------------------------------------------------------------------------- whole run


def record(msg: Message, context: Context,
           call_next: Callable[[Message, Context], Message]) -> Message:
    """Client mod: pass the message on; write the reply's array keys and metrics, and the
    keys the site keeps in its Context state, to ``$RECORD_ENV``."""
    reply = call_next(msg, context)
    arrays = [list(r.keys()) for r in reply.content.values() if isinstance(r, ArrayRecord)]
    metrics = [dict(r) for r in reply.content.values() if isinstance(r, MetricRecord)]
    kept = context.state.array_records.get("kept")
    entry = {"type": msg.metadata.message_type, "node": context.node_id,
             "final": bool(msg.content.config_records["config"].get("final-test", False)),
             "arrays": arrays, "metrics": metrics,
             "kept": sorted(kept.keys()) if kept is not None else []}
    (Path(os.environ[RECORD_ENV]) / f"{uuid.uuid4().hex}.json").write_text(json.dumps(entry))
    return reply


app = project_client_app_with(record)


def _two_round_run(strategy: str, personal: str, monkeypatch, tmp_path):
    """A 2-round, 2-site run of ``strategy`` through the recording ClientApp; returns the
    config, the run folder, the recorded replies and the (shared, personal) key sets of
    the personal set ``personal``, after checking that every train reply carried exactly
    the shared arrays and the site kept exactly its personal ones."""
    args = [f"root={tmp_path / 'root'}", *TINY, "fl.rounds=2", f"fl.strategy={strategy}",
            "fl.finetune_epochs=1", f"run_name={strategy}"]
    cfg, rdir, entries = simulate_recorded(app, args, RECORD_ENV, tmp_path / "replies",
                                           monkeypatch)
    names = list(settings.build_model(cfg, num_experts=1).state_dict())
    shared, mine = (set(p) for p in split_state(dict.fromkeys(names), personal))
    trains = [e for e in entries if e["type"] == MessageType.TRAIN]
    assert len(trains) == 4
    for e in trains:  # exactly the shared arrays: nothing of the personal set
        assert [set(a) for a in e["arrays"]] == [shared]
        assert set(e["kept"]) == mine  # the site keeps its personal set
    return cfg, rdir, entries, shared, mine


@pytest.mark.slow
@pytest.mark.usefixtures("flower_task_identity")
def test_personal_norm_ft_run_keeps_norms_and_fine_tunes(monkeypatch, tmp_path):
    assert STRATEGIES["personal-norm-ft"].kept == "norms"
    cfg, rdir, entries, shared, mine = _two_round_run("personal-norm-ft", "norms",
                                                      monkeypatch, tmp_path)
    finals = [e for e in entries if e["final"]]
    assert len(finals) == 2
    for e in finals:  # fine-tuned before the final test, the steps reported
        (metrics,) = e["metrics"]
        assert metrics["finetune-steps"] >= 1 and metrics["finetune-epochs"] == 1
        # the best epoch is kept: never below the validation Dice before, ties keep epoch 0
        assert metrics["finetune-val-after"] >= metrics["finetune-val-before"]
        kept_ft = metrics["finetune-val-after"] > metrics["finetune-val-before"]
        assert metrics["finetune-kept"] == float(kept_ft) == metrics["finetune-epochs-kept"]
        assert e["arrays"] == []
    others = [e for e in entries if e["type"] != MessageType.TRAIN and not e["final"]]
    assert others and all("finetune-steps" not in e["metrics"][0] for e in others)
    # the server never held a personal array
    ckpt = torch.load(rdir / "server_checkpoint.pt", weights_only=True)
    assert set(ckpt["arrays"]) == shared
    # the site's state folder keeps the norms (for a restarted client or a resumed run)
    from m4fuse.personal.site_store import newest_kept

    kept = newest_kept(rdir / "clients" / "site0")
    assert kept is not None and set(kept["state"]) == mine
    # the final model gives each site its own norms and expert: what the site kept after
    # the final test (fine-tuned where the fine-tuning was kept)
    from m4fuse.io.checkpoint import build_model, load_checkpoint

    ckpt = load_checkpoint(rdir)
    assert ckpt.sites == ["site0", "site1"] and ckpt.metadata["strategy"] == "personal-norm-ft"
    assert set(ckpt.metadata["site_cases"]) == {"site0", "site1"}  # training cases per site
    tuned = {int(e["metrics"][0]["site-index"]): e["metrics"][0]["finetune-kept"] for e in finals}
    for index, site in enumerate(ckpt.sites):
        final_state = newest_kept(rdir / "clients" / site)
        assert final_state["round"] == 2
        assert ("finetune-kept" in final_state["metrics"]) is bool(tuned[index])
        model, expert = build_model(ckpt, site)
        assert expert == 0
        built = model.state_dict()
        assert all(torch.equal(built[k], v) for k, v in final_state["state"].items())
    layers = [ckpt.site_layers[s] for s in ckpt.sites]
    assert set(layers[0]) == set(layers[1]) == mine - {n for n in mine if is_expert(n)}
    assert any(not torch.equal(layers[0][k], layers[1][k]) for k in layers[0])
    # model.ckpt is each site's final model: the server's last shared weights and the
    # site's own newest state (the fine-tuned weights its final test scored)
    _assert_model_ckpt_is_each_sites_final_model("personal-norm-ft", cfg, rdir, ckpt.sites)
    segmented = tmp_path / "seg.nii.gz"
    from m4fuse.cli.main import main
    from m4fuse.data.fake import write_spaced_case

    case, _, _ = write_spaced_case(tmp_path / "case")
    assert main(["segment", str(case), "--model", str(rdir), "--site", "site1",
                 "--out", str(segmented), "--device", "cpu"]) == 0
    assert segmented.is_file()


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("strategy, layer", [
    ("personal-stem-ft", "encoder.conv1.weight"),
    ("personal-head-ft", "decoder.head.weight"),
    ("personal-decoder-ft", "decoder.mix1.proj.weight"),
])
@pytest.mark.slow
def test_partial_set_run_keeps_its_layers_and_fine_tunes_them(monkeypatch, tmp_path,
                                                              strategy, layer):
    personal = STRATEGIES[strategy].kept
    assert STRATEGIES[strategy].finetune == personal
    cfg, rdir, entries, shared, mine = _two_round_run(strategy, personal, monkeypatch, tmp_path)
    assert layer in mine
    finals = [e for e in entries if e["final"]]
    assert len(finals) == 2 and all(e["metrics"][0]["finetune-steps"] >= 1 for e in finals)
    ckpt = torch.load(rdir / "server_checkpoint.pt", weights_only=True)
    assert set(ckpt["arrays"]) == shared
    from m4fuse.io.checkpoint import load_checkpoint

    final = load_checkpoint(rdir)
    assert not torch.equal(*(final.site_layers[s][layer] for s in final.sites))  # per site
    _assert_model_ckpt_is_each_sites_final_model(strategy, cfg, rdir, final.sites)


@pytest.mark.parametrize("val_after, kept", [(0.2, False), (0.9, True)])
def test_finetune_is_undone_when_validation_gets_worse(monkeypatch, tmp_path, val_after, kept):
    from client.app import finetune
    from client.site import Site

    cfg = settings.compose("config", [f"root={tmp_path}", *TINY, "fl.finetune_epochs=1"])
    split = provision.load_sites(cfg)
    name = provision.site_names(split)[0]
    model = settings.build_model(cfg, num_experts=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter([0.5, val_after])  # validation mean Dice before, after fine-tuning
    monkeypatch.setattr("m4fuse.personal.finetune.validate_site",
                        lambda *a, **k: {"dice_mean": next(scores)})
    out = finetune(model, Site(cfg, name, 0, split[name], torch.device("cpu"), None), "norms")
    assert out["finetune-kept"] == float(kept) and out["finetune-steps"] >= 1
    same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert same is (not kept)


def test_a_site_without_validation_cases_keeps_its_weights(tmp_path):
    """A small site of a sized federation has no validation case to choose a fine-tuning
    epoch by: fine-tuning takes no step, leaves every weight as it was and says so (it used
    to fail the site's final test)."""
    from client.app import finetune
    from client.site import Site

    cfg = settings.compose("config", [f"root={tmp_path}", *TINY, "fl.finetune_epochs=2"])
    split = provision.load_sites(cfg)
    name = provision.site_names(split)[0]
    records = {**split[name], "val": []}
    model = settings.build_model(cfg, num_experts=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = finetune(model, Site(cfg, name, 0, records, torch.device("cpu"), None), "norms")
    assert out["finetune-steps"] == 0 and out["finetune-kept"] == 0
    assert out["finetune-epochs-kept"] == 0 and math.isnan(out["finetune-val-before"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.usefixtures("flower_task_identity")
def test_fedavg_ft_all_run_puts_each_sites_whole_fine_tuned_model_in_the_final_model(
        monkeypatch, tmp_path):
    """FedAvg + fine-tuning of the whole model (the federated model as initialisation): every
    round sends exactly the whole model, the site keeps nothing in its Context state, and
    model.ckpt holds, for each site that kept its fine-tuning, its whole fine-tuned model
    (site_layers = every non-expert weight, conv weights included, plus its expert): the
    weights its final test scored."""

    from m4fuse.io.checkpoint import build_model, load_checkpoint
    from m4fuse.personal.sets import Strategy, is_personal
    from m4fuse.personal.site_store import newest_kept

    assert STRATEGIES["fedavg-ft-all"] == Strategy("none", finetune="all")
    assert STRATEGIES["personal-ft-all"] == Strategy("experts", finetune="all")
    args = [f"root={tmp_path / 'root'}", *TINY, "fl.rounds=1", "fl.strategy=fedavg-ft-all",
            "fl.finetune_epochs=3", "run_name=faft"]
    cfg, rdir, entries = simulate_recorded(app, args, RECORD_ENV, tmp_path / "replies",
                                           monkeypatch)
    names = set(settings.build_model(cfg, num_experts=1).state_dict())
    trains = [e for e in entries if e["type"] == MessageType.TRAIN]
    assert len(trains) == 2
    for e in trains:  # the shared keys of fedavg: the whole model; nothing kept
        assert [set(a) for a in e["arrays"]] == [names] and e["kept"] == []
    finals = [e for e in entries if e["final"]]
    assert len(finals) == 2
    for e in finals:
        (metrics,) = e["metrics"]
        assert metrics["finetune-epochs"] == 3 and metrics["finetune-steps"] >= 3
        assert e["kept"] == []  # the fine-tuned model never enters the Context's kept record
    tuned = {int(e["metrics"][0]["site-index"]): e["metrics"][0]["finetune-kept"] for e in finals}
    ckpt = load_checkpoint(rdir)
    assert ckpt.metadata["strategy"] == "fedavg-ft-all"
    assert ckpt.sites == ["site0", "site1"]
    conv = {k for k in ckpt.shared if k.endswith(".weight") and not is_personal(k, "norms")}
    assert conv
    for index, site in enumerate(ckpt.sites):
        model, expert = build_model(ckpt, site)
        assert expert == 0
        built = model.state_dict()
        if tuned[index]:
            layers = ckpt.site_layers[site]
            assert set(layers) == set(ckpt.shared)  # a full copy of the shared weights
            assert any(not torch.equal(layers[k], ckpt.shared[k]) for k in conv)
            final_state = newest_kept(rdir / "clients" / site)
            assert set(final_state["state"]) == names
            assert all(torch.equal(built[k], v) for k, v in final_state["state"].items())
        else:  # epoch 0 kept: the federated model itself
            assert site not in ckpt.site_layers
            assert all(torch.equal(built[k], v) for k, v in ckpt.shared.items())
    assert any(tuned.values()), tuned  # the tiny run does keep a fine-tuning somewhere
    # model.ckpt is each site's final model: its whole fine-tuned model from its own folder
    _assert_model_ckpt_is_each_sites_final_model("fedavg-ft-all", cfg, rdir, ckpt.sites)
