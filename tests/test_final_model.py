"""The final model of a federated run (m4fuse.io.checkpoint version 2): each site's own layers
(norms ...) and expert beside the shared weights, assembled from the sites' state folders;
version 1 files still load; ``m4fuse segment --site`` uses a site's layers."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from m4fuse.cli.main import main
from m4fuse.data.fake import write_spaced_case
from m4fuse.io.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    save_checkpoint,
    save_final_model,
)
from m4fuse.nets.model import M4Fuse, M4FuseConfig
from m4fuse.personal.sets import expert_state, split_state
from m4fuse.personal.site_store import SiteState, SiteStateStore

SIZE = (16, 16, 16)
CONFIG = M4FuseConfig(widths=(8, 8, 8, 8, 8, 8), num_experts=1, d_state=2)


def _site_model(seed: int, base: M4Fuse) -> M4Fuse:
    """``base`` with its norms and expert moved by a seed-dependent amount (a site's own)."""
    model = M4Fuse(CONFIG)
    model.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(seed)
    mine = set(split_state(dict(model.named_parameters()), "norms")[1])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in mine:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, M4Fuse]:
    torch.manual_seed(0)
    base = M4Fuse(CONFIG).eval()
    return {"init": base, "siteA": _site_model(1, base), "siteB": _site_model(2, base)}


def _parts(model: M4Fuse) -> tuple[dict, dict, dict]:
    """(shared weights, own non-expert layers, index-free expert) under ``norms``."""
    state = model.state_dict()
    shared, mine = split_state(state, "norms")
    layers, expert = split_state(mine)
    return shared, layers, expert_state(expert, 0)


def _write_v2(path: Path, models: dict[str, M4Fuse]) -> Path:
    shared, init_layers, _ = _parts(models["init"])
    experts, site_layers = {}, {}
    for site in ("siteA", "siteB"):
        _, site_layers[site], experts[site] = _parts(models[site])
    return save_checkpoint(path, CONFIG, {**shared, **init_layers}, experts, SIZE,
                           {"strategy": "personal-norm"}, site_layers)


def test_version2_gives_each_site_its_layers_and_expert(tmp_path, models):
    ckpt = load_checkpoint(_write_v2(tmp_path / "model.ckpt", models))
    assert ckpt.sites == ["siteA", "siteB"]
    x = torch.randn(1, 4, *SIZE)
    with torch.no_grad():
        outs = {}
        for site in ("siteA", "siteB"):
            net, expert = build_model(ckpt, site)
            assert expert == 0
            outs[site] = net(x, torch.tensor([0]))
            assert torch.allclose(outs[site], models[site](x, torch.tensor([0])), atol=1e-5)
        assert not torch.allclose(outs["siteA"], outs["siteB"], atol=1e-3)
        shared_net, expert = build_model(ckpt, "siteZ")  # neither layers nor expert
        assert expert is None
        assert torch.allclose(shared_net(x, None), models["init"](x, None), atol=1e-5)


def test_version1_files_still_load(tmp_path, models):
    path = _write_v2(tmp_path / "v2.ckpt", models)
    payload = torch.load(path, weights_only=True)
    assert payload["version"] == 2
    payload["version"] = 1
    del payload["site_layers"]
    old = tmp_path / "v1.ckpt"
    torch.save(payload, old)
    ckpt = load_checkpoint(old)
    assert ckpt.site_layers == {} and ckpt.sites == ["siteA", "siteB"]
    net, expert = build_model(ckpt, "siteA")
    assert expert == 0
    shared, _, _ = _parts(models["init"])
    assert all(torch.equal(net.state_dict()[k], v) for k, v in shared.items())


def test_bad_versions_and_site_layers_are_refused_naming_the_file(tmp_path, models):
    payload = torch.load(_write_v2(tmp_path / "good.ckpt", models), weights_only=True)
    key = next(iter(payload["site_layers"]["siteA"]))

    def refused(name: str, match: str, **change) -> None:
        bad = {**payload, **change}
        for k in [k for k, v in change.items() if v is None]:
            del bad[k]
        torch.save(bad, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}.*{match}"):
            load_checkpoint(tmp_path / name)

    refused("v3.ckpt", "version 3 not supported", version=3)
    refused("vtext.ckpt", "version '2' not supported", version="2")
    refused("nolayers.ckpt", r"lacks \['site_layers'\]", site_layers=None)
    refused("listlayers.ckpt", "'site_layers' must map", site_layers=[1])
    refused("unknown.ckpt", "'nope'.* is not a shared weight",
            site_layers={"siteA": {"nope": torch.zeros(1)}})
    refused("shape.ckpt", f"{re.escape(key)}.*has shape",
            site_layers={"siteA": {key: torch.zeros(99)}})
    with pytest.raises(ValueError, match="not a shared weight"):
        save_checkpoint(tmp_path / "x.ckpt", CONFIG, payload["shared"],
                        site_layers={"siteA": {"nope": torch.zeros(1)}})
    assert not (tmp_path / "x.ckpt").exists()


