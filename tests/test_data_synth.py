"""The synthetic multi-site set: layout, partition CSV, nested labels, contrasts, site shift."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import NormalizeIntensity
from scipy import ndimage

from m4fuse.cli.main import main
from m4fuse.data import discover_cases, read_site_csv
from m4fuse.data.synth import SITE_TABLE, make_case, site_acquisition

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


def _site_stats(site: int, cases: int = 2, shape=(96, 96, 64)) -> np.ndarray:
    """Per case, after the z-scoring of preprocessing: ET-vs-surroundings contrast on T1ce,
    oedema-vs-surroundings contrast on FLAIR, WM-minus-GM on T1, high-frequency noise on T2
    (median absolute Laplacian inside eroded white matter)."""
    acq = site_acquisition(site, 0)
    out = []
    for j in range(cases):
        images, seg, tissue = make_case(shape, np.random.default_rng([5, site, j]), acq, "large", True,
                                        return_tissue=True)
        z = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(images.copy())))
        healthy = (images[0] > 0) & (seg == 0)
        ring = ndimage.binary_dilation(seg > 0, iterations=3) & healthy
        wm = (tissue == 1) & healthy
        gm = (tissue == 2) & healthy
        wm_core = ndimage.binary_erosion(wm, iterations=1)
        out.append([
            np.median(z[1][seg == 4]) - np.median(z[1][ring]),
            np.median(z[3][seg == 2]) - np.median(z[3][ring]),
            np.median(z[0][wm]) - np.median(z[0][gm]),
            np.median(np.abs(ndimage.laplace(z[2])[wm_core])),
        ])
    return np.array(out)


def test_site_shift_survives_zscoring():
    """Site 0 (reference) and site 3 (most shifted) differ after z-scoring, beyond the spread
    between cases of one site; the tumour stays visible (positive local contrast) on both."""
    ref, far = _site_stats(0), _site_stats(3)
    assert (ref[:, 0] > 0).all() and (far[:, 0] > 0).all()  # ET brighter than its surroundings
    assert (ref[:, 1] > 0).all() and (far[:, 1] > 0).all()  # oedema bright on FLAIR
    # weaker gadolinium enhancement and FLAIR oedema at site 3
    assert far[:, 0].max() < ref[:, 0].min() and far[:, 1].max() < ref[:, 1].min()
    # grey/white contrast on T1: WM clearly brighter at the reference, flat or inverted at site 3
    assert ref[:, 2].min() > 1.0 and far[:, 2].max() < 0.3 * ref[:, 2].min()
    # noise: more high-frequency energy at site 3 (lower SNR) despite its blur
    assert far[:, 3].min() > 1.5 * ref[:, 3].max()


def test_site_parameters_ordered_and_deterministic():
    """Site 0 is the reference (exact table values); sites move monotonically away from it;
    the same (site, seed) gives the same parameters, another seed different jitter."""
    acq = [site_acquisition(k, 0) for k in range(6)]
    for key, values in SITE_TABLE.items():
        assert acq[0][key] == values[0]
        dist = [abs(a[key] - values[0]) for a in acq[:4]]
        assert dist == sorted(dist) or key in ("oedema_extent", "blur_z_extra", "blur"), key
        lo, hi = sorted((values[0], values[-1]))
        assert all(lo - 1e-9 <= a[key] <= hi + 1e-9 for a in acq[4:]), key  # later sites in between
    assert acq[0]["gamma"] == [1.0] * 4
    assert site_acquisition(2, 0) == acq[2] and site_acquisition(2, 1) != acq[2]
    with pytest.raises(ValueError, match="-1"):
        site_acquisition(-1, 0)


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
