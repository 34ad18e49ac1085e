"""Joining written comparisons (``--merge``): their per-case rows, cross-site rows, new-site
rows, wall times and checks joined, and the summary computed again from the joined rows."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m4fuse.evaluation.crosssite import SCORE_KEYS
from simulations.compare.report import read_comparison, write_report
from simulations.compare.summary import pool_new_site, summarise


def _load_mergeable(paths: Sequence[Path | str]) -> tuple[list[tuple[Path, dict[str, Any]]],
                                                          list[dict[str, Any]]]:
    """The comparisons of ``--merge`` loaded (a ``#SUFFIX`` renames that file's modes) and
    checked to agree (:func:`merge_comparisons`); with their sources for ``merged_from``."""
    if len(paths) < 2:
        raise ValueError(f"--merge needs at least two comparison.json files, got {list(paths)}")
    loaded = []
    sources = []
    for entry in paths:
        path, _, suffix = str(entry).partition("#")
        try:
            payload = read_comparison(path)
        except (OSError, EOFError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read comparison {path}: {err}") from None
        if suffix:
            payload = _rename_modes(payload, suffix)
        loaded.append((Path(path), payload))
        sources.append({"file": path, "suffix": suffix,
                        "overrides": payload["summary"]["overrides"],
                        "provenance": payload["summary"].get("provenance")})
    first_path, first = loaded[0]
    for (path, payload), source in zip(loaded[1:], sources[1:]):
        same = ("budget", "sites") if source["suffix"] else (
            "default_strategy", "budget", "sites", "overrides")
        for key in same:
            if payload["summary"][key] != first["summary"][key]:
                raise ValueError(f"cannot merge {path} with {first_path}: summary.{key} differs "
                                 f"({payload['summary'][key]!r} vs {first['summary'][key]!r})")
    return loaded, sources


def _merged_modes_and_seeds(loaded: Sequence[tuple[Path, Mapping[str, Any]]]
                            ) -> tuple[list[str], set[int]]:
    """The modes (first-seen order) and seeds of the loaded comparisons; a (mode, seed) held by
    two files is refused, naming both. A file holds the (mode, seed) pairs of its per-case
    rows, not every mode on every seed of its summary: a merged file may hold a mode on
    fewer seeds than the others, and another file may add that mode's missing seeds."""
    modes: list[str] = []
    seeds: set[int] = set()
    seen: dict[tuple[str, int], Path] = {}
    for path, payload in loaded:
        s = payload["summary"]
        modes += [m for m in s["modes"] if m not in modes]
        held = {(r["mode"], int(r["seed"])) for r in payload["rows"]}
        for mode, seed in sorted(held):
            if (mode, seed) in seen:
                raise ValueError(f"{mode} seed {seed} is in both {seen[(mode, seed)]} and "
                                 f"{path}")
            seen[(mode, seed)] = path
        seeds.update(int(x) for x in s["seeds"])
    return modes, seeds


def merge_comparisons(paths: Sequence[Path | str], out: Path, name: str,
                      default: str | None = None, against: Sequence[str] = (),
                      fedavg: str = "fedavg", criteria: Mapping[str, Any] | None = None
                      ) -> Path:
    """One comparison from several ``comparison.json`` (e.g. seed 0 of one run and seeds 1, 2
    of another): their per-case rows, cross-site rows, new-site rows, wall times and checks
    are joined and the summary (table, tests, goals) is computed again from the joined rows.

    A path may end in ``#SUFFIX`` (e.g. ``runs/m/comparison.json#+fedavgm``): that file's
    modes are renamed ``<mode>SUFFIX`` and its overrides may differ from the first file's
    (each file's overrides are kept in ``summary.merged_from``); the budget and the sites
    must still agree. Without a suffix, files whose default strategy, budget, sites or
    overrides differ are refused, as are two files holding the same (mode, seed). ``default``
    (default: the first file's default strategy) is the mode the report tests against fedavg
    and local, and also against the modes ``against``; ``fedavg`` (default ``fedavg``) is the
    mode that stands for FedAvg there and in the goals (e.g. ``fedavg+none`` when the FedAvg
    runs carry a suffix). A mode that ran on only some seeds is reported with its ``n_seeds``.
    ``criteria``: the equal-site goals' thresholds (default
    :data:`simulations.compare.goals.DEFAULT_CRITERIA`; a skewed federation's are the first
    file's ``goal_thresholds``). Returns the merged ``comparison.json``'s path."""
    loaded, sources = _load_mergeable(paths)
    modes, seeds = _merged_modes_and_seeds(loaded)
    first = loaded[0][1]
    default = default or first["summary"]["default_strategy"]
    if default not in modes:
        raise ValueError(f"--default {default!r} is not among the merged modes {modes}")
    if fedavg != "fedavg" and fedavg not in modes:
        raise ValueError(f"--fedavg {fedavg!r} is not among the merged modes {modes}")
    rows, cross_rows, new_site_results = _joined_rows(loaded)
    summary = summarise(
        name=name, default=default, modes=modes,
        seeds=sorted(seeds), sites=first["summary"]["sites"],
        overrides=first["summary"]["overrides"],
        test_cases={k: v for _, p in loaded for k, v in p["summary"]["test_cases"].items()},
        budget=first["summary"]["budget"], rows=rows, cross_rows=cross_rows,
        new_site=merge_new_site(new_site_results), seconds=_joined(loaded, "seconds"),
        bytes_by_mode=_joined(loaded, "bytes"), check=_joined(loaded, "check"),
        convergence=[line for _, p in loaded for line in p["summary"]["convergence"]],
        against=against, fedavg=fedavg,
        train_cases=first["summary"].get("train_cases"),
        steps={m: v for _, p in loaded for m, v in p["summary"].get("steps", {}).items()},
        goal_thresholds=first["summary"].get("goal_thresholds"), criteria=criteria)
    summary["merged_from"] = sources
    json_path, _ = write_report(out, summary, rows, cross_rows, summary.pop("_new_site_rows"))
    return json_path


def _joined_rows(loaded: Sequence[tuple[Path, Mapping[str, Any]]]
                 ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]],
                            list[dict[str, Any]]]:
    """The loaded comparisons' per-case rows, cross-site rows by mode and new-site results,
    joined (a score written as null is nan again)."""
    rows = [r for _, p in loaded for r in p["rows"]]
    for r in rows:
        for k in SCORE_KEYS:
            r[k] = float("nan") if r[k] is None else r[k]
    cross_rows: dict[str, list[dict[str, Any]]] = {}
    for _, p in loaded:
        for r in p.get("crosssite_rows", []):
            r = dict(r)
            cross_rows.setdefault(r.pop("mode"), []).append(
                {k: (float("nan") if k in SCORE_KEYS and v is None else v) for k, v in r.items()})
    new_site_results = [
        {**p["summary"]["new_site"], "model": p["summary"]["new_site"]["models"][0],
         "rows": p.get("new_site_rows", [])}
        for _, p in loaded if p["summary"].get("new_site")]
    return rows, cross_rows, new_site_results


