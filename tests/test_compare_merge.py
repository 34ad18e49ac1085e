"""Joining comparisons of the same settings (``python -m simulations.compare --merge``)."""

from __future__ import annotations

import json

import pytest

from simulations.compare import merge_comparisons, summarise, write_report

SITES = ["site0", "site1", "site2", "site3"]


def _rows(mode: str, seed: int, dice: float) -> list[dict]:
    return [{"mode": mode, "seed": seed, "site": site, "case": f"{site}-c{c}",
             "dice_wt": dice + 0.01 * c, "dice_tc": dice, "dice_et": dice,
             "hd95_wt": 3.0, "hd95_tc": 3.0, "hd95_et": 3.0}
            for site in SITES for c in range(6)]


def _comparison(tmp_path, name: str, modes_dice: dict[str, float], seeds: list[int],
                budget=None) -> str:
    rows = [r for seed in seeds for mode, d in modes_dice.items()
            for r in _rows(mode, seed, d + 0.02 * seed)]
    modes = list(modes_dice)
    summary = summarise(
        name=name, default="personal-norm-ft", modes=modes, seeds=seeds, sites=SITES,
        overrides=["fl.rounds=60"], test_cases={str(s): {x: 6 for x in SITES} for s in seeds},
        budget=budget or {"rounds": 60, "local_epochs": 1}, rows=rows, cross_rows={},
        new_site=None, seconds={m: {str(s): {"run": 1.0, "scoring": 0.5} for s in seeds}
                                for m in modes},
        bytes_by_mode={m: [0.0] * len(seeds) for m in modes},
        check={m: {str(s): 0.0 for s in seeds} for m in modes}, convergence=[])
    path, _ = write_report(tmp_path / name, summary, rows, {}, summary.pop("_new_site_rows"))
    return path


def test_merge_joins_seeds_and_recomputes_the_summary(tmp_path):
    a = _comparison(tmp_path, "a", {"pooled": 0.8, "fedavg": 0.7, "personal-norm-ft": 0.75,
                                    "personal": 0.7}, [0])
    b = _comparison(tmp_path, "b", {"pooled": 0.8, "fedavg": 0.7, "personal-norm-ft": 0.75},
                    [1, 2])
    merged = json.loads(merge_comparisons([a, b], tmp_path / "m", "m").read_text())
    s = merged["summary"]
    assert s["seeds"] == [0, 1, 2]
    assert s["modes"] == ["pooled", "fedavg", "personal-norm-ft", "personal"]
    assert len(merged["rows"]) == (4 + 3 + 3) * 24
    # pooled per seed: 0.8 + 0.02 seed + (0.01 x mean c = 0.025) / 3 on WT only
    per_seed = s["by_site"]["pooled"]["mean"]["per_seed"]
    assert per_seed == pytest.approx({"0": 0.80 + 0.025 / 3, "1": 0.82 + 0.025 / 3,
                                      "2": 0.84 + 0.025 / 3})
    assert s["by_site"]["personal"]["mean"]["n_seeds"] == 1
    fed_all = next(t for t in s["tests"] if t["b"] == "fedavg" and t["site"] == "all")
    assert fed_all["n"] == 3 * 4 * 6 and fed_all["mean_diff"] == pytest.approx(0.05)
    assert "seed 1" in (tmp_path / "m" / "comparison.md").read_text()


def test_merge_tests_and_goals_use_the_seeds_both_modes_ran(tmp_path):
    a = _comparison(tmp_path, "a", {"pooled": 0.8, "fedavg": 0.7, "local": 0.74,
                                    "personal-norm-ft": 0.75}, [0])
    b = _comparison(tmp_path, "b", {"local": 0.70, "personal-norm-ft": 0.75}, [1, 2])
    merged = json.loads(merge_comparisons([a, b], tmp_path / "m", "m").read_text())
    s = merged["summary"]
    tests = {(t["b"], t["site"]): t for t in s["tests"]}
    # fedavg ran on seed 0 only: its test pairs seed 0's cases; local's all three seeds
    assert tests[("fedavg", "all")]["seeds"] == [0] and tests[("fedavg", "all")]["n"] == 24
    assert tests[("local", "all")]["seeds"] == [0, 1, 2] and tests[("local", "all")]["n"] == 72
    assert tests[("fedavg", "all")]["mean_diff"] == pytest.approx(0.05)
    # pooled (seed 0: 0.8) against the default on seed 0 only (0.75), not on its 3 seeds
    # (0.77 mean): 0.75 / 0.8 = 93.75 %, below 97 %
    pooled_goal = next(g for g in s["goals"] if "pooled" in g["goal"])
    assert pooled_goal["met"] is False and "93.8 %" in pooled_goal["detail"]
    assert "over the 1 seed(s) both ran" in pooled_goal["detail"]
    local_goal = next(g for g in s["goals"] if "local" in g["goal"])
    assert local_goal["met"] is True and "both ran" not in local_goal["detail"]
    assert "fedavg (seeds 0)" in (tmp_path / "m" / "comparison.md").read_text()