def _save_site(root: Path, site: str, model: M4Fuse, personal: str = "norms",
               rnd: int = 3, cases: int | None = None) -> Path:
    _, mine = split_state(model.state_dict(), personal)
    layers, expert = split_state(mine)
    folder = root / site
    SiteStateStore(folder, site).save(SiteState(
        site=site, round=rnd, fingerprint="test", expert=expert_state(expert, 0),
        shared=layers or None,
        metrics={} if cases is None else {"num-examples": float(cases)}))
    return folder


def test_final_model_takes_each_sites_folder(tmp_path, models):
    held, _ = split_state(models["init"].state_dict(), "norms")  # what the server holds
    initial = models["init"].state_dict()
    folders = {"siteA": _save_site(tmp_path / "clients", "siteA", models["siteA"], cases=4),
               "siteB": _save_site(tmp_path / "clients", "siteB", models["siteB"]),
               "siteC": tmp_path / "clients" / "siteC"}  # no state (a site that never trained)
    path = save_final_model(tmp_path / "model.ckpt", CONFIG, "personal-norm-ft", held,
                            initial, folders, size=SIZE)
    ckpt = load_checkpoint(path)
    assert ckpt.sites == ["siteA", "siteB"]
    # training cases where the state records them (the new-site mean weighs sites by them)
    assert ckpt.metadata == {"strategy": "personal-norm-ft", "sites": ["siteA", "siteB", "siteC"],
                             "site_rounds": {"siteA": 3, "siteB": 3}, "site_cases": {"siteA": 4}}
    for site in ("siteA", "siteB"):
        net, _ = build_model(ckpt, site)
        assert all(torch.equal(net.state_dict()[k], v)
                   for k, v in models[site].state_dict().items())
    net, expert = build_model(ckpt, "siteC")  # the initial norms, no expert
    assert expert is None
    assert all(torch.equal(net.state_dict()[k], initial[k]) for k in split_state(initial)[0])
    # local: no shared model, no file
    assert save_final_model(tmp_path / "local.ckpt", CONFIG, "local", {}, initial, folders) is None
    assert not (tmp_path / "local.ckpt").exists()
    # fedavg-ft: every site has the averaged expert, unless it kept a fine-tuned one
    whole = models["init"].state_dict()
    ckpt = load_checkpoint(save_final_model(tmp_path / "fa.ckpt", CONFIG, "fedavg-ft", whole,
                                            initial, folders))
    assert sorted(ckpt.experts) == ["siteA", "siteB", "siteC"]
    assert set(ckpt.site_layers) == {"siteA", "siteB"}
    own = _parts(models["siteA"])[2]
    assert all(torch.equal(ckpt.experts["siteA"][k], v) for k, v in own.items())
    assert all(torch.equal(ckpt.experts["siteC"][k], v)
               for k, v in _parts(models["init"])[2].items())
    # a folder holding another site's state is refused
    with pytest.raises(ValueError, match="holds site 'siteA', not 'siteB'"):
        save_final_model(tmp_path / "x.ckpt", CONFIG, "personal-norm", held, initial,
                         {"siteB": folders["siteA"]})


def test_segment_site_of_a_version2_checkpoint(tmp_path, models):
    path = _write_v2(tmp_path / "run" / "model.ckpt", models)
    folder, labels, affine = write_spaced_case(tmp_path / "in", spacing=(1.0, 1.2, 2.0))
    outs = {}
    for site in ("siteA", "siteB"):
        out = tmp_path / f"{site}.nii.gz"
        assert main(["segment", str(folder), "--model", str(path.parent), "--site", site,
                     "--out", str(out), "--device", "cpu"]) == 0
        img = nib.load(out)
        outs[site] = np.asarray(img.dataobj)
        assert outs[site].shape == labels.shape and np.allclose(img.affine, affine)
        assert set(np.unique(outs[site]).tolist()) <= {0, 1, 2, 4}