def _joined(loaded: Sequence[tuple[Path, Mapping[str, Any]]], key: str) -> dict[str, Any]:
    """The summaries' ``key`` (per mode: a mapping, joined, or a list, concatenated)."""
    out_: dict[str, Any] = {}
    for _, p in loaded:
        for mode, value in p["summary"][key].items():
            if isinstance(value, dict):
                out_.setdefault(mode, {}).update(value)
            else:
                out_.setdefault(mode, []).extend(value)
    return out_


def _rename_modes(payload: dict[str, Any], suffix: str) -> dict[str, Any]:
    """``payload`` (a loaded ``comparison.json``) with every mode ``m`` renamed ``m+suffix``:
    in its rows, cross-site rows, and the summary's modes, wall times, bytes and checks."""
    s = dict(payload["summary"])
    renamed = {m: f"{m}{suffix}" for m in s["modes"]}
    s["modes"] = [renamed[m] for m in s["modes"]]
    for key in ("seconds", "bytes", "check"):
        s[key] = {renamed.get(m, m): v for m, v in s[key].items()}
    if "steps" in s:
        s["steps"] = {renamed.get(m, m): v for m, v in s["steps"].items()}
    s["convergence"] = [f"{line} ({suffix})" for line in s["convergence"]]
    return {**payload, "summary": s,
            "rows": [{**r, "mode": renamed.get(r["mode"], r["mode"])} for r in payload["rows"]],
            "crosssite_rows": [{**r, "mode": renamed.get(r["mode"], r["mode"])}
                               for r in payload.get("crosssite_rows", [])]}


def merge_new_site(results: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The new-site results of merged comparisons: per k the per-case test over all their
    rows (:func:`pool_new_site` on results whose ``by_k`` already pools several seeds)."""
    if not results:
        return None
    per_k = [{**r, "by_k": {k: {"seconds": sum(v["seconds"]) if isinstance(v["seconds"], list)
                                else v["seconds"], "frozen_unchanged": v["frozen_unchanged"]}
                            for k, v in r["by_k"].items()}} for r in results]
    pooled = pool_new_site(per_k)
    pooled["models"] = [m for r in results for m in r["models"]]
    return pooled
