"""The command line: ``python -m simulations.compare [--seeds 0,1,2] [--modes a,b]
[--criteria FILE] [--goals FILE] [hydra overrides...]``, ``--merge FILES`` and ``--report
PATH``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from m4fuse.run import settings, workspace
from simulations.compare.goals import load_criteria
from simulations.compare.merge import merge_comparisons
from simulations.compare.report import report_text
from simulations.compare.run import make_plan, run_plan


def _list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.compare",
        description="Run pooled, local and federated modes on several seeds and compare them "
                    "case by case (mean ± sd over seeds, paired Wilcoxon tests, cross-site "
                    "matrix, a held-out new site). Writes comparison.{md,png,json} and "
                    "crosssite.png into <root>/runs/<run_name or 'compare'>/.",
        epilog="Example: python -m simulations.compare --seeds 0,1,2 --modes "
               "pooled,local,fedavg,personal fl.rounds=10")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (default: the config's seed)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated modes: pooled, local, any fl.strategy, or "
                             "<strategy>-dp (default: pooled,local,fedavg and the default "
                             "strategy); NAME=MODE:OVERRIDE[;OVERRIDE...] runs MODE with "
                             "those Hydra overrides as NAME, e.g. "
                             "steps4=personal-norm-ft:fl.local_steps=4")
    parser.add_argument("--goals", default=None,
                        help="JSON or YAML file of goal thresholds of a skewed federation "
                             "(keys of simulations/compare/criteria/skewed.yaml; default: "
                             "those)")
    parser.add_argument("--criteria", default=None, metavar="FILE",
                        help="JSON or YAML file of the criteria of the goals of equal sites "
                             "(keys of simulations/compare/criteria/default.yaml; default: "
                             "those); also with --merge")
    parser.add_argument("--crosssite", default=None,
                        help="modes whose cross-site matrix is scored, or 'none' (default: the "
                             "default strategy and local)")
    parser.add_argument("--new-site-cases", default="2,5,all",
                        help="k training cases of the held-out new site joined to the default "
                             "strategy's model, or 'none' (default 2,5,all)")
    parser.add_argument("--new-site-epochs", type=int, default=20,
                        help="fine-tuning epochs of the new site (default 20)")
    parser.add_argument("--merge", default=None,
                        help="comma-separated comparison.json files of the same settings to "
                             "join into one report (no training; e.g. seed 0 of one run and "
                             "seeds 1,2 of another); FILE#SUFFIX renames that file's modes "
                             "<mode>SUFFIX and lets its overrides differ (e.g. "
                             "runs/m/comparison.json#+fedavgm); written to <root>/runs/"
                             "<run_name or 'merged'>/")
    parser.add_argument("--report", default=None, metavar="PATH",
                        help="print the Markdown report of a written comparison.json (e.g. "
                             "runs/X/comparison.json) to stdout and exit: no training, no "
                             "files written; the report starts with the command, date and "
                             "code version that made it")
    parser.add_argument("--default", default=None,
                        help="with --merge: the mode tested against fedavg and local (default: "
                             "the first file's default strategy)")
    parser.add_argument("--against", default="",
                        help="with --merge: comma-separated modes the default is also tested "
                             "against (besides fedavg and local)")
    parser.add_argument("--fedavg", default="fedavg",
                        help="with --merge: the mode that stands for FedAvg in the tests and "
                             "goals (default fedavg; e.g. fedavg+none when its files carry a "
                             "suffix)")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for every run, e.g. fl.rounds=10 data.sites=4")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; flags and Hydra overrides may come in any order (``--seeds 0
    fl.rounds=60 --modes fedavg run_name=x``: a plain ``parse_args`` stops the overrides at
    the first flag and refuses the rest)."""
    return build_parser().parse_intermixed_args(argv)


def _merge(args: argparse.Namespace) -> int:
    """``--merge``: join the comparisons into ``<root>/runs/<run_name or 'merged'>/``."""
    try:
        criteria = load_criteria(args.criteria)
    except ValueError as err:
        raise SystemExit(f"simulations.compare: error: {err}") from None
    base = settings.compose("config", list(args.overrides))
    name = str(base.run_name) if base.run_name else "merged"
    try:
        merge_comparisons(_list(args.merge), workspace.project_root(base) / "runs" / name,
                          name, default=args.default, against=_list(args.against),
                          fedavg=args.fedavg, criteria=criteria)
    except ValueError as err:
        raise SystemExit(f"--merge: {err}") from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.compare [--seeds 0,1,2] [--modes a,b] [hydra overrides...]``;
    returns 0 (a bad setting exits in one line before any training)."""
    from m4fuse.run.config_check import debug_enabled
    from simulations.new_site import parse_cases

    args = parse_args(argv)
    if args.report:
        try:
            sys.stdout.write(report_text(args.report))
        except ValueError as err:
            raise SystemExit(f"--report: {err}") from None
        return 0
    if args.merge:
        return _merge(args)
    try:
        seeds = [int(s) for s in _list(args.seeds)] if args.seeds else None
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    modes = _list(args.modes) if args.modes else None
    crosssite = None if args.crosssite is None else (
        [] if args.crosssite == "none" else _list(args.crosssite))
    cases = [] if args.new_site_cases in ("", "none") else parse_cases(args.new_site_cases)
    try:  # every setting, the goal files and the new site are checked before any training
        plan = make_plan(args.overrides, modes, seeds, crosssite, cases, args.new_site_epochs,
                         args.goals, args.criteria)
    except (ValueError, FileNotFoundError) as err:
        if debug_enabled():
            raise
        raise SystemExit(f"simulations.compare: error: {str(err).strip().splitlines()[0]}"
                         ) from None
    run_plan(plan)
    return 0


