"""The learning-curve script: its nested training sets, its step budget, its report, and one
tiny run end to end."""

from __future__ import annotations

import json

import pytest

from simulations import learning_curve as lc


def test_parse_cases():
    assert lc.parse_cases("10,1,3,3") == [1, 3, 10]
    for bad in ("0,1", "a", ""):
        with pytest.raises(ValueError, match="--cases"):
            lc.parse_cases(bad)


def test_nested_subsets_fixed_validation():
    pool = [f"c{i}" for i in range(12)]
    val, train = lc.nested_subsets(pool, [1, 3, 10], 2, seed=4)
    assert len(val) == 2 and [len(train[n]) for n in (1, 3, 10)] == [1, 3, 10]
    assert train[1] == train[3][:1] and train[3] == train[10][:3]  # nested
    assert not set(val) & set(train[10]) and set(val) | set(train[10]) == set(pool)
    assert lc.nested_subsets(pool, [1, 3, 10], 2, seed=4) == (val, train)
    assert lc.nested_subsets(pool, [1, 3, 10], 2, seed=5) != (val, train)
    with pytest.raises(ValueError, match="fewer than"):
        lc.nested_subsets(pool, [11], 2, seed=0)


def test_epochs_for_steps():
    # 3 cases at batch 2 -> 2 steps per epoch; 100 steps over 5 rounds -> 10 epochs per round
    assert lc.epochs_for_steps(100, 3, 2, 5) == 10
    assert lc.epochs_for_steps(10, 100, 2, 5) == 1  # at least one epoch
    assert lc.epochs_for_steps(7, 1, 1, 2) == 4  # ceil(7 / 2)


def _payload():
    def point(n, seed, mean):
        return {"cases": n, "seed": seed, "steps": 10 * n, "seconds": 1.0,
                "test": {"dice_mean": mean, "dice_wt": mean, "dice_tc": None, "dice_et": mean}}
    return {"command": "python -m simulations.learning_curve --cases 1,10", "date": "2026-01-01 00:00 UTC",
            "code_version": "abc1234", "test_cases": 30, "val_cases": 5,
            "points": [point(1, 0, 0.2), point(1, 1, 0.4), point(10, 0, 0.8), point(10, 1, 0.8)]}


def test_report_table_and_plot(tmp_path):
    text = lc.report_markdown(_payload())
    # hand-worked: N=1 mean (0.2 + 0.4) / 2 = 0.3, population sd 0.1; N=10: 0.8 +- 0
    assert "| 1 | 2 | 10 | 0.300 ± 0.100 | 0.300 ± 0.100 | - | 0.300 ± 0.100 |" in text
    assert "| 10 | 2 | 100 | 0.800 ± 0.000 |" in text
    assert "abc1234" in text and "--cases 1,10" in text and "2026-01-01" in text
    assert "0.38 of the largest set's" in text and "ratio of 0.45" in text  # 0.3 / 0.8; 0.39 / 0.87
    assert "](" not in text  # no plot link unless asked
    assert "![test Dice against training cases](lc/curve.png)" in lc.report_markdown(_payload(), "lc/curve.png")
    png = lc.plot_curve(_payload(), tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_curve_end_to_end(tmp_path, capsys):
    out = tmp_path / "lc.json"
    argv = ["--cases", "1,2", "--test-cases", "2", "--val-cases", "1", "--steps", "2",
            "--out", str(out), f"root={tmp_path}", "fl.rounds=1", "data.shape=[16,16,16]",
            "data.size=[16,16,16]", "data.workers=0", "tracking.enabled=false"]
    assert lc.main(argv) == 0
    payload = json.loads(out.read_text())
    assert [p["cases"] for p in payload["points"]] == [1, 2]
    first, second = (p["train_cases"] for p in payload["points"])
    assert second[:1] == first  # nested
    assert all(0.0 <= p["test"]["dice_mean"] <= 1.0 for p in payload["points"])
    assert lc.main(["--report", str(out)]) == 0
    page = capsys.readouterr().out
    assert "| 2 | 1 |" in page and out.with_suffix(".png").is_file()
    assert f"]({tmp_path.name}/lc.png)" in page  # the page links the plot beside its JSON
    assert lc.main(["--cases", "0"]) == 2


def test_join_curves_of_other_seeds(tmp_path, capsys):
    seed0, seed1 = _payload(), _payload()
    seed0["points"] = [p for p in seed0["points"] if p["seed"] == 0]
    seed1["points"] = [p for p in seed1["points"] if p["seed"] == 1]
    seed1["command"], seed1["code_version"] = "python -m simulations.learning_curve --seeds 1", "def5678"
    files = []
    for name, payload in (("s0.json", seed0), ("s1.json", seed1)):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(payload))
    out = tmp_path / "joined.json"
    assert lc.main(["--join", ",".join(map(str, files)), "--out", str(out)]) == 0
    joined = json.loads(out.read_text())
    assert joined["seeds"] == [0, 1] and len(joined["points"]) == 4
    assert [s["code_version"] for s in joined["sources"]] == ["abc1234", "def5678"]
    capsys.readouterr()
    assert lc.main(["--report", str(out)]) == 0
    page = capsys.readouterr().out
    # the same table as one run of both seeds, and each source's command and code named
    assert "| 1 | 2 | 10 | 0.300 ± 0.100 |" in page
    assert "Seeds [1]: `python -m simulations.learning_curve --seeds 1`" in page and "def5678" in page
    assert "Joined by `python -m simulations.learning_curve --join" in page
    # a joined curve joins again, its sources kept, not nested
    again = lc.join_curves([("j", joined), ("s2", {**seed0, "points": [
        {**p, "seed": 2} for p in seed0["points"]]})])
    assert again["seeds"] == [0, 1, 2] and len(again["sources"]) == 3
    # refusals, one line each, before anything is written
    assert lc.main(["--join", f"{files[0]},{files[0]}", "--out", str(tmp_path / "x.json")]) == 2
    assert "N=1 seed 0 is in both" in capsys.readouterr().err
    other = tmp_path / "steps.json"
    other.write_text(json.dumps({**seed1, "steps": 500}))
    assert lc.main(["--join", f"{files[0]},{other}", "--out", str(tmp_path / "x.json")]) == 2
    assert "steps=500" in capsys.readouterr().err
    assert lc.main(["--join", f"{files[0]},{files[1]}", "--out", str(files[0])]) == 2
    assert lc.main(["--join", f"{files[0]},{files[1]}"]) == 2
    (tmp_path / "bad.json").write_text("{")
    assert lc.main(["--join", f"{files[0]},{tmp_path / 'bad.json'}", "--out", str(out)]) == 2
    assert "bad.json is not JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
