"""The synthetic multi-site set: layout, partition CSV, nested labels, contrasts, site shift."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from m4fuse.cli import main
from m4fuse.data import discover_cases, read_site_csv
from m4fuse.data.synth import make_case, site_acquisition

SHAPE = (40, 40, 28)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(out), "--sites", "2", "--cases-per-site", "6",
                 "--seed", "0", "--shape", *map(str, SHAPE)]) == 0
    return out


def _load(path):
    return np.asarray(nib.load(path).dataobj)


def test_layout_and_partition(synth):
    cases = discover_cases(synth)
    assert len(cases) == 12 and all(c.layout == "2021" and c.seg is not None and not c.missing for c in cases)
    img = nib.load(cases[0].images["t1"])
    assert img.shape == SHAPE and np.allclose(img.header.get_zooms(), 1.0)
    assert img.affine[0, 0] == -1 and np.any(img.affine[:3, 3] != 0)
    sites = read_site_csv(synth / "partition.csv")
    assert sorted(set(sites.values())) == ["site0", "site1"] and set(sites) == {c.case_id for c in cases}


def test_labels_nested_contrasts_and_no_et_cases(synth):
    cases = discover_cases(synth)
    no_et = 0
    for c in cases:
        seg = _load(c.seg)
        assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).sum() > 0
        t1 = _load(c.images["t1"])
        assert (t1[seg > 0] > 0).all()  # tumour inside the (skull-stripped) brain
        if not (seg == 4).any():
            no_et += 1
            continue
        t1ce, flair = _load(c.images["t1ce"]), _load(c.images["flair"])
        brain_only = (t1ce > 0) & (seg == 0)
        assert np.median(t1ce[seg == 4]) > np.median(t1ce[brain_only])  # ET bright on T1ce
        assert np.median(flair[seg == 2]) > np.median(flair[brain_only])  # oedema bright on FLAIR
        # nesting: ET touches the core or oedema only from inside the whole tumour
        assert ((seg == 4) & (seg == 0)).sum() == 0
    assert 1 <= no_et < len(cases)


def test_sites_differ_in_intensity(synth):
    sites = read_site_csv(synth / "partition.csv")
    stats = {}
    for c in discover_cases(synth):
        t1 = _load(c.images["t1"]).astype(np.float64)
        stats.setdefault(sites[c.case_id], []).append(np.median(t1[t1 > 0]))
    a, b = (np.array(stats[s]) for s in ("site0", "site1"))
    # within-site spread is small compared with the difference between sites
    assert abs(a.mean() - b.mean()) > 3 * max(a.std(), b.std())


def test_sizes_span_small_to_large():
    acq = site_acquisition(0, 0)
    et = {}
    for size in ("large", "small"):
        _, seg = make_case((96, 96, 64), np.random.default_rng(1), acq, size, True)
        et[size] = int((seg == 4).sum())
    assert 100 < et["small"] < 1000 < et["large"]


def test_deterministic(tmp_path):
    from m4fuse.data import synthesize

    synthesize(tmp_path / "a", 1, 1, seed=3, shape=(20, 20, 16), progress=False)
    synthesize(tmp_path / "b", 1, 1, seed=3, shape=(20, 20, 16), progress=False)
    for mod in ("t1", "seg"):
        name = f"BraTS2021_00000/BraTS2021_00000_{mod}.nii.gz"
        assert np.array_equal(_load(tmp_path / "a" / name), _load(tmp_path / "b" / name))
