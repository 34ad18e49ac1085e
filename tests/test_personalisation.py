"""Site personalisation: AdamW moments kept across rounds (``fl.optimizer_state``)
through the real ClientApp, the best-epoch "+FT" fine-tuning, and a new site's start from the
sites' mean layers. Tiny widths, 16³ volumes, seconds."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flower_fixtures import TINY_FL, client_train_round
from flwr.app import ArrayRecord, Message, RecordDict

from m4fuse.personal.finetune import finetune_site
from m4fuse.personal.sets import split_state
from m4fuse.run import provision, settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("m4fuse-pers"))


# --------------------------------------------------------------------------- config


def test_optimizer_state_config_is_checked(root):
    base = [f"root={root}", *TINY_FL]
    assert settings.compose("config", base).fl.optimizer_state == "fresh"
    with pytest.raises(ValueError, match=r"fl.optimizer_state.*'moments'"):
        settings.compose("config", [*base, "fl.optimizer_state=moments"])
    with pytest.raises(ValueError, match=r"fl.optimizer_state=personal with privacy.enabled"):
        settings.compose("config", [*base, "fl.optimizer_state=personal",
                                      "privacy.enabled=true"])


# --------------------------------------------------------------------------- optimiser state


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize("mode", ["fresh", "personal", "all"])
def test_optimizer_state_across_rounds_through_the_client_app(monkeypatch, root, tmp_path, mode):
    """Round 2 starts from round 1's AdamW moments of the kept set (``personal``) or of every
    parameter (``all``), from none (``fresh``); a new run identity clears them; the reply
    carries only the shared arrays and the metrics."""
    from m4fuse.training.trainer import LocalTrainer
    from server.runner import initial_state

    args = [f"root={root}", *TINY_FL, "fl.strategy=personal-norm",
            f"fl.optimizer_state={mode}", f"run_name=opt-{mode}"]
    monkeypatch.setenv(settings.OVERRIDES_ENV, " ".join(args))
    cfg = settings.compose("config", args)
    held, _ = initial_state(cfg)
    arrays = ArrayRecord(dict(held.items()))
    names = [n for n, _ in settings.build_model(cfg, 1).named_parameters()]
    shared, personal = (set(p) for p in split_state(dict.fromkeys(names), "norms"))

    seen: list[tuple[dict, dict]] = []
    original = LocalTrainer.train_epochs

    def moments(model, optimizer) -> dict[str, torch.Tensor]:
        by_id = {id(p): n for n, p in model.named_parameters()}
        return {by_id[id(p)]: s["exp_avg"].clone() for p, s in optimizer.state.items() if s}

    def spy(trainer, loader):
        start = moments(trainer.model, trainer.optimizer)
        out = original(trainer, loader)
        seen.append((start, moments(trainer.model, trainer.optimizer)))
        return out

    monkeypatch.setattr(LocalTrainer, "train_epochs", spy)
    state = RecordDict()

    def train_round(rnd: int, identity: str) -> Message:
        reply = client_train_round(0, arrays, state, rnd, str(tmp_path), identity=identity)
        assert not reply.has_error()
        assert set(reply.content.keys()) == {"arrays", "metrics"}  # nothing else is sent
        assert set(reply.content.array_records["arrays"].keys()) == shared
        return reply

    train_round(1, "run-a")
    train_round(2, "run-a")
    (start1, end1), (start2, _) = seen
    assert start1 == {} and set(end1) == set(names)
    if mode == "fresh":
        assert start2 == {} and "optimizer-state" not in state.array_records
    else:
        expected = personal if mode == "personal" else set(names)
        assert set(start2) == expected
        assert all(torch.equal(start2[n], end1[n]) for n in expected)
    train_round(3, "run-b")  # another run of the same name: no moments of run-a
    assert seen[2][0] == {}


# --------------------------------------------------------------------------- fine-tuning


def _finetune(monkeypatch, root, scores, epochs=2):
    """Run client.app.finetune with validation Dice ``scores`` (before, after epoch 1, ...);
    the fake validation draws from every RNG, as a real one may. Returns (model before,
    states seen at each validation, model after, metrics)."""
    from client.app import finetune
    from client.site import Site

    cfg = settings.compose("config", [f"root={root}", *TINY_FL,
                                        "fl.strategy=personal-norm-ft",
                                        f"fl.finetune_epochs={epochs}"])
    split = provision.load_sites(cfg)
    name = provision.site_names(split)[0]
    model = settings.build_model(cfg, num_experts=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    it = iter(scores)
    states: list[dict[str, torch.Tensor]] = []

    def fake_validate(net, *a, **k):
        states.append({k2: v.clone() for k2, v in net.state_dict().items()})
        torch.rand(3), np.random.rand(3), random.random()
        return {"dice_mean": next(it)}

    monkeypatch.setattr("m4fuse.personal.finetune.validate_site", fake_validate)
    site = Site(cfg, name, 0, split[name], torch.device("cpu"), None)
    out = finetune(model, site, "norms")
    return cfg, site, before, states, model.state_dict(), out


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scores", [[0.5, 0.4, 0.3], [0.5, 0.5, 0.5]])
def test_finetuning_keeps_epoch_0_when_validation_never_improves(monkeypatch, root, scores):
    *_, before, states, after, out = _finetune(monkeypatch, root, scores)
    assert out["finetune-epochs-kept"] == 0 and out["finetune-kept"] == 0
    assert out["finetune-val-after"] == out["finetune-val-before"] == 0.5
    assert _same(before, after) and not _same(before, states[-1])  # it did train


def test_finetuning_keeps_the_best_epoch(monkeypatch, root):
    *_, states, after, out = _finetune(monkeypatch, root, [0.5, 0.7, 0.6])
    assert out["finetune-epochs-kept"] == 1 and out["finetune-kept"] == 1
    assert out["finetune-val-after"] == 0.7 and out["finetune-epochs"] == 2
    assert _same(states[1], after) and not _same(states[2], after)


def test_finetuning_with_validations_trains_as_without(monkeypatch, root):
    """The validations between epochs leave the training untouched: the last epoch's weights
    are those of a plain fine-tuning of as many epochs."""
    cfg, site, before, _, after, out = _finetune(monkeypatch, root, [0.1, 0.2, 0.3])
    assert out["finetune-epochs-kept"] == 2
    model = settings.build_model(cfg, num_experts=1)
    model.load_state_dict(before)
    seed = int(cfg.seed) * 1000 + site.index * 100 + 99
    finetune_site(model, site.records["train"], 0, cfg, site.device, "norms", 2, seed)
    assert _same(model.state_dict(), after)


# --------------------------------------------------------------------------- new site


def _federation(cfg, path, site_cases):
    """A toy personal-norm checkpoint: shared = the initial model, two sites whose norms and
    experts are moved by +1 / +3."""
    from m4fuse.io.checkpoint import save_checkpoint
    from m4fuse.personal.sets import expert_state

    model = settings.build_model(cfg, num_experts=1)
    shared, mine = split_state(model.state_dict(), "norms")
    layers, expert = split_state(mine)
    moved = {s: ({k: v + d for k, v in layers.items()},
                 {k: v + d for k, v in expert_state(expert, 0).items()})
             for s, d in (("siteA", 1.0), ("siteB", 3.0))}
    meta = {"strategy": "personal-norm", **({"site_cases": site_cases} if site_cases else {})}
    return save_checkpoint(path, model.config, {**shared, **layers},
                           {s: e for s, (_, e) in moved.items()}, None, meta,
                           {s: lay for s, (lay, _) in moved.items()}), layers, moved


@pytest.mark.parametrize("site_cases, weight_b", [(None, 0.5), ({"siteA": 1, "siteB": 3}, 0.75)])
def test_new_site_starts_from_the_sites_mean_layers(monkeypatch, root, tmp_path, site_cases,
                                                    weight_b):
    from m4fuse.io.checkpoint import load_checkpoint
    from m4fuse.personal import new_site as newsite

    cfg = settings.compose("config", [f"root={root}", *TINY_FL, "tracking.enabled=false"])
    path, initial, moved = _federation(cfg, tmp_path / "model.ckpt", site_cases)
    ckpt = load_checkpoint(path)
    mean, note = newsite.start_layers(ckpt)
    assert set(mean) == set(initial)
    assert ("case-weighted" if site_cases else "equal weights") in note
    for k, v in initial.items():  # A = v + 1, B = v + 3
        assert torch.allclose(mean[k], v + 1.0 + 2.0 * weight_b, atol=1e-6)
    expert, _ = newsite.mean_expert(ckpt)
    assert all(torch.allclose(expert[k], v - 1.0 + 1.0 + 2.0 * weight_b, atol=1e-6)
               for k, v in moved["siteA"][1].items())

    # join_site scores the shared model alone with those mean layers (and fine-tunes from them)
    seen = []

    def spy(model, expert_index, records, device):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return [{"case": "x", "dice_mean": 0.0}]

    monkeypatch.setattr(newsite, "score_cases", spy)
    split = provision.load_sites(cfg)
    records = split[provision.site_names(split)[0]]
    result = newsite.join_site(ckpt, records["train"], records["test"], "siteN", cfg, cases=1,
                               epochs=1, expert_init="mean")
    assert all(torch.equal(seen[0][k], v) for k, v in mean.items())
    assert result.start["layers"] == note and "experts" in result.start["expert"]
    with pytest.raises(ValueError, match="--expert-init"):
        newsite.join_site(ckpt, records["train"], records["test"], "siteN", cfg, cases=1,
                          epochs=1, expert_init="zero")


def test_new_site_without_site_layers_keeps_the_shared_copy(root, tmp_path):
    from m4fuse.io.checkpoint import load_checkpoint, save_checkpoint
    from m4fuse.personal import new_site as newsite

    cfg = settings.compose("config", [f"root={root}", *TINY_FL])
    model = settings.build_model(cfg, num_experts=1)
    shared, _ = split_state(model.state_dict())
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "v.ckpt", model.config, shared, {}, None,
                                           {"strategy": "personal-norm"}))
    assert newsite.start_layers(ckpt) == ({}, "shared")
    with pytest.raises(ValueError, match="no site experts"):
        newsite.mean_expert(ckpt)
