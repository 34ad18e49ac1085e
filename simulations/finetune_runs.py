"""Fine-tune the finished runs of a comparison offline and compare the result as a new mode.

``python -m simulations.finetune_runs --comparison <root>/runs/<name>/comparison.json
--mode fedavg --set all [--epochs 5] [hydra overrides...]``

For every seed of ``--mode`` in the comparison it reads that run's folder
``<root>/runs/<name>-<mode>-seed<seed>`` (``name``: the comparison's ``summary.name``; ``root``
from the config composed as the comparison's runs were: its ``summary.overrides``, the
mode's ``fl.strategy``, ``seed=<seed>``, then the command line's overrides), builds each
site's final model from it exactly as the comparison scored it
(:func:`simulations.compare.site_models`), fine-tunes the personal set ``--set``
(:data:`m4fuse.personal.sets.PERSONAL_SETS`; ``all``: the whole model, the federated model as the
initialisation) on the site's training cases with
:func:`m4fuse.personal.finetune.finetune_best_epoch` (its validation cases choose the epoch, epoch 0
= no fine-tuning; the seed is the ClientApp's, :func:`m4fuse.personal.finetune.finetune_seed`),
and scores the site's test cases with :func:`m4fuse.evaluation.crosssite.score_cases`.

The rows become the mode ``<mode>+ft-<set>`` (e.g. ``fedavg+ft-all``), and a new comparison
is written into ``<root>/runs/<name>+ft-<set>/`` (``comparison.json/.md/.png``, as
:mod:`simulations.compare`): the original modes and rows plus the new mode, with the new mode
as the default strategy (the paired Wilcoxon tests and the goals are of it against
``fedavg`` and ``local``). The cross-site rows and the new-site results are kept as they
were; the per-site fine-tuning metrics are in ``summary.finetune``. The fine-tuned models
are not written (only their scores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m4fuse.evaluation.crosssite import SCORE_KEYS, score_cases
from m4fuse.personal import finetune as personal_finetune
from m4fuse.personal.sets import PERSONAL_SETS
from m4fuse.run import provision, runtime, settings, workspace

#: ``--set`` values: every personal set except ``none`` (fine-tuning nothing).
FINETUNE_SETS: tuple[str, ...] = tuple(s for s in PERSONAL_SETS if s != "none")


def _nan(value: Any) -> Any:
    return float("nan") if value is None else value


def load_comparison(path: Path) -> dict[str, Any]:
    """``comparison.json`` read and checked (a missing file or key fails naming it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--comparison: no comparison file at {path}")
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--comparison: cannot read {path}: {err}") from None
    if not isinstance(payload, dict) or "summary" not in payload or "rows" not in payload:
        raise ValueError(f"--comparison: {path} holds no 'rows' and 'summary'")
    for key in ("name", "modes", "seeds", "sites", "overrides", "default_strategy"):
        if key not in payload["summary"]:
            raise ValueError(f"--comparison: {path} has no summary.{key}")
    return payload


def mode_name(mode: str, personal: str) -> str:
    """The new mode's name: ``<mode>+ft-<set>``."""
    return f"{mode}+ft-{personal}"


def seed_config(summary: Mapping[str, Any], mode: str, seed: int,
                overrides: Sequence[str]) -> Any:
    """The config of ``mode``'s run at ``seed``, as the comparison composed it (its
    overrides, the mode's strategy, the seed), then the command line's ``overrides``."""
    from simulations.compare import known_modes, mode_overrides

    strategy = mode_overrides(mode) if mode in known_modes() else []
    return settings.compose("config", [*summary["overrides"], *strategy, f"seed={seed}",
                                       *overrides])


def finetune_seed_run(summary: Mapping[str, Any], mode: str, seed: int, personal: str,
                      epochs: int | None, overrides: Sequence[str]
                      ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]], float]:
    """Fine-tune and score every site's final model of ``mode`` at ``seed``: ``(per-case rows
    of the new mode, {site: fine-tuning metrics}, seconds)``."""
    from simulations.compare import site_models

    start = time.perf_counter()
    cfg = seed_config(summary, mode, seed, overrides)
    run_dir = workspace.project_root(cfg) / "runs" / f"{summary['name']}-{mode}-seed{seed}"
    if not run_dir.is_dir():
        raise ValueError(f"run folder of {mode} seed {seed} missing: {run_dir}")
    split = provision.load_sites(cfg)
    names = provision.site_names(split)
    sites = list(summary["sites"])
    unknown = [s for s in sites if s not in split]
    if unknown:
        raise ValueError(f"summary.sites {unknown} are not in the data split {names} of seed "
                         f"{seed} (were the overrides those of the comparison?)")
    epochs = int(cfg.fl.finetune_epochs) if epochs is None else int(epochs)
    device = runtime.resolve_device(str(cfg.device))
    runtime.apply_threads(cfg)
    models = site_models(mode, cfg, run_dir, sites)
    new_mode = mode_name(mode, personal)
    rows: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, float]] = {}
    for site, (model, expert) in models.items():
        if expert is None:
            raise ValueError(f"{run_dir}: site {site!r} has no expert in the run's model; "
                             "cannot fine-tune it as the ClientApp would")
        records = split[site]
        tuned = personal_finetune.finetune_best_epoch(
            model, records["train"], records["val"], expert, cfg, device, personal=personal,
            epochs=epochs, seed=personal_finetune.finetune_seed(int(cfg.seed), names.index(site)))
        model.eval()
        rows += [{"mode": new_mode, "seed": seed, "site": site, **r}
                 for r in score_cases(model, expert, records["test"], device)]
        metrics[site] = tuned
        print(f"[finetune] {mode} seed {seed} {site}: kept epoch "
              f"{int(tuned['finetune-epochs-kept'])}/{epochs}, validation Dice "
              f"{tuned['finetune-val-before']:.4f} -> {tuned['finetune-val-after']:.4f}",
              flush=True)
    return rows, metrics, time.perf_counter() - start


