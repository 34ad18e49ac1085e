"""simulations.compare over seeds (per-case JSON, Wilcoxon lines, cross-site matrix, the new
site) and ``m4fuse site join`` (a fresh expert, shared weights frozen), on a 2-site, 1-round,
16^3 federation."""

from __future__ import annotations

import json

import pytest
import torch
from engine_fixtures import TINY_OVERRIDES

from m4fuse.run import provision, settings

TINY = [*TINY_OVERRIDES, "fl.rounds=1", "fl.local_epochs=1", "tracking.enabled=false",
        "fl.strategy=personal"]
ROW_KEYS = {"mode", "seed", "site", "case", "dice_wt", "dice_tc", "dice_et", "hd95_wt",
            "hd95_tc", "hd95_et",
            *(f"lesion_{m}_{r}" for m in ("dice", "hd95", "found", "missed", "fp")
              for r in ("wt", "tc", "et"))}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from simulations.compare import main

    root = tmp_path_factory.mktemp("compare")
    args = [f"root={root}", *TINY]
    assert main(["--seeds", "0,1", "--modes", "pooled,local,personal", "--new-site-cases", "1",
                 "--new-site-epochs", "1", *args]) == 0
    out = root / "runs" / "compare"
    return args, out, json.loads((out / "comparison.json").read_text())


def test_help_prints_usage_without_hydra(capsys):
    from simulations.compare import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--seeds" in text and "--modes" in text and "overrides" in text


def test_bad_modes_and_seeds_fail_before_training(tmp_path):
    from simulations.compare import main, run_compare

    with pytest.raises(ValueError, match=r"--modes: unknown \['fedbogus'\]"):
        run_compare([f"root={tmp_path}", *TINY], modes=["local", "fedbogus"])
    with pytest.raises(SystemExit, match="--seeds must be comma-separated integers"):
        main(["--seeds", "0,x", f"root={tmp_path}", *TINY])
    # k larger than the new site's 2 training cases: named, before any run folder exists
    with pytest.raises(ValueError, match=r"--cases must be in 1\.\.2 .*got 9"):
        run_compare([f"root={tmp_path}", *TINY], modes=["local", "personal"], seeds=[0],
                    new_site_cases=[9])
    assert not (tmp_path / "runs").exists()


