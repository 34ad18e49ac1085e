"""``python -m simulations.new_site``: one model, or several pooled with one seed each."""

from __future__ import annotations

import json

import pytest

from simulations import new_site


def _fake_result(overrides, model, cases, epochs, label=None, expert_init="fresh"):
    seed = int(label["seed"]) if label else 0
    rows = [{**(label or {}), "site": "site4", "k": 5, "model": m, "case": f"c{c}",
             "dice_wt": v, "dice_tc": v, "dice_et": v}
            for c in range(4) for m, v in (("shared", 0.5), ("fine-tuned", 0.6 + 0.01 * seed))]
    return {"site": "site4", "model": model, "overrides": list(overrides), "rows": rows,
            "by_k": {"5": {}}, "train_cases": 11, "test_cases": 4, "epochs": epochs}


def test_several_models_are_pooled_with_one_seed_each(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(new_site, "evaluate_new_site", _fake_result)
    out = tmp_path / "ns.json"
    assert new_site.main(["--model", "a,b", "fl.rounds=60", "--seeds", "0,1",
                          "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["overrides"] for r in results] == [["fl.rounds=60", "seed=0"],
                                                 ["fl.rounds=60", "seed=1"]]
    table = capsys.readouterr().out
    # 8 pairs (4 cases x 2 seeds, told apart by the seed label): mean 0.605 vs 0.5
    assert "| 5 | 0.500 | 0.605 | +0.105 |" in table and "| 8 |" in table


@pytest.mark.parametrize("argv, message", [
    (["--model", "a,b"], "several --model need --seeds"),
    (["--model", "a,b", "--seeds", "0"], "--seeds gives 1 seed"),
])
def test_models_and_seeds_must_pair(monkeypatch, argv, message):
    monkeypatch.setattr(new_site, "evaluate_new_site", _fake_result)
    with pytest.raises(SystemExit, match=message):
        new_site.main(argv)