def _load_request(comparison: Path, mode: str, personal: str, epochs: int | None
                  ) -> tuple[dict[str, Any], str, list[int]]:
    """The comparison ``comparison`` loaded, the new mode's name and the seeds ``mode`` ran
    in it; a bad ``--set``, ``--epochs`` or ``--mode`` fails naming it."""
    if personal not in FINETUNE_SETS:
        raise ValueError(f"--set must be one of {list(FINETUNE_SETS)}, got {personal!r}")
    if epochs is not None and int(epochs) < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    payload = load_comparison(comparison)
    summary = payload["summary"]
    if mode not in summary["modes"]:
        raise ValueError(f"--mode {mode!r} is not among summary.modes {summary['modes']} of "
                         f"{comparison}")
    new_mode = mode_name(mode, personal)
    if new_mode in summary["modes"]:
        raise ValueError(f"{comparison} already has the mode {new_mode!r}")
    seeds = [int(s) for s in summary["seeds"]
             if any(r["mode"] == mode and int(r["seed"]) == int(s) for r in payload["rows"])]
    if not seeds:
        raise ValueError(f"{comparison} has no rows of mode {mode!r}")
    return payload, new_mode, seeds


def finetune_comparison(comparison: Path, mode: str, personal: str, epochs: int | None = None,
                        overrides: Sequence[str] = ()) -> Path:
    """Add ``<mode>+ft-<personal>`` to the comparison ``comparison`` (see the module
    docstring) and write the new comparison; returns its ``comparison.json``."""
    from simulations.compare import summarise, write_report

    payload, new_mode, seeds = _load_request(comparison, mode, personal, epochs)
    summary = payload["summary"]
    base = settings.compose("config", [*summary["overrides"], *overrides])
    name = f"{summary['name']}+ft-{personal}"
    out = workspace.project_root(base) / "runs" / name

    rows = [{k: (_nan(v) if k in SCORE_KEYS else v) for k, v in r.items()}
            for r in payload["rows"]]
    tuned: dict[str, dict[str, dict[str, float]]] = {}
    seconds = {m: dict(v) for m, v in summary.get("seconds", {}).items()}
    seconds[new_mode] = {}
    for seed in seeds:
        new_rows, metrics, took = finetune_seed_run(summary, mode, seed, personal, epochs,
                                                    overrides)
        rows += new_rows
        tuned[str(seed)] = metrics
        seconds[new_mode][str(seed)] = {"run": took, "scoring": 0.0}
    cross_rows: dict[str, list[dict[str, Any]]] = {}
    for r in payload.get("crosssite_rows", []):
        r = dict(r)
        cross_rows.setdefault(r.pop("mode"), []).append(
            {k: (_nan(v) if k in SCORE_KEYS else v) for k, v in r.items()})
    new_site = summary.get("new_site")
    if new_site:
        new_site = {**new_site, "rows": payload.get("new_site_rows", [])}
    bytes_by_mode = dict(summary.get("bytes", {}))
    bytes_by_mode[new_mode] = list(bytes_by_mode.get(mode, []))
    new_summary = summarise(
        name=name, default=new_mode, modes=[*summary["modes"], new_mode],
        seeds=[int(s) for s in summary["seeds"]], sites=summary["sites"],
        overrides=summary["overrides"], test_cases=summary.get("test_cases", {}),
        budget=summary.get("budget", {"rounds": 0, "local_epochs": 0}), rows=rows,
        cross_rows=cross_rows, new_site=new_site, seconds=seconds,
        bytes_by_mode=bytes_by_mode, check=summary.get("check", {}),
        convergence=summary.get("convergence", []))
    new_summary["finetune"] = {
        "from": str(comparison), "from_default_strategy": summary["default_strategy"],
        "mode": mode, "set": personal, "new_mode": new_mode,
        "epochs": None if epochs is None else int(epochs), "overrides": list(overrides),
        "by_seed": tuned}
    json_path, _ = write_report(out, new_summary, rows, cross_rows,
                                new_summary.pop("_new_site_rows"))
    with open(out / "comparison.md", "a") as handle:
        handle.write("\n".join(finetune_lines(new_summary["finetune"])) + "\n")
    return json_path


