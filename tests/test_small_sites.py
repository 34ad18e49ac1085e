"""data.min_cases_per_site: tiny institutions are left out before training, named by the
server; bad values are refused naming the key."""

from __future__ import annotations

import pytest

from m4fuse.run import provision, settings


def _split(sizes: dict[str, int]) -> dict[str, dict[str, list[str]]]:
    out = {}
    for site, n in sizes.items():
        cases = [f"{site}-{i}" for i in range(n)]
        out[site] = {"train": cases[: max(1, n - 2)], "val": cases[max(1, n - 2): n - 1],
                     "test": cases[n - 1:] if n > 1 else []}
    return out


def test_min_cases_per_site_leaves_out_small_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    split = _split({"big": 10, "one": 1, "three": 3})
    monkeypatch.setattr(provision, "_full_split", lambda cfg: split)
    cfg = settings.compose("config", ["data.min_cases_per_site=3"])
    assert provision.site_names(provision.load_sites(cfg)) == ["big", "three"]
    assert provision.small_sites(cfg) == {"one": 1}
    every = settings.compose("config")  # default 1: every site with a case takes part
    assert provision.site_names(provision.load_sites(every)) == ["big", "one", "three"]
    assert provision.small_sites(every) == {}
    with pytest.raises(ValueError, match="min_cases_per_site=11 leaves no site"):
        provision.load_sites(settings.compose("config", ["data.min_cases_per_site=11"]))


@pytest.mark.parametrize("bad", ["0", "-2", "1.5", "true"])
def test_min_cases_per_site_must_be_a_positive_integer(bad: str) -> None:
    # 1.5 and true are refused for their type (the YAML default is an integer) at compose
    with pytest.raises(ValueError, match="data.min_cases_per_site (must be an integer >= 1|"
                                         "takes an integer)"):
        settings.compose("config", [f"data.min_cases_per_site={bad}"])
