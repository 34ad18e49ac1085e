"""Running a comparison: every mode on every seed with the same composed config, each run's
final per-site models scored case by case on their site's test cases (and the cross-site
matrix, the held-out new site), the per-site means checked against the run's own table, then
the summary and the report written."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m4fuse.evaluation.crosssite import score_cases, score_matrix
from m4fuse.evaluation.stats import case_score
from m4fuse.run import provision, runtime, settings, workspace
from simulations.compare import skewed
from simulations.compare.goals import DEFAULT_CRITERIA, load_criteria
from simulations.compare.modes import BASELINES, check_modes, mode_overrides, mode_specs
from simulations.compare.report import write_report
from simulations.compare.summary import convergence_lines, pool_new_site, summarise


def run_mode(mode: str, overrides: Sequence[str], run_name: str) -> dict[str, Any]:
    """Train and test one mode; returns ``{"cfg", "run_dir", "rows", "history", "bytes",
    "site_names"}`` (``rows``: the run's own per-site table)."""
    args = [*overrides, *mode_overrides(mode), f"run_name={run_name}"]
    if mode in BASELINES:
        from m4fuse.training.baselines import run_baseline

        cfg = settings.compose("config", args)
        out = run_baseline(cfg, mode)
        return {"cfg": cfg, "run_dir": out.run_dir, "rows": out.rows, "history": out.history,
                "bytes": 0.0, "site_names": out.site_names}
    from simulations.federated import simulate

    sim = simulate(args)
    return {"cfg": sim["cfg"], "run_dir": sim["run_dir"], "rows": sim["rows"],
            "history": sim["history"], "site_names": sim["site_names"],
            "bytes": float(sim["summary"]["bytes_sent"] + sim["summary"]["bytes_received"])}


def site_models(mode: str, cfg: Any, run_dir: Path, names: Sequence[str]
                ) -> dict[str, tuple[torch.nn.Module, int | None]]:
    """Each site's final model of a finished run: ``{site: (model in eval mode, expert)}``.

    local: ``models/<site>.ckpt``; pooled and every federated strategy: ``model.ckpt`` with
    the site's personal weights (federated: as the site's final test scored them, fine-tuned
    for a "+FT" strategy where the site kept the fine-tuning).
    """
    from m4fuse.io.checkpoint import build_model, load_checkpoint

    if mode == "local":
        return {s: build_model(load_checkpoint(run_dir / "models" / f"{s}.ckpt"), s)
                for s in names}
    ckpt = load_checkpoint(run_dir / "model.ckpt")
    return {s: build_model(ckpt, s) for s in names}


def check_against_run(case_rows: Sequence[Mapping[str, Any]], run_rows: Sequence[Mapping[str, Any]]
                      ) -> dict[str, float]:
    """Per site: |mean Dice of the comparison's own per-case scores - the run's table|; nan
    for a site the run's table has no test score for (e.g. its final evaluation failed)."""
    out = {}
    for row in run_rows:
        site = str(row.get("name", row.get("site")))
        mine = [case_score(r) for r in case_rows if r["site"] == site]
        if not mine:
            continue
        theirs = row.get("test_dice_mean")
        out[site] = (abs(float(np.mean(mine)) - float(theirs))
                     if isinstance(theirs, (int, float)) else float("nan"))
    return out


def log_tracking(cfg: Any, name: str, summary: Mapping[str, Any], artifacts: Sequence[Path]
                 ) -> None:
    """One MLflow run of the comparison: mean test Dice per mode and site, and the files."""
    from m4fuse.run.tracking import Tracker

    tracker = Tracker(cfg, name, tags={"kind": "comparison"})
    metrics = {}
    for mode, by_site in summary["by_site"].items():
        for site, v in by_site.items():
            if v["mean"] is not None:
                metrics[f"{mode}/{site}/test_dice_mean"] = float(v["mean"])
    tracker.log_metrics(metrics, step=0)
    for path in artifacts:
        tracker.log_artifact(path)
    tracker.finish()


@dataclass
class Plan:
    """What :func:`run_compare` runs: the resolved modes, seeds and options."""

    base: Any
    default: str
    name: str
    overrides: list[str]
    modes: list[str]
    seeds: list[int]
    crosssite: list[str]
    new_site_cases: list[int | str]
    new_site_epochs: int
    #: name -> (mode, its own overrides) of ``--modes`` entries with overrides
    specs: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    #: the goal thresholds of a skewed federation (:func:`simulations.compare.skewed.load_goals`)
    goals: dict[str, Any] = field(default_factory=lambda: dict(skewed.DEFAULT_GOALS))
    #: the equal-site goals' criteria (:func:`simulations.compare.goals.load_criteria`)
    criteria: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CRITERIA))