def test_merge_refuses_other_budgets_and_repeated_runs(tmp_path):
    a = _comparison(tmp_path, "a", {"pooled": 0.8}, [0])
    b = _comparison(tmp_path, "b", {"pooled": 0.8}, [1], budget={"rounds": 120,
                                                                 "local_epochs": 1})
    with pytest.raises(ValueError, match="summary.budget differs"):
        merge_comparisons([a, b], tmp_path / "m", "m")
    c = _comparison(tmp_path, "c", {"pooled": 0.8}, [0])
    with pytest.raises(ValueError, match="pooled seed 0 is in both"):
        merge_comparisons([a, c], tmp_path / "m", "m")


def test_a_merged_file_s_mode_on_fewer_seeds_takes_its_missing_seeds(tmp_path):
    """A merged file holds ``personal`` on seed 0 only (its summary lists seeds 0-2): another
    file may add ``personal``'s seeds 1 and 2, but not seed 0 again."""
    a = _comparison(tmp_path, "a", {"personal-norm-ft": 0.8, "personal": 0.7}, [0])
    b = _comparison(tmp_path, "b", {"personal-norm-ft": 0.8}, [1, 2])
    first = merge_comparisons([a, b], tmp_path / "ab", "ab")
    more = _comparison(tmp_path, "more", {"personal": 0.72}, [1, 2])
    merged = json.loads(merge_comparisons([first, more], tmp_path / "m", "m").read_text())
    assert merged["summary"]["by_site"]["personal"]["mean"]["n_seeds"] == 3
    again = _comparison(tmp_path, "again", {"personal": 0.72}, [0])
    with pytest.raises(ValueError, match="personal seed 0 is in both"):
        merge_comparisons([first, again], tmp_path / "m2", "m2")


def test_flags_and_overrides_may_come_in_any_order():
    from simulations.compare import parse_args

    args = parse_args(
        ["--seeds", "0", "fl.rounds=60", "--modes", "fedavg", "fl.optimizer_state=all",
         "run_name=x"])
    assert args.seeds == "0" and args.modes == "fedavg"
    assert args.overrides == ["fl.rounds=60", "fl.optimizer_state=all", "run_name=x"]


@pytest.mark.slow  # writes and merges whole reports with their plots (about 10 s)
def test_a_suffix_renames_modes_and_lets_overrides_differ(tmp_path):
    a = _comparison(tmp_path, "a", {"local": 0.8, "fedavg": 0.7}, [0, 1])
    b = _comparison(tmp_path, "b", {"fedavg": 0.72, "personal-norm-ft": 0.78}, [0, 1])
    data = json.loads(b.read_text())
    data["summary"]["overrides"] = ["fl.rounds=60", "fl.server_opt=fedavgm"]
    b.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="summary.overrides differs"):
        merge_comparisons([a, b], tmp_path / "m", "m")
    with pytest.raises(ValueError, match="not among the merged modes"):
        merge_comparisons([a, f"{b}#+m"], tmp_path / "m", "m", default="personal-norm-ft")
    merged = json.loads(merge_comparisons([a, f"{b}#+m"], tmp_path / "m", "m",
                                          default="personal-norm-ft+m",
                                          against=["fedavg+m"]).read_text())
    s = merged["summary"]
    assert s["modes"] == ["local", "fedavg", "fedavg+m", "personal-norm-ft+m"]
    assert s["default_strategy"] == "personal-norm-ft+m"
    assert s["merged_from"][1]["overrides"] == ["fl.rounds=60", "fl.server_opt=fedavgm"]
    vs_local = next(t for t in s["tests"] if t["b"] == "local" and t["site"] == "all")
    assert vs_local["mean_diff"] == pytest.approx(-0.02)
    assert {r["mode"] for r in merged["rows"]} == set(s["modes"])
    vs_fedavg_m = next(t for t in s["tests"] if t["b"] == "fedavg+m" and t["site"] == "all")
    assert vs_fedavg_m["mean_diff"] == pytest.approx(0.06)


@pytest.mark.slow  # writes and merges whole reports with their plots (about 10 s)
def test_fedavg_names_the_mode_that_stands_for_fedavg_in_the_tests_and_goals(tmp_path):
    a = _comparison(tmp_path, "a", {"local": 0.8, "personal-norm-ft": 0.85}, [0, 1])
    b = _comparison(tmp_path, "b", {"fedavg": 0.7}, [0, 1])
    data = json.loads(b.read_text())
    data["summary"]["overrides"] = ["fl.rounds=60", "fl.server_opt=none"]
    b.write_text(json.dumps(data))
    plain = json.loads(merge_comparisons([a, f"{b}#+none"], tmp_path / "m", "m").read_text())
    fed_goal = plain["summary"]["goals"][1]
    assert fed_goal["met"] is None and "fedavg" in fed_goal["detail"]  # no mode "fedavg"
    with pytest.raises(ValueError, match="--fedavg 'fedavg\\+x' is not among"):
        merge_comparisons([a, f"{b}#+none"], tmp_path / "m", "m", fedavg="fedavg+x")
    named = json.loads(merge_comparisons([a, f"{b}#+none"], tmp_path / "n", "n",
                                         fedavg="fedavg+none").read_text())["summary"]
    vs_fed = next(t for t in named["tests"] if t["b"] == "fedavg+none" and t["site"] == "all")
    assert vs_fed["mean_diff"] == pytest.approx(0.15)
    goal = named["goals"][1]
    assert "fedavg+none" in goal["goal"] and goal["met"] is True
