"""The privacy-utility curve's collector and report (``simulations.privacy_curve``), on a
hand-made comparison and run folders in the real formats: nothing trains here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simulations import privacy_curve as pc

SITES = ["site0", "site1"]


def _row(mode: str, seed: int, site: str, case: int, wt: float, tc: float, et: float) -> dict:
    return {"mode": mode, "seed": seed, "site": site, "case": f"{site}-{case}",
            "dice_wt": wt, "dice_tc": tc, "dice_et": et}


def _history(eps: list[list[float]] | None) -> list[dict]:
    """Two rounds; ``eps[r][i]``: ε of site i after round r (None: the site sat that round out)."""
    history = []
    for r in range(2):
        by_site = {}
        for i in range(len(SITES)):
            metrics = {"loss": 1.0, "steps": 2.0}
            if eps is not None:
                if eps[r][i] is None:
                    continue
                metrics.update({"dp-epsilon": eps[r][i], "dp-delta": 0.001,
                                "dp-noise-multiplier": 0.8, "dp-steps": 2.0 * (r + 1)})
            by_site[str(i)] = metrics
        history.append({"round": r + 1, "train_by_site": by_site,
                        "val": {"dice_mean": 0.3 + 0.2 * r}})
    return history


def _write_comparison(root: Path, rng: np.random.Generator, seeds: tuple[int, ...] = (0, 1)
                      ) -> Path:
    """A comparison ``cmp`` of modes ``plain`` (no DP) and ``eps3`` on ``seeds``, three test
    cases per site, with its run folders beside it."""
    rows = [_row(m, s, site, c, *rng.uniform(0.2, 0.9, 3))
            for m in ("plain", "eps3") for s in seeds for site in SITES for c in range(3)]
    summary = {"name": "cmp", "modes": ["plain", "eps3"], "seeds": list(seeds), "sites": SITES,
               "provenance": {"command": "python -m simulations.compare run_name=cmp",
                              "date": "2026-01-01 00:00 UTC", "code_version": "abc"}}
    folder = root / "cmp"
    folder.mkdir(parents=True)
    (folder / "comparison.json").write_text(json.dumps({"rows": rows, "summary": summary}))
    for mode, eps in (("plain", None), ("eps3", [[1.5, 1.4], [2.9, None]])):
        for seed in seeds:
            run = root / f"cmp-{mode}-seed{seed}"
            run.mkdir()
            (run / "history.json").write_text(json.dumps(_history(eps)))
            (run / "summary.json").write_text(json.dumps({
                "site_names": SITES, "seconds": 10.0 + seed,
                "train_steps": {s: {"per_round": 2.0, "total": 4.0, "rounds": 2} for s in SITES}}))
    return folder / "comparison.json"


def test_collect_reads_dice_from_the_rows_and_epsilon_from_each_sites_last_round(tmp_path):
    rng = np.random.default_rng(0)
    comparison = _write_comparison(tmp_path, rng)
    payload = pc.collect([comparison], None, ["plain"])
    rows = json.loads(comparison.read_text())["rows"]
    point = next(p for p in payload["points"] if p["mode"] == "eps3" and p["seed"] == 1)
    mine = [r for r in rows if r["mode"] == "eps3" and r["seed"] == 1]
    expected = np.mean([(r["dice_wt"] + r["dice_tc"] + r["dice_et"]) / 3 for r in mine])
    assert point["test_dice_mean"] == pytest.approx(expected)
    # site0 trained both rounds (its ε after round 2); site1 sat round 2 out (its round-1 ε)
    assert point["dp"]["site0"]["epsilon"] == 2.9
    assert point["dp"]["site1"]["epsilon"] == 1.4
    assert point["dp"]["site1"]["dp_steps"] == 2.0
    plain = next(p for p in payload["points"] if p["mode"] == "plain" and p["seed"] == 0)
    assert plain["dp"] == {} and plain["steps"] == {"site0": 4.0, "site1": 4.0}
    assert payload["sources"][0]["provenance"]["code_version"] == "abc"


def test_report_table_shares_and_plot(tmp_path, capsys):
    comparison = _write_comparison(tmp_path, np.random.default_rng(1))
    out = tmp_path / "curve.json"
    assert pc.main(["--collect", str(comparison), "--reference", "plain", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    capsys.readouterr()
    assert pc.main(["--report", str(out), "--png", str(tmp_path / "curve.png")]) == 0
    page = capsys.readouterr().out
    assert (tmp_path / "curve.png").stat().st_size > 1000
    by_mode = {m: [p["test_dice_mean"] for p in payload["points"] if p["mode"] == m]
               for m in ("plain", "eps3")}
    share = 100 * np.mean(by_mode["eps3"]) / np.mean(by_mode["plain"])
    line = next(x for x in page.splitlines() if x.startswith("| eps3 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # mode, seeds, ε spent (largest site over seeds), σ, DP steps, steps, val round 1 → last,
    # Dice, % of plain, s
    assert cells[2] == "2.90" and cells[3] == "0.800" and cells[4] == "4"
    assert cells[6] == "0.300 → 0.500"
    assert cells[7] == f"{np.mean(by_mode['eps3']):.3f} ± {np.std(by_mode['eps3'], ddof=1):.3f}"
    assert cells[8] == f"{share:.1f} %"
    assert cells[9] == "10"  # the median of 10 s and 11 s, rounded
    assert "`python -m simulations.compare run_name=cmp`" in page


def test_a_missing_run_folder_or_reference_fails_in_one_line(tmp_path, capsys):
    comparison = _write_comparison(tmp_path, np.random.default_rng(2))
    assert pc.main(["--collect", str(comparison), "--reference", "fedx"]) == 2
    err = capsys.readouterr().err
    assert "--reference fedx" in err and err.count("\n") == 1
    assert pc.main(["--collect", str(comparison), "--runs", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err
    assert "elsewhere/cmp-plain-seed0/summary.json" in err and err.count("\n") == 1
    assert not (comparison.parent / "privacy_curve.json").exists()


def test_an_earlier_curve_joins_new_comparisons_with_its_points_and_sources_kept(tmp_path):
    first = _write_comparison(tmp_path / "a", np.random.default_rng(3))
    earlier = pc.collect([first], None, ["plain"])
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    for run in (tmp_path / "a").glob("cmp-*"):  # the earlier runs' folders are gone
        for f in run.iterdir():
            f.unlink()
        run.rmdir()
    second = _write_comparison(tmp_path / "b", np.random.default_rng(4), seeds=(2, 3))
    joined = pc.collect([tmp_path / "earlier.json", second], None, ["plain"])
    assert joined["points"][:len(earlier["points"])] == earlier["points"]
    assert len(joined["points"]) == 2 * len(earlier["points"])
    assert [s["path"] for s in joined["sources"]] == [str(first), str(second)]
    # the same mode from both files: four seeds' points in one row of the table
    assert {r["mode"]: r["seeds"] for r in pc.curve_table(joined)} == {"plain": 4, "eps3": 4}
    # a mode and seed collected twice would count twice: refused, naming both files
    with pytest.raises(ValueError, match=r"mode 'plain', seed 0 comes from both .*earlier.json"):
        pc.collect([tmp_path / "earlier.json", tmp_path / "earlier.json"], None, ["plain"])
