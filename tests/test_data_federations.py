"""Sized synthetic federations: the BraTS-shaped profiles and their scaling, the split with a
fixed number of test cases per site, the bad settings, and the varied gliomas of the
generator (multifocal, sizes, head size, oedema along white matter, the case mix)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import ndimage

from m4fuse.data import SYNTH_VERSION, read_site_csv, scale_site_sizes, split_cases
from m4fuse.data.sites import BRATS19_LOWER_GRADE, BRATS19_SITE_SIZES, FETS22_SITE_SIZES
from m4fuse.data.synth import HGG_MIX, LGG_MIX, make_case, plan_cases, site_acquisition
from m4fuse.run import provision, settings


def test_scaling_rounds_half_up_and_keeps_a_case():
    # hand-worked: 129/5 = 25.8 -> 26, 4/5 = 0.8 -> 1, 12/5 = 2.4 -> 2, 25/10 = 2.5 -> 3
    # (Python's round gives 2), 1/10 -> 0.1 -> floor 1
    assert scale_site_sizes([129, 4, 12], 0.2) == [26, 1, 2]
    assert scale_site_sizes([25, 1], 0.1) == [3, 1]
    with pytest.raises(ValueError, match="factor"):
        scale_site_sizes([3], 0)


def test_profiles_are_the_real_sizes_scaled():
    b19 = settings.compose("config", ["data=brats19_shaped"]).data
    assert list(b19.site_names) == list(BRATS19_SITE_SIZES)  # the institutions, largest first
    assert sum(BRATS19_SITE_SIZES.values()) == 335 and len(BRATS19_SITE_SIZES) == 14
    assert list(b19.site_sizes) == scale_site_sizes(list(BRATS19_SITE_SIZES.values()), 0.2)
    assert list(b19.site_sizes) == [26, 7, 7, 6, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1]  # the docs' list
    assert b19.sites == 14 and b19.test_cases_per_site == 15
    assert sorted(b19.lower_grade_sites) == sorted(BRATS19_LOWER_GRADE)
    f22 = settings.compose("config", ["data=fets22_shaped"]).data
    assert sum(FETS22_SITE_SIZES) == 1251 and len(FETS22_SITE_SIZES) == 23
    assert list(f22.site_sizes) == scale_site_sizes(FETS22_SITE_SIZES, 0.05)
    assert f22.sites == 23 and f22.test_cases_per_site == 15
    # training cases after validation (0.15 of each site's own cases): 60 and 65
    for data, expected in ((b19, 60), (f22, 65)):
        train = sum(len(split_cases([f"c{i}" for i in range(n + 15)], 0, float(data.val_fraction),
                                    float(data.test_fraction), salt=str(k), test_cases=15)["train"])
                    for k, n in enumerate(data.site_sizes))
        assert train == expected
    default = settings.compose("config", []).data
    assert default.site_sizes is None and default.test_cases_per_site is None


@pytest.mark.parametrize("own, val", [(1, 0), (2, 0), (3, 0), (4, 1), (7, 1), (10, 2), (26, 4)])
def test_fixed_test_cases_and_validation_out_of_the_sites_own(own, val):
    """15 test cases whatever the size; round(own * 0.15) validation cases out of the rest
    (Python rounds 1.5 to 2), at least one training case."""
    ids = [f"BraTS2021_{i:05d}" for i in range(own + 15)]
    parts = split_cases(ids, seed=2, val_fraction=0.15, test_fraction=0.5, salt="TMC", test_cases=15)
    assert len(parts["test"]) == 15 and len(parts["val"]) == val and len(parts["train"]) == own - val
    assert sorted(parts["test"] + parts["val"] + parts["train"]) == ids


def test_default_split_is_unchanged():
    """The 4-equal-site default: 30 cases -> 11 train / 4 val / 15 test by the fractions."""
    parts = split_cases([f"c{i:02d}" for i in range(30)], 0, 0.13, 0.5, salt="site0")
    assert [len(parts[k]) for k in ("train", "val", "test")] == [11, 4, 15]
    with pytest.raises(ValueError, match="test_cases"):
        split_cases(["a", "b"], test_cases=0)


TINY = ["data.shape=[16,16,16]", "data.size=[16,16,16]", "data.workers=0", "tracking.enabled=false"]


def test_sized_federation_end_to_end(tmp_path, caplog):
    """Generated, split and described: named sites, 2 test cases each, the sites with too few
    cases validate on none and say so; acquisition.json and cases.json hold each site's
    acquisition and case mix."""
    cfg = settings.compose("config", [
        f"root={tmp_path}", *TINY, "data.sites=3", "data.site_sizes=[4,1,2]",
        "data.site_names=[big,one,two]", "data.lower_grade_sites=[two]",
        "data.test_cases_per_site=2", "data.val_fraction=0.15"])
    records = logging.getLogger("m4fuse.data.sites")
    records.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="m4fuse.data.sites"):
            split = provision.load_sites(cfg)
    finally:
        records.removeHandler(caplog.handler)
    assert {s: [len(p[k]) for k in ("train", "val", "test")] for s, p in split.items()} == {
        "big": [3, 1, 2], "one": [1, 0, 2], "two": [2, 0, 2]}
    quiet = {r.getMessage() for r in caplog.records if "validates on none" in r.getMessage()}
    assert len(quiet) == 2 and any(m.startswith("site one ") for m in quiet)
    source, _ = provision.data_paths(cfg)
    sites = read_site_csv(source / "partition.csv")
    assert sorted(sites.values()).count("big") == 6 and len(sites) == 6 + 3 + 4
    acq = json.loads((source / "acquisition.json").read_text())
    assert acq["generator"] == SYNTH_VERSION and set(acq["sites"]) == {"big", "one", "two"}
    assert acq["sites"]["big"] == site_acquisition(0, 0)  # the first name is the reference scanner
    assert acq["case_mix"]["two"]["grade"] == "LGG" and acq["case_mix"]["big"]["grade"] == "HGG"
    assert acq["case_mix"]["one"]["cases"] == 3
    cases = json.loads((source / "cases.json").read_text())
    assert sum(c["site"] == "two" for c in cases.values()) == 4 and set(cases) == set(sites)
    marker = json.loads((source / ".complete").read_text())
    assert marker["generator"] == f"v{SYNTH_VERSION}" and marker["layout"]["site_cases"] == [6, 3, 4]


@pytest.mark.parametrize("overrides, message", [
    (["data=brats19_shaped", "data.sites=13"], "data.site_sizes has 14 entries for data.sites=13"),
    (["data.site_sizes=[3,0,2,2]"], r"data.site_sizes\[1\]=0"),
    (["data.site_sizes=[3,2]"], "data.site_sizes has 2 entries for data.sites=4"),
    (["data.test_cases_per_site=0"], "data.test_cases_per_site must be null or an integer >= 1, got 0"),
    (["data.site_names=[a,b,a,c]"], "data.site_names must be 4 distinct"),
    (["data.lower_grade_sites=[TCIA09]"], r"data.lower_grade_sites names \['TCIA09'\]"),
    (["data=nonexistent"], "unknown data=nonexistent: the options are brats, brats19_shaped"),
])
def test_bad_settings_fail_on_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        settings.compose("config", overrides)
    assert "\n" not in str(err.value)


def test_bad_sizes_fail_before_any_data_is_written(tmp_path):
    cfg = settings.compose("config", [f"root={tmp_path}", *TINY])
    OmegaConf.update(cfg, "data.site_sizes", [1, 2, 3])  # past compose's check
    with pytest.raises(ValueError, match="data.site_sizes has 3 entries for data.sites=4"):
        provision.ensure_data(cfg)
    assert not (tmp_path / "data").exists() and not (tmp_path / "cache").exists()


def test_case_mix_plans():
    """Exact shares (largest remainder): 20 HGG cases -> 8 large, 7 medium, 5 small, 3 without
    ET, 4 multifocal; 20 LGG cases -> 2 large, 6 medium, 12 small, 12 without ET, 1 multifocal."""
    for mix, expected in ((HGG_MIX, (8, 7, 5, 3, 4)), (LGG_MIX, (2, 6, 12, 12, 1))):
        plans = plan_cases(20, mix, np.random.default_rng(0))
        got = tuple(sum(p.size_class == s for p in plans) for s in ("large", "medium", "small"))
        got += (sum(not p.with_et for p in plans), sum(p.foci > 1 for p in plans))
        assert got == expected
        assert all(p.foci in (1, 2, 3) for p in plans)


SHAPE = (40, 40, 32)


def _core_components(label: np.ndarray, min_voxels: int = 4) -> int:
    lab, _ = ndimage.label((label == 1) | (label == 4), np.ones((3, 3, 3)))
    return int(np.sum(np.bincount(lab.ravel())[1:] >= min_voxels))


def test_multifocal_cases_have_separate_cores():
    acq = site_acquisition(0, 0)
    single = [_core_components(make_case(SHAPE, np.random.default_rng([1, j]), acq, "medium", True)[1])
              for j in range(4)]
    multi = [_core_components(make_case(SHAPE, np.random.default_rng([1, j]), acq, "medium", True,
                                        foci=3)[1]) for j in range(4)]
    assert sum(m >= 2 for m in multi) >= 3 and np.mean(multi) > np.mean(single)


def test_sizes_heads_and_oedema_vary_like_gliomas():
    """Across cases: whole-tumour volume spans > 5x, brain volume > 15 %; small tumours are
    smaller than large ones; oedema lies in white matter more than the brain does."""
    acq = site_acquisition(0, 0)
    wt, brain, wm_in_oedema, wm_in_brain = {"large": [], "small": []}, [], [], []
    for j in range(8):
        size = ("large", "small")[j % 2]
        images, label, tissue = make_case(SHAPE, np.random.default_rng([2, j]), acq, size, True,
                                          return_tissue=True)
        wt[size].append(int((label > 0).sum()))
        brain.append(int((images[0] > 0).sum()))
        wm_in_oedema.append(float(np.mean(tissue[label == 2] == 1)))
        wm_in_brain.append(float(np.mean(tissue[tissue > 0] == 1)))
    volumes = wt["large"] + wt["small"]
    assert max(volumes) > 5 * min(volumes) and np.median(wt["large"]) > 2 * np.median(wt["small"])
    assert max(brain) > 1.15 * min(brain)
    assert np.mean(wm_in_oedema) > np.mean(wm_in_brain) + 0.1


def test_lower_grade_cases_lack_enhancement_and_labels_nest():
    acq = site_acquisition(1, 0)
    _, label = make_case(SHAPE, np.random.default_rng(3), acq, "small", False)
    assert (label == 4).sum() == 0 and (label == 1).sum() > 0
    _, label = make_case(SHAPE, np.random.default_rng(3), acq, "large", True, foci=2)
    assert set(np.unique(label)) == {0, 1, 2, 4}
    with pytest.raises(ValueError, match="foci"):
        make_case(SHAPE, np.random.default_rng(3), acq, "large", True, foci=0)


def test_generator_version_in_the_marker():
    assert SYNTH_VERSION >= 2 and provision.generator_version() == f"v{SYNTH_VERSION}"