def test_sized_sites_refuse_the_held_out_site_in_one_line(tmp_path):
    """A held-out new site is drawn only for equal sites: on a sized federation the command
    stops in one line naming the fix, before any data or run folder is written."""
    from simulations.compare import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--modes", "local,personal-norm-ft", "--crosssite", "none", f"root={tmp_path}",
              "data=brats19_shaped"])
    message = str(exit_info.value.code)
    assert message.startswith("simulations.compare: error: a held-out synthetic site")
    assert "--new-site-cases none" in message and "\n" not in message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_json_has_one_row_per_mode_seed_site_and_case(compared):
    args, out, data = compared
    rows = data["rows"]
    assert rows and all(set(r) == ROW_KEYS for r in rows)
    for seed in (0, 1):
        split = provision.load_sites(settings.compose("config", [*args, f"seed={seed}"]))
        expected = {(s, r.case_id) for s in split for r in split[s]["test"]}
        for mode in ("pooled", "local", "personal"):
            got = [(r["site"], r["case"]) for r in rows if r["mode"] == mode and r["seed"] == seed]
            assert sorted(got) == sorted(expected)  # every test case once
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("dice_wt", "dice_tc", "dice_et"))
    # lesion-wise: Dice in [0, 1], HD95 in [0, 374] mm, whole-number counts
    assert all(0.0 <= r[f"lesion_dice_{g}"] <= 1.0 and 0.0 <= r[f"lesion_hd95_{g}"] <= 374.0
               for r in rows for g in ("wt", "tc", "et"))
    assert all(float(r[k]).is_integer() for r in rows for k in r if k.startswith(
        ("lesion_found", "lesion_missed", "lesion_fp")))
    summary = data["summary"]
    assert summary["default_strategy"] == "personal" and summary["seeds"] == [0, 1]
    by_site = summary["by_site"]["personal"]["site0"]
    assert by_site["n_seeds"] == 2 and set(by_site["per_seed"]) == {"0", "1"}
    # training cases per site as trained (seed 0's split) and each mode's optimiser steps
    cfg0 = settings.compose("config", [*args, "seed=0"])
    split0 = provision.load_sites(cfg0)
    assert summary["train_cases"] == {s: len(split0[s]["train"]) for s in split0}
    batches = {s: -(-len(split0[s]["train"]) // int(cfg0.train.batch_size)) for s in split0}
    for mode in ("local", "personal"):  # one epoch per round, 1 round
        assert {s: v["total"] for s, v in summary["steps"][mode].items()} == batches
    assert summary["steps"]["pooled"]["all sites"]["total"] == -(
        -sum(len(split0[s]["train"]) for s in split0) // int(cfg0.train.batch_size))
    # the comparison's own scoring agrees with every run's own per-site table
    assert all(d is not None and d < 2e-3 for by in summary["check"].values()
               for d in by.values())


@pytest.mark.slow
def test_report_has_wilcoxon_lines_goals_and_plots(compared):
    _, out, data = compared
    text = (out / "comparison.md").read_text()
    tests = data["summary"]["tests"]
    assert [(t["b"], t["site"]) for t in tests] == [("local", "site0"), ("local", "site1"),
                                                    ("local", "all")]
    assert tests[-1]["n"] == tests[0]["n"] + tests[1]["n"] == 8  # 2 seeds x 2 sites x 2 cases
    for t in tests:
        p = "n/a" if t["p"] is None else f"{t['p']:.3g}"
        assert f"| personal | local | {t['site']} | {t['n']} |" in text and f"| {p} |" in text
    assert "personal >= local on every site" in text
    # the lesion-wise tables beside the voxel-wise one
    assert "| lesion-wise Dice | site0 | site1 | all sites |" in text
    assert "| lesion-wise HD95 (mm) | site0 | site1 | all sites |" in text
    lesion = data["summary"]["by_site_lesion"]["dice"]["personal"]["site0"]
    mine = [sum(r[f"lesion_dice_{g}"] for g in ("wt", "tc", "et")) / 3 for r in data["rows"]
            if r["mode"] == "personal" and r["seed"] == 0 and r["site"] == "site0"]
    assert lesion["per_seed"]["0"] == pytest.approx(sum(mine) / len(mine))
    assert "mean Dice >= 97 % of pooled" in text
    for name in ("comparison.png", "crosssite.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cross = data["summary"]["crosssite"]
    assert set(cross) == {"personal", "local"}
    assert cross["personal"]["model_sites"] == cross["personal"]["sites"] == ["site0", "site1"]
    new_site = data["summary"]["new_site"]
    assert new_site["site"] == "site2" and new_site["by_k"]["1"]["frozen_unchanged"]


@pytest.mark.slow
def test_join_trains_only_the_new_expert(compared, tmp_path, capsys):
    from m4fuse.cli.main import main
    from m4fuse.io.checkpoint import load_checkpoint
    from m4fuse.personal.sets import expert_index

    args, out, _ = compared
    model = out.parent / "compare-personal-seed0" / "model.ckpt"
    bigger = settings.compose("config", [*args, "data.sites=3"])
    source, cache = provision.data_paths(bigger)
    csv = str(source / "partition.csv")
    join = ["site", "join", "--model", str(model), "--data", str(cache), "--site", "site2",
            "--partition-csv", csv, "--epochs", "2", *args]
    assert main([*join, "--cases", "3"]) == 2  # site2 has 2 training cases
    assert "--cases must be in 1..2 (site 'site2' has 2 training cases), got 3" in \
        capsys.readouterr().err
    target = tmp_path / "joined.ckpt"
    assert main([*join, "--cases", "2", "--out", str(target)]) == 0
    assert "shared weights unchanged: True" in capsys.readouterr().out
    before, after = load_checkpoint(model), load_checkpoint(target)
    assert set(before.shared) == set(after.shared)
    assert all(torch.equal(before.shared[k], after.shared[k]) for k in before.shared)
    assert set(after.experts) == {"site0", "site1", "site2"}
    new = after.experts["site2"]
    assert all(expert_index(k.replace("*", "0")) == 0 for k in new)
    # the fresh expert started as zero output projection; training moved it
    assert any(bool(v.abs().sum() > 0) and not torch.equal(v, before.experts["site0"][k])
               for k, v in new.items())


def test_pairs_match_cases_and_identical_scores_give_p_one():
    from m4fuse.evaluation.stats import pair_cases, paired_test

    def row(mode, case, dice, seed=0):
        return {"mode": mode, "seed": seed, "site": "s", "case": case, "dice_wt": dice,
                "dice_tc": dice, "dice_et": dice}

    rows = [row("a", "c2", 0.9), row("a", "c1", 0.5), row("b", "c1", 0.4), row("b", "c2", 0.6)]
    a, b = pair_cases(rows, "a", "b")
    assert a.tolist() == pytest.approx([0.5, 0.9]) and b.tolist() == pytest.approx([0.4, 0.6])
    with pytest.raises(ValueError, match="different cases"):
        pair_cases([*rows, row("a", "c3", 0.1)], "a", "b")
    assert paired_test([0.5, 0.7], [0.5, 0.7])["p"] == 1.0
    test = paired_test([0.9, 0.8, 0.7, 0.95, 0.85, 0.9], [0.1, 0.2, 0.3, 0.15, 0.25, 0.2])
    assert test["mean_diff"] > 0.6 and test["p"] < 0.05 and test["n"] == 6


def test_score_matrix_reuses_the_rows_at_home(monkeypatch):
    """With ``home_rows`` the diagonal is those rows (first, in their order) and each model is
    scored on the other sites' cases only; without, on every site's."""
    from m4fuse.evaluation import crosssite

    keys = crosssite.SCORE_KEYS + crosssite.LESION_CASE_KEYS
    scored = []

    def fake_score_cases(model, expert, records, device):
        scored.append((model, list(records)))
        return [{"case": c, **{k: float(expert) for k in keys}} for c in records]

    monkeypatch.setattr(crosssite, "score_cases", fake_score_cases)
    models = {"a": ("model a", 0), "b": ("model b", 1)}
    tests = {"a": ["a1", "a2"], "b": ["b1"]}
    home = [{"mode": "m", "seed": 0, "site": s, "case": c, **{k: 9.0 for k in keys}}
            for s, cases in tests.items() for c in cases]
    rows = crosssite.score_matrix(models, tests, torch.device("cpu"), home_rows=home)
    assert [(r["model_site"], r["site"], r["case"]) for r in rows] == [
        ("a", "a", "a1"), ("a", "a", "a2"), ("b", "b", "b1"), ("a", "b", "b1"),
        ("b", "a", "a1"), ("b", "a", "a2")]
    assert list(rows[0]) == ["model_site", "site", "case", *keys] and rows[0]["dice_wt"] == 9.0
    assert scored == [("model a", ["b1"]), ("model b", ["a1", "a2"])]
    assert rows[3]["dice_wt"] == 0.0 and rows[4]["dice_wt"] == 1.0
    scored.clear()
    every = crosssite.score_matrix(models, tests, torch.device("cpu"))
    assert len(every) == 6 and len(scored) == 4  # the diagonal scored too
