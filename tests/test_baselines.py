"""Pooled and local baselines (no Flower) on a tiny synthetic split (the comparison: test_compare.py)."""

from __future__ import annotations

import json

import pytest
import torch
from engine_fixtures import TINY_OVERRIDES

from m4fuse.run import provision, settings

TINY = [*TINY_OVERRIDES, "fl.rounds=2", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def cfg_args(tmp_path_factory) -> list[str]:
    return [f"root={tmp_path_factory.mktemp('baselines')}", *TINY]


def test_pooled_routes_each_site_to_its_expert(cfg_args):
    from m4fuse.training.baselines import pooled_loader

    cfg = settings.compose("config", cfg_args)
    split = provision.load_sites(cfg)
    names = provision.site_names(split)
    loader = pooled_loader(split, names, cfg, seed=0)
    seen = {}
    for batch in loader:
        for case, site in zip(batch["case"], batch["site"].tolist()):
            seen[case] = site
    expected = {r.case_id: i for i, n in enumerate(names) for r in split[n]["train"]}
    assert seen == expected  # the union of the training cases, each with its site's expert


def test_pooled_and_local_train_and_score_every_site(cfg_args):
    from m4fuse.io.checkpoint import load_checkpoint
    from m4fuse.training.baselines import run_baseline

    pooled = run_baseline(settings.compose("config", [*cfg_args, "run_name=p"]), "pooled")
    local = run_baseline(settings.compose("config", [*cfg_args, "run_name=l"]), "local")
    for summary in (pooled, local):
        assert [e["round"] for e in summary.history] == [1, 2]
        assert [r["site"] for r in summary.rows] == ["site0", "site1", "mean"]
        for row in summary.rows:
            assert 0.0 <= row["test_dice_mean"] <= 1.0
            assert row["test_hd95_mean"] >= 0.0
            # the lesion-wise scores (BraTS 2023+ rule) beside them
            assert 0.0 <= row["test_lesion_dice_mean"] <= 1.0
            assert 0.0 <= row["test_lesion_hd95_mean"] <= 374.0
        results = (summary.run_dir / "results.md").read_text()
        assert "test lesion Dice WT" in results
        # the platform the numbers came from, under the table and in summary.json
        assert f"Computed on: torch {torch.__version__} (CPU kernels " in results
        written = json.loads((summary.run_dir / "summary.json").read_text())
        assert written["platform"]["torch"] == torch.__version__
        assert (summary.run_dir / "dice_per_round.png").stat().st_size > 0
    ckpt = load_checkpoint(pooled.run_dir / "model.ckpt")
    assert set(ckpt.experts) == {"site0", "site1"}
    a, b = (ckpt.experts[s] for s in ("site0", "site1"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "pooled experts should differ by site"
    assert sorted(p.name for p in (local.run_dir / "models").iterdir()) == [
        "site0.ckpt", "site1.ckpt"]


def test_train_command_runs_the_local_baseline(cfg_args, capsys):
    from m4fuse.cli.main import main

    assert main(["train", "--mode", "local", *cfg_args, "run_name=cli", "fl.rounds=1"]) == 0
    assert "cli (local): per-site results" in capsys.readouterr().out


def test_a_site_without_validation_cases_trains_and_is_tested(cfg_args):
    """A small site that validates on none (sized sites) still trains and is tested; the
    validation mean is over the sites that validate."""
    from m4fuse.training.baselines import run_baseline

    cfg = settings.compose("config", [*cfg_args, "fl.rounds=1", "run_name=no-val"])
    split = provision.load_sites(cfg)
    first, second = provision.site_names(split)
    given = {first: split[first], second: {**split[second], "val": []}}
    summary = run_baseline(cfg, "local", split=given)
    rows = {r["name"]: r for r in summary.rows}
    assert "val_dice_mean" not in rows[second] and rows[second]["test_num-examples"] == len(split[second]["test"])
    cases = len(split[second]["train"]) + len(split[second]["test"])
    assert rows[second]["val_num-examples"] == f"not scored: {cases} cases"
    assert rows["weighted by cases"]["val_num-examples"] == len(split[first]["val"])
    assert rows["weighted by cases"]["val_dice_mean"] == pytest.approx(rows[first]["val_dice_mean"])