def finetune_lines(info: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the offline fine-tuning: per seed and site the kept epoch and the
    validation mean Dice before/after."""
    lines = ["", (f"Offline fine-tuning (`simulations.finetune_runs`): `{info['new_mode']}` = "
                  f"each site's final `{info['mode']}` model with its personal set "
                  f"`{info['set']}` fine-tuned on its training cases (best epoch by its "
                  f"validation cases; epoch 0 = no fine-tuning), from `{info['from']}` (whose "
                  f"default strategy was `{info['from_default_strategy']}`)."), "",
             "| seed | site | epochs kept / run | val Dice before | val Dice after |",
             "|---|---|---|---|---|"]
    for seed, by_site in info["by_seed"].items():
        for site, m in by_site.items():
            lines.append(f"| {seed} | {site} | {int(m['finetune-epochs-kept'])} / "
                         f"{int(m['finetune-epochs'])} | {m['finetune-val-before']:.4f} | "
                         f"{m['finetune-val-after']:.4f} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.finetune_runs",
        description="Fine-tune each site's final model of one mode of a finished comparison "
                    "(best epoch by its validation cases) and write a new comparison with "
                    "the mode <mode>+ft-<set> as its default strategy into "
                    "<root>/runs/<name>+ft-<set>/.",
        epilog="Example: python -m simulations.finetune_runs --comparison "
               "runs/compare/comparison.json --mode fedavg --set all --epochs 5")
    parser.add_argument("--comparison", required=True, help="a comparison.json")
    parser.add_argument("--mode", required=True, help="the mode whose runs are fine-tuned")
    parser.add_argument("--set", dest="personal", default="all",
                        help=f"personal set fine-tuned, one of {', '.join(FINETUNE_SETS)} "
                             "(default all: the whole model)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs (default: fl.finetune_epochs of the config)")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides after the comparison's own (e.g. root=..., "
                             "fl.personal_lr_scale=0.1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (flags and Hydra overrides in any order)."""
    args = build_parser().parse_intermixed_args(argv)
    try:
        path = finetune_comparison(Path(args.comparison), args.mode, args.personal,
                                   args.epochs, args.overrides)
    except ValueError as err:
        raise SystemExit(f"finetune_runs: {err}") from None
    print(f"[finetune] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
