"""The goals a comparison of equal sites checks, and the criteria files their thresholds come
from.

A criteria file is a JSON or YAML (``.yaml``/``.yml``) mapping of some of the keys of a
default file under ``simulations/compare/criteria/``; the keys it gives replace the default's.
``default.yaml`` holds the goals of equal sites (:func:`goals`, ``--criteria FILE``),
``skewed.yaml`` those of a skewed federation (:mod:`simulations.compare.skewed`,
``--goals FILE``). A bad file fails in one line naming the flag, the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The default criteria files.
CRITERIA_DIR = Path(__file__).resolve().parent / "criteria"
DEFAULT_CRITERIA_FILE = CRITERIA_DIR / "default.yaml"

#: A value check: the value's problem as text (``"must be ..., got ..."``), or None when fine.
ValueCheck = Callable[[Any], str | None]


def number_at_least_zero(value: Any) -> str | None:
    """None for a number >= 0 (not a bool), else the problem."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return f"must be a number >= 0, got {value!r}"
    return None


def site_positions(value: Any) -> str | None:
    """None for a list of site positions (integers >= 0, in site order), else the problem."""
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return f"must be a list of site positions (integers >= 0), got {value!r}"
    return None


def new_site_k(value: Any) -> str | None:
    """None for a number of new-site training cases (an integer >= 1 or ``all``), else the
    problem."""
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return f"must be an integer >= 1 or 'all', got {value!r}"


