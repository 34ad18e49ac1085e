"""The goals of a comparison read their criteria from a file (``--criteria FILE``; the default
``simulations/compare/criteria/default.yaml`` gives today's goals), and a bad file stops in one
line naming the file and the key; on hand-made rows."""

from __future__ import annotations

import json

import pytest

from simulations.compare import load_criteria, main, merge_comparisons, summarise, write_report
from simulations.compare.goals import DEFAULT_CRITERIA, DEFAULT_CRITERIA_FILE

SITES = ["site0", "site1", "site2", "site3"]
#: mean Dice per mode (site k adds 0.01 k; the default beats fedavg by 0.055 everywhere)
DICE = {"pooled": 0.80, "local": 0.76, "fedavg": 0.73, "personal-norm-ft": 0.785}
SEEDS = [0, 1]
NEW_SITE = {"site": "site4", "models": ["r/federation.ckpt"], "train_cases": 11,
            "test_cases": 15, "epochs": 20, "rows": [],
            "by_k": {str(k): {"test": {"mean_a": 0.7, "mean_b": 0.6, "mean_diff": 0.1,
                                       "median_diff": 0.1, "p": 0.01, "n": 30},
                              "seconds": [1.0], "frozen_unchanged": True} for k in (2, 5)}}


def _rows(seeds=SEEDS) -> list[dict]:
    return [{"mode": mode, "seed": seed, "site": site, "case": f"{site}-{c}",
             "dice_wt": d + 0.01 * s + 0.01 * c + 0.01 * seed, "dice_tc": d + 0.01 * s,
             "dice_et": d + 0.01 * s, "hd95_wt": 2.0, "hd95_tc": 2.0, "hd95_et": 2.0}
            for mode, d in DICE.items() for seed in seeds for s, site in enumerate(SITES)
            for c in range(6)]


def _summary(criteria=None, new_site=NEW_SITE, seeds=SEEDS) -> dict:
    modes = list(DICE)
    return summarise(
        name="crit", default="personal-norm-ft", modes=modes, seeds=seeds, sites=SITES,
        overrides=[], test_cases={str(s): {x: 6 for x in SITES} for s in seeds},
        budget={"rounds": 2, "local_epochs": 1}, rows=_rows(seeds), cross_rows={},
        new_site=new_site,
        seconds={m: {str(s): {"run": 1.0, "scoring": 0.5} for s in seeds} for m in modes},
        bytes_by_mode={m: [0.0] * len(seeds) for m in modes},
        check={m: {str(s): 0.0 for s in seeds} for m in modes}, convergence=[],
        criteria=criteria)


def test_the_default_file_gives_todays_goals() -> None:
    assert DEFAULT_CRITERIA_FILE.is_file() and load_criteria(None) == DEFAULT_CRITERIA
    assert DEFAULT_CRITERIA == {"fedavg_sites": [2, 3], "fedavg_p": 0.05, "pooled_share": 0.97,
                                "pooled_share_stretch": 0.99, "new_site_k": 5}
    goals = [(g["goal"], g["met"]) for g in _summary()["goals"]]
    assert goals == [
        ("personal-norm-ft >= local on every site (mean over seeds)", True),
        ("personal-norm-ft > fedavg on site2 and site3 with p < 0.05 (paired, cases of the "
         "seeds both ran)", True),
        ("personal-norm-ft mean Dice >= 97 % of pooled (stretch 99 %)", True),
        ("new site: fine-tuned expert > shared model alone at k = 5", True)]
    unmeasured = [g["goal"] for g in summarise(
        name="x", default="personal-norm-ft", modes=["personal-norm-ft"], seeds=SEEDS,
        sites=SITES, overrides=[], test_cases={}, budget={"rounds": 2, "local_epochs": 1},
        rows=[r for r in _rows() if r["mode"] == "personal-norm-ft"], cross_rows={},
        new_site=None, seconds={}, bytes_by_mode={}, check={}, convergence=[])["goals"]]
    assert unmeasured == ["default >= local on every site",
                          "default > fedavg on sites 2 and 3 with p < 0.05",
                          "default mean Dice >= 97 % of pooled",
                          "new site: fine-tuned expert > shared model alone at k = 5"]


def test_a_criteria_file_sets_the_thresholds(tmp_path) -> None:
    path = tmp_path / "strict.yaml"
    path.write_text("pooled_share: 0.999\nfedavg_sites: [1]\nfedavg_p: 1.0e-9\n"
                    "new_site_k: 2\n")
    criteria = load_criteria(path)
    assert criteria["pooled_share_stretch"] == 0.99  # the default's where the file is silent
    goals = {g["goal"]: g for g in _summary(criteria)["goals"]}
    pooled = goals["personal-norm-ft mean Dice >= 99.9 % of pooled (stretch 99 %)"]
    assert pooled["met"] is False and "(stretch met)" not in pooled["detail"]
    fedavg = goals["personal-norm-ft > fedavg on site1 with p < 1e-09 (paired, cases of the "
                   "seeds both ran)"]
    assert fedavg["met"] is False and fedavg["detail"].startswith("site1 diff +0.055")
    assert goals["new site: fine-tuned expert > shared model alone at k = 2"]["met"] is True
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps({"new_site_k": "all"}))
    missing = _summary(load_criteria(as_json))["goals"][-1]
    assert missing["met"] is None and missing["detail"] == "not run (--new-site-cases without all)"


@pytest.mark.parametrize("text, key", [
    ('{"pooled_shar": 0.9}', r"unknown key\(s\) \['pooled_shar'\]"),
    ('{"pooled_share": "most"}', "pooled_share must be a number >= 0, got 'most'"),
    ('{"fedavg_sites": [2, -1]}', r"fedavg_sites must be a list of site positions"),
    ('{"new_site_k": 0}', "new_site_k must be an integer >= 1 or 'all', got 0"),
    ("[1, 2]", "expected a mapping of"),
    ("{oops", "not valid json"),
])
def test_a_bad_criteria_file_fails_in_one_line_naming_file_and_key(tmp_path, text, key) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(ValueError, match=f"--criteria .*bad.json: {key}"):
        load_criteria(bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["--criteria", str(bad), f"root={tmp_path}"])
    message = str(exit_info.value.code)
    assert message.startswith(f"simulations.compare: error: --criteria {bad}: ")
    assert "\n" not in message
    assert not (tmp_path / "runs").exists()  # before any training


@pytest.mark.slow  # writes and merges whole reports with their plots (about 10 s)
def test_merge_reads_the_criteria_too(tmp_path) -> None:
    paths = []
    for seed in SEEDS:
        summary = _summary(new_site=None, seeds=[seed])
        path, _ = write_report(tmp_path / f"s{seed}", summary, _rows([seed]), {},
                               summary.pop("_new_site_rows"))
        paths.append(str(path))
    strict = tmp_path / "strict.yaml"
    strict.write_text("pooled_share: 0.999\n")
    merged = merge_comparisons(paths, tmp_path / "m", "m", criteria=load_criteria(strict))
    goals = [g["goal"] for g in json.loads(merged.read_text())["summary"]["goals"]]
    assert "personal-norm-ft mean Dice >= 99.9 % of pooled (stretch 99 %)" in goals
    bad = tmp_path / "bad.yaml"
    bad.write_text("pooled_share: -1\n")
    with pytest.raises(SystemExit, match=r"--criteria .*bad.yaml: pooled_share must be"):
        main(["--merge", ",".join(paths), "--criteria", str(bad), f"root={tmp_path}"])