def test_site_join_keeps_every_sites_layers_and_adds_its_own(tmp_path, models):
    """``m4fuse site join`` on a personal-norm checkpoint: the shared weights and the other
    sites' experts and layers are kept; the new site's trained norms are its site_layers."""
    from flower_fixtures import TINY_FL

    from m4fuse.personal.new_site import join_site
    from m4fuse.run import provision, settings

    cfg = settings.compose("config", [f"root={tmp_path / 'root'}", *TINY_FL,
                                        "tracking.enabled=false"])
    split = provision.load_sites(cfg)
    records = split[provision.site_names(split)[0]]
    before = load_checkpoint(_write_v2(tmp_path / "model.ckpt", models))
    result = join_site(before, records["train"], records["test"], "siteN", cfg, cases=1,
                       epochs=1, out=tmp_path / "joined.ckpt")
    after = load_checkpoint(result.checkpoint)
    assert after.sites == ["siteA", "siteB", "siteN"]
    assert all(torch.equal(before.shared[k], v) for k, v in after.shared.items())
    for site in ("siteA", "siteB"):
        assert all(torch.equal(before.site_layers[site][k], v)
                   for k, v in after.site_layers[site].items())
        assert all(torch.equal(before.experts[site][k], v) for k, v in after.experts[site].items())
    own = after.site_layers["siteN"]
    assert set(own) == set(before.site_layers["siteA"])  # the norms, trained
    assert any(not torch.equal(own[k], before.shared[k]) for k in own)
    with pytest.raises(ValueError, match="'siteA' already has"):
        join_site(after, records["train"], records["test"], "siteA", cfg, cases=1, epochs=1)


def test_assemble_command_adds_the_sites_folders_to_the_servers_part(tmp_path, models, capsys):
    """What the ServerApp writes (``shared.ckpt``: the server's weights only) plus ``m4fuse
    model assemble`` gives the model the one-call path gives; a hospital names its own folder."""
    from m4fuse.io.assembly import assemble_run
    from m4fuse.io.checkpoint import save_server_model

    held, _ = split_state(models["init"].state_dict(), "norms")
    initial = models["init"].state_dict()
    run = tmp_path / "runs" / "r"
    folders = {"siteA": _save_site(run / "clients", "siteA", models["siteA"], cases=4),
               "siteB": _save_site(run / "clients", "siteB", models["siteB"])}
    server = save_server_model(run / "shared.ckpt", CONFIG, "personal-norm-ft", held, initial,
                               ["siteA", "siteB", "siteC"], size=SIZE)
    alone = load_checkpoint(server)
    assert alone.sites == [] and alone.metadata["sites"] == ["siteA", "siteB", "siteC"]
    assert main(["model", "assemble", str(run)]) == 0
    assert "2 site(s) (siteA, siteB)" in capsys.readouterr().out
    assembled = load_checkpoint(run)
    # written out by hand: the server's strategy and site list, and from the two folders the
    # round of each kept state (3) and the training cases where recorded (siteA's 4)
    assert assembled.metadata == {"strategy": "personal-norm-ft",
                                  "sites": ["siteA", "siteB", "siteC"],
                                  "site_rounds": {"siteA": 3, "siteB": 3},
                                  "site_cases": {"siteA": 4}}
    for site in ("siteA", "siteB"):
        got = build_model(assembled, site)[0].state_dict()
        assert all(torch.equal(got[k], v) for k, v in models[site].state_dict().items())
    got, expert = build_model(assembled, "siteC")  # never trained: the initial norms, no expert
    assert expert is None
    assert all(torch.equal(got.state_dict()[k], initial[k]) for k in split_state(initial)[0])
    # a hospital of a deployment: the server's file and its own folder only
    mine = tmp_path / "siteB.ckpt"
    assert main(["model", "assemble", str(run), "--site", f"siteB={folders['siteB']}",
                 "--out", str(mine)]) == 0
    assert load_checkpoint(mine).sites == ["siteB"]
    # the copied site files: each site's kept state beside the model
    assert sorted(p.name for p in (run / "experts").iterdir()) == ["siteA.pt", "siteB.pt"]
    # bad input: a malformed --site, a folder that is not a run
    assert main(["model", "assemble", str(run), "--site", "siteB"]) == 2
    assert "NAME=FOLDER" in capsys.readouterr().err
    # a misspelt site or a folder without a state is an error, not a quiet skip
    assert main(["model", "assemble", str(run), "--site", f"siteX={folders['siteB']}",
                 "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "its sites: siteA, siteB, siteC" in capsys.readouterr().err
    (tmp_path / "nostate").mkdir()
    assert main(["model", "assemble", str(run), "--site", f"siteB={tmp_path / 'nostate'}",
                 "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "no site state there" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no shared.ckpt"):
        assemble_run(tmp_path / "empty")
