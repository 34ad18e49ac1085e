"""simulations.finetune_runs: a finished comparison's fedavg runs fine-tuned offline (whole
model, best epoch by validation) and compared as the mode ``fedavg+ft-all``, on a 2-site,
1-round, 16^3 comparison of local and fedavg."""

from __future__ import annotations

import json

import pytest
import torch
from engine_fixtures import TINY_OVERRIDES

from m4fuse.run import provision, settings

TINY = [*TINY_OVERRIDES, "fl.rounds=1", "fl.local_epochs=1", "tracking.enabled=false",
        "fl.strategy=personal", "run_name=cmp"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    from simulations.compare import main

    root = tmp_path_factory.mktemp("ftruns")
    assert main(["--seeds", "0", "--modes", "local,fedavg", "--new-site-cases", "none",
                 f"root={root}", *TINY]) == 0
    return root, root / "runs" / "cmp" / "comparison.json"


@pytest.mark.slow
def test_fedavg_plus_whole_model_finetuning_is_a_new_default_mode(compared, monkeypatch,
                                                                     capsys):
    from m4fuse.personal import finetune
    from simulations import finetune_runs
    from simulations.compare import site_models

    root, path = compared
    seen: list[dict] = []
    real = finetune.finetune_best_epoch

    def spy(model, train, val, expert, cfg, device, personal, epochs, seed):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = real(model, train, val, expert, cfg, device, personal, epochs, seed)
        seen.append({"before": before, "after": model.state_dict(), "personal": personal,
                     "epochs": epochs, "seed": seed, "train": [r.case_id for r in train],
                     "val": [r.case_id for r in val], "out": out})
        return out

    monkeypatch.setattr(finetune, "finetune_best_epoch", spy)
    assert finetune_runs.main(["--comparison", str(path), "--mode", "fedavg", "--set", "all",
                               "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "fedavg seed 0 site0: kept epoch" in printed and "validation Dice" in printed

    out = root / "runs" / "cmp+ft-all"
    data = json.loads((out / "comparison.json").read_text())
    old = json.loads(path.read_text())
    summary = data["summary"]
    assert summary["modes"] == ["local", "fedavg", "fedavg+ft-all"]
    assert summary["default_strategy"] == "fedavg+ft-all"
    assert {(t["a"], t["b"]) for t in summary["tests"]} == {("fedavg+ft-all", "fedavg"),
                                                            ("fedavg+ft-all", "local")}
    assert any("fedavg+ft-all >= local on every site" in g["goal"] for g in summary["goals"])
    # the original rows and cross-site results are kept as they were
    assert [r for r in data["rows"] if r["mode"] != "fedavg+ft-all"] == old["rows"]
    assert data["crosssite_rows"] == old["crosssite_rows"]
    assert summary["crosssite"] == old["summary"]["crosssite"]

    # each site: the run's final fedavg model, its own train/val split, the ClientApp's seed
    cfg = settings.compose("config", [f"root={root}", *TINY, "fl.strategy=fedavg", "seed=0"])
    split = provision.load_sites(cfg)
    names = provision.site_names(split)
    run_dir = root / "runs" / "cmp-fedavg-seed0"
    built = site_models("fedavg", cfg, run_dir, names)
    assert len(seen) == 2
    for index, (site, call) in enumerate(zip(names, seen)):
        assert call["personal"] == "all" and call["epochs"] == 2
        assert call["seed"] == finetune.finetune_seed(0, index) == index * 100 + 99
        assert call["train"] == [r.case_id for r in split[site]["train"]]
        assert call["val"] == [r.case_id for r in split[site]["val"]]
        start = built[site][0].state_dict()
        assert all(torch.equal(start[k], v) for k, v in call["before"].items())
        m = summary["finetune"]["by_seed"]["0"][site]
        assert m == call["out"]
        if m["finetune-kept"]:  # the whole model moved, not only the norms/experts
            assert any(not torch.equal(call["before"][k], call["after"][k])
                       for k in call["before"] if k.endswith("conv1.weight"))
        rows = [r for r in data["rows"] if r["mode"] == "fedavg+ft-all" and r["site"] == site]
        assert sorted(r["case"] for r in rows) == sorted(r.case_id for r in split[site]["test"])
    text = (out / "comparison.md").read_text()
    assert "| fedavg+ft-all | fedavg | all |" in text and "Offline fine-tuning" in text


@pytest.mark.slow
def test_bad_input_fails_naming_the_file_or_key(compared, tmp_path):
    from simulations.finetune_runs import main

    _, path = compared
    with pytest.raises(SystemExit, match="no comparison file at .*nope.json"):
        main(["--comparison", str(tmp_path / "nope.json"), "--mode", "fedavg"])
    with pytest.raises(SystemExit, match=r"--mode 'personal' is not among summary.modes"):
        main(["--comparison", str(path), "--mode", "personal"])
    with pytest.raises(SystemExit, match=r"--set must be one of .*got 'bogus'"):
        main(["--comparison", str(path), "--mode", "fedavg", "--set", "bogus"])
    data = json.loads(path.read_text())
    data["summary"]["name"] = "gone"
    moved = tmp_path / "comparison.json"
    moved.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="run folder of fedavg seed 0 missing: .*gone-fedavg-seed0"):
        main(["--comparison", str(moved), "--mode", "fedavg"])
    del data["summary"]["sites"]
    moved.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="has no summary.sites"):
        main(["--comparison", str(moved), "--mode", "fedavg"])