def read_mapping(path: Path, flag: str, what: str) -> Any:
    """The parsed content of the JSON or YAML file ``path`` (YAML when it ends ``.yaml`` or
    ``.yml``).

    Raises:
        ValueError: naming ``flag`` and the file (unreadable, or not valid JSON/YAML).
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot read it ({err.strerror}); give a JSON or "
                         f"YAML file of {what}") from None
    try:
        import yaml

        return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error is the file's
        raise ValueError(f"{flag} {path}: not valid {path.suffix.lstrip('.') or 'JSON'} "
                         f"({str(err).splitlines()[0]})") from None


def load_criteria_file(path: str | Path | None, defaults: Mapping[str, Any], flag: str,
                       what: str, checks: Mapping[str, ValueCheck]) -> dict[str, Any]:
    """``defaults`` with the keys of the JSON or YAML mapping in ``path`` (None: the defaults
    alone) replacing theirs, each checked by ``checks[key]``.

    Raises:
        ValueError: one line naming ``flag``, the file and the unknown key, the bad value or
            the unreadable content.
    """
    out = dict(defaults)
    if path is None:
        return out
    path = Path(path)
    given = read_mapping(path, flag, what)
    if not isinstance(given, dict):
        raise ValueError(  # noqa: TRY004 - a bad file is a bad value, like the others
            f"{flag} {path}: expected a mapping of {sorted(defaults)}, "
            f"got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{flag} {path}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    for key, value in given.items():
        problem = checks[key](value)
        if problem:
            raise ValueError(f"{flag} {path}: {key} {problem}")
    out.update(given)
    return out


def read_default(path: Path) -> dict[str, Any]:
    """A default criteria file (YAML) of the package."""
    import yaml

    return dict(yaml.safe_load(path.read_text()))


#: The criteria of the goals of equal sites (``criteria/default.yaml``, its comments say what
#: each key means).
DEFAULT_CRITERIA: dict[str, Any] = read_default(DEFAULT_CRITERIA_FILE)

_CHECKS: dict[str, ValueCheck] = {
    "fedavg_sites": site_positions, "fedavg_p": number_at_least_zero,
    "pooled_share": number_at_least_zero, "pooled_share_stretch": number_at_least_zero,
    "new_site_k": new_site_k}


def load_criteria(path: str | Path | None) -> dict[str, Any]:
    """:data:`DEFAULT_CRITERIA` with the keys of the JSON or YAML mapping in ``path`` (default
    None: the defaults) replacing theirs.

    Raises:
        ValueError: naming ``--criteria``, the file and the unknown key or bad value.
    """
    return load_criteria_file(path, DEFAULT_CRITERIA, "--criteria", "goal criteria", _CHECKS)


# --------------------------------------------------------------------------- the goals


def _seeds_of(table: Mapping[str, Any], mode: str) -> set[str]:
    return set(table.get(mode, {}).get("mean", {}).get("per_seed", {}))


def _site_mean(table: Mapping[str, Any], mode: str, site: str, seeds: set[str]) -> float | None:
    # The mean over ``seeds`` (those both compared modes ran), not over all of the mode's
    # seeds: a merged report may hold one mode on more seeds than the other.
    per_seed = table.get(mode, {}).get(site, {}).get("per_seed", {})
    values = [v for seed, v in per_seed.items() if seed in seeds]
    return float(np.mean(values)) if values else None


def _over(table: Mapping[str, Any], default: str, seeds: set[str]) -> str:
    return (f" (over the {len(seeds)} seed(s) both ran)" if seeds != _seeds_of(table, default)
            else "")


def local_goal(table: Mapping[str, Any], default: str, sites: Sequence[str]) -> dict[str, Any]:
    """The default >= local on every site (mean over the seeds both ran)."""
    if not (default in table and "local" in table and default != "local"):
        return {"goal": "default >= local on every site", "met": None,
                "detail": f"needs modes {default} and local"}
    common = _seeds_of(table, default) & _seeds_of(table, "local")
    diffs = {s: (_site_mean(table, default, s, common), _site_mean(table, "local", s, common))
             for s in sites}
    below = [s for s, (d, loc) in diffs.items() if d is None or loc is None or d < loc]
    return {"goal": f"{default} >= local on every site (mean over seeds)",
            "met": not below,
            "detail": ", ".join(f"{s} {d:.4f} vs {loc:.4f}" for s, (d, loc) in diffs.items()
                                if d is not None and loc is not None)
                      + (f"; below local on {below}" if below else "")
                      + _over(table, default, common)}


def fedavg_goal(table: Mapping[str, Any], tests: Sequence[Mapping[str, Any]], default: str,
                sites: Sequence[str], fedavg: str, criteria: Mapping[str, Any]
                ) -> dict[str, Any]:
    """The default > ``fedavg`` on the sites at ``criteria["fedavg_sites"]`` (positions in
    site order) with paired p < ``criteria["fedavg_p"]``."""
    positions, p_max = list(criteria["fedavg_sites"]), float(criteria["fedavg_p"])
    targets = [sites[i] for i in positions if i < len(sites)]
    fed = {t["site"]: t for t in tests if t["b"] == fedavg}
    if not (fed and default != fedavg and targets):
        return {"goal": f"default > fedavg on sites {' and '.join(str(i) for i in positions)} "
                        f"with p < {p_max:g}", "met": None,
                "detail": f"needs modes {default} and {fedavg} and >= "
                          f"{min(positions, default=0) + 1} sites"}
    parts, met = [], True
    for s in targets:
        t = fed[s]
        ok = t["mean_diff"] is not None and t["mean_diff"] > 0 and t["p"] is not None \
            and t["p"] < p_max
        met &= ok
        p = "n/a" if t["p"] is None else f"{t['p']:.3g}"
        parts.append(f"{s} diff {(t['mean_diff'] or 0):+.3f}, p {p}")
    return {"goal": f"{default} > {fedavg} on {' and '.join(targets)} with p < {p_max:g} "
                    "(paired, cases of the seeds both ran)", "met": met,
            "detail": "; ".join(parts)
                      + _over(table, default, _seeds_of(table, default)
                              & _seeds_of(table, fedavg))}


def pooled_goal(table: Mapping[str, Any], default: str, criteria: Mapping[str, Any]
                ) -> dict[str, Any]:
    """The default's mean Dice >= ``criteria["pooled_share"]`` of pooled's (stretch:
    ``pooled_share_stretch``)."""
    share, stretch = float(criteria["pooled_share"]), float(criteria["pooled_share_stretch"])
    common = _seeds_of(table, default) & _seeds_of(table, "pooled")
    d, p = _site_mean(table, default, "mean", common), _site_mean(table, "pooled", "mean", common)
    if d is None or p is None or p <= 0:
        return {"goal": f"default mean Dice >= {100 * share:g} % of pooled", "met": None,
                "detail": f"needs modes {default} and pooled"}
    ratio = d / p
    return {"goal": f"{default} mean Dice >= {100 * share:g} % of pooled "
                    f"(stretch {100 * stretch:g} %)",
            "met": ratio >= share,
            "detail": f"{d:.3f} / {p:.3f} = {100 * ratio:.1f} %"
                      + (" (stretch met)" if ratio >= stretch else "") + _over(table, default,
                                                                               common)}


def new_site_goal(new_site: Mapping[str, Any] | None, criteria: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """The new site's fine-tuned expert > the shared model alone at k =
    ``criteria["new_site_k"]``."""
    k = str(criteria["new_site_k"])
    goal = f"new site: fine-tuned expert > shared model alone at k = {k}"
    if not (new_site and k in new_site.get("by_k", {})):
        return {"goal": goal, "met": None, "detail": f"not run (--new-site-cases without {k})"}
    t = new_site["by_k"][k]["test"]
    p_text = "n/a" if t["p"] is None else f"{t['p']:.3g}"
    return {"goal": goal, "met": bool(t["mean_diff"] is not None and t["mean_diff"] > 0),
            "detail": f"{t['mean_a']:.3f} vs {t['mean_b']:.3f}, paired p {p_text}, n {t['n']}"}


def goals(table: Mapping[str, Any], tests: Sequence[Mapping[str, Any]], default: str,
          sites: Sequence[str], new_site: Mapping[str, Any] | None,
          fedavg: str = "fedavg", criteria: Mapping[str, Any] | None = None
          ) -> list[dict[str, Any]]:
    """The comparison's goals as ``{"goal", "met" (True/False/None: not measured), "detail"}``;
    ``fedavg`` names the mode that stands for FedAvg (default ``fedavg``; a merged report's
    renamed one, e.g. ``fedavg+none``); ``criteria`` their thresholds (default
    :data:`DEFAULT_CRITERIA`, :func:`load_criteria`)."""
    criteria = DEFAULT_CRITERIA if criteria is None else criteria
    return [local_goal(table, default, sites),
            fedavg_goal(table, tests, default, sites, fedavg, criteria),
            pooled_goal(table, default, criteria),
            new_site_goal(new_site, criteria)]