@dataclass
class _Collected:
    """What the runs of a comparison gather, mode by mode and seed by seed."""

    modes: list[str]
    crosssite: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    cross_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    check: dict[str, dict[str, float | None]] = field(default_factory=dict)
    histories: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_site_results: list[dict[str, Any]] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    test_cases: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_by_mode: dict[str, list[float]] = field(default_factory=dict)
    #: seed -> {site: training cases as trained}; mode -> {site: optimiser steps}
    train_cases: dict[str, dict[str, int]] = field(default_factory=dict)
    steps: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cross_rows = {m: [] for m in self.crosssite}
        self.seconds = {m: {} for m in self.modes}
        self.check = {m: {} for m in self.modes}
        self.bytes_by_mode = {m: [] for m in self.modes}


def make_plan(overrides: Sequence[str], modes: Sequence[str] | None,
              seeds: Sequence[int] | None, crosssite: Sequence[str] | None,
              new_site_cases: Sequence[int | str], new_site_epochs: int,
              goals_file: str | Path | None = None,
              criteria_file: str | Path | None = None) -> Plan:
    """The arguments of :func:`run_compare` resolved and checked (a bad new-site k fails
    here, before any training)."""
    base = settings.compose("config", list(overrides))
    default = str(base.fl.strategy)
    name = str(base.run_name) if base.run_name else "compare"
    overrides = [o for o in overrides
                 if not o.lstrip("+~").startswith(("run_name=", "fl.strategy=", "seed="))]
    if modes is None:
        modes = list(dict.fromkeys(["pooled", "local", "fedavg", default]))
    specs = mode_specs(modes)
    modes = check_modes(modes)
    goals = skewed.load_goals(goals_file)
    criteria = load_criteria(criteria_file)
    seeds = [int(base.seed)] if not seeds else [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {seeds}")
    if crosssite is None:
        crosssite = [m for m in dict.fromkeys([default, "local"]) if m in modes]
    bad = [m for m in crosssite if m not in modes]
    if bad:
        raise ValueError(f"--crosssite: {bad} are not among --modes {modes}")
    new_site_cases = list(new_site_cases) if default in modes else []
    if new_site_cases:
        from m4fuse.personal.new_site import check_cases
        from simulations.new_site import new_site_split

        site, records, _ = new_site_split([*overrides, f"seed={seeds[0]}"])
        for k in new_site_cases:  # bad k fail here, before any training
            check_cases(k, len(records["train"]), site)
    return Plan(base, default, name, list(overrides), list(modes), seeds, list(crosssite),
                 new_site_cases, new_site_epochs,
                 {n: v for n, v in specs.items() if v[1] or v[0] != n}, goals, criteria)


def _new_site_result(plan: Plan, run: Mapping[str, Any], seed: int,
                     seed_overrides: Sequence[str]) -> dict[str, Any] | None:
    """The held-out site joined to the default strategy's model of this run (None when the
    run left no federation checkpoint to join)."""
    from simulations.new_site import evaluate_new_site, federation_checkpoint

    model_file = federation_checkpoint(Path(run["run_dir"]), run["cfg"])
    if model_file is None:
        return None
    return evaluate_new_site(
        seed_overrides, model_file, plan.new_site_cases, plan.new_site_epochs,
        out_dir=Path(run["run_dir"]) / "new_site", label={"seed": seed})


def _run_and_score(plan: Plan, got: _Collected, mode: str, seed: int) -> None:
    """Run ``mode`` at ``seed``, score its models on every site's test cases (and the
    cross-site matrix, the new site), and add what it gives to ``got``."""
    base_mode, extra = plan.specs.get(mode, (mode, []))  # a named mode with its overrides
    seed_overrides = [*plan.overrides, *extra, f"seed={seed}"]
    start = time.perf_counter()
    run = run_mode(base_mode, seed_overrides, f"{plan.name}-{mode}-seed{seed}")
    trained = time.perf_counter() - start
    cfg, names = run["cfg"], list(run["site_names"])
    got.sites = got.sites or names
    split = provision.load_sites(cfg)
    got.test_cases[str(seed)] = {s: len(split[s]["test"]) for s in names}
    got.train_cases.setdefault(str(seed), {s: len(split[s]["train"]) for s in names})
    got.steps.setdefault(mode, skewed.steps_of_history(run["history"], names))  # first seed
    device = runtime.resolve_device(str(cfg.device))
    runtime.apply_threads(cfg)
    models = site_models(base_mode, cfg, Path(run["run_dir"]), names)
    mode_rows = []
    for site, (model, expert) in models.items():
        for r in score_cases(model, expert, split[site]["test"], device):
            mode_rows.append({"mode": mode, "seed": seed, "site": site, **r})
    got.rows += mode_rows
    diffs = list(check_against_run(mode_rows, run["rows"]).values())
    # nan (a site without the run's own score) wins: the check then reads "missing"
    got.check[mode][str(seed)] = (None if not diffs or any(np.isnan(diffs))
                                  else float(max(diffs)))
    if mode in plan.crosssite:
        tests = {s: split[s]["test"] for s in names}
        for r in score_matrix(models, tests, device, home_rows=mode_rows):
            got.cross_rows[mode].append({"seed": seed, **r})
    if mode == plan.default and plan.new_site_cases:
        result = _new_site_result(plan, run, seed, seed_overrides)
        if result is not None:
            got.new_site_results.append(result)
    scoring = time.perf_counter() - start - trained
    got.seconds[mode][str(seed)] = {"run": trained, "scoring": scoring}
    got.bytes_by_mode[mode].append(run["bytes"])
    got.histories[f"{mode} seed {seed}"] = {"history": run["history"]}
    print(f"[compare] {mode} seed {seed}: run {trained:.0f} s, scoring {scoring:.0f} s",
          flush=True)


def run_compare(overrides: Sequence[str] = (), modes: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None, crosssite: Sequence[str] | None = None,
                new_site_cases: Sequence[int | str] = (2, 5, "all"), new_site_epochs: int = 20,
                goals_file: str | Path | None = None,
                criteria_file: str | Path | None = None) -> Path:
    """Run ``modes`` x ``seeds`` and write the report; returns ``comparison.json``'s path.

    Args:
        overrides: Hydra overrides for every run (``seed``, ``run_name`` and ``fl.strategy``
            are taken from them for the defaults, then replaced per run).
        modes: default ``pooled, local, fedavg`` and the default strategy.
        seeds: default the config's ``seed``.
        crosssite: modes whose cross-site matrix is scored; default the default strategy and
            ``local`` (those of them that run).
        new_site_cases: k for the held-out site (:mod:`simulations.new_site`), joined to the
            default strategy's model of every seed
            (:func:`simulations.new_site.federation_checkpoint`); empty: skipped (also when
            the default strategy is not run or shares nothing).
        new_site_epochs: fine-tuning epochs of the new site (default 20).
        goals_file: JSON/YAML goal thresholds of a skewed federation (default None:
            :data:`simulations.compare.skewed.DEFAULT_GOALS`).
        criteria_file: JSON/YAML criteria of the equal-site goals (default None:
            :data:`simulations.compare.goals.DEFAULT_CRITERIA`).
    """
    return run_plan(make_plan(overrides, modes, seeds, crosssite, new_site_cases,
                              new_site_epochs, goals_file, criteria_file))


def run_plan(plan: Plan) -> Path:
    """Run a checked plan (:func:`make_plan`) and write the report; returns
    ``comparison.json``'s path."""
    base, name = plan.base, plan.name
    out = workspace.project_root(base) / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    got = _Collected(plan.modes, plan.crosssite)
    for seed in plan.seeds:
        for mode in plan.modes:
            _run_and_score(plan, got, mode, seed)
    summary = summarise(
        name=name, default=plan.default, modes=plan.modes, seeds=plan.seeds, sites=got.sites,
        overrides=list(plan.overrides), test_cases=got.test_cases,
        budget={"rounds": int(base.fl.rounds), "local_epochs": int(base.fl.local_epochs)},
        rows=got.rows, cross_rows=got.cross_rows, new_site=pool_new_site(got.new_site_results),
        seconds=got.seconds, bytes_by_mode=got.bytes_by_mode, check=got.check,
        convergence=convergence_lines(got.histories),
        train_cases=got.train_cases.get(str(plan.seeds[0]), {}), steps=got.steps,
        goal_thresholds=plan.goals, criteria=plan.criteria)
    if any(v != summary["train_cases"] for v in got.train_cases.values()):
        summary["train_cases_by_seed"] = got.train_cases  # the seeds' splits differ in size
    for mode in plan.modes:  # the time per mode, all seeds
        total = sum(v["run"] + v["scoring"] for v in got.seconds[mode].values())
        print(f"[compare] {mode}: {total:.0f} s over {len(got.seconds[mode])} seed(s)",
              flush=True)
    json_path, artifacts = write_report(out, summary, got.rows, got.cross_rows,
                                        summary.pop("_new_site_rows"))
    log_tracking(base, name, summary, artifacts)
    return json_path

