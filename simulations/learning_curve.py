"""The synthetic task's learning curve: a pooled model's test Dice against the number of
training cases.

``python -m simulations.learning_curve --cases 1,3,10,30,100 [--seeds 0] [--test-cases 30]
[--val-cases 5] [--steps S] [--out JSON] [hydra overrides...]`` generates one synthetic
site of the reference scanner (site 0's acquisition, the high-grade case mix) holding
``max(cases) + val-cases`` cases besides ``test-cases`` test cases (``data.sites=1``,
``data.site_sizes``, ``data.test_cases_per_site``), shuffles its non-test cases once per seed,
keeps the first ``val-cases`` for validation and trains the pooled baseline
(:func:`m4fuse.training.baselines.run_baseline`, the same trainer, loss, optimiser and budget as the
comparison's) on the first N of the rest for each N: nested training sets, one fixed test
set. The budget is the config's ``fl.rounds`` x ``fl.local_epochs`` epochs (as the
comparison trains), or with ``--steps S`` about S optimiser steps at every N (the epochs per
round raised so that small sets train as many steps as large ones). Writes the points to a
JSON (default ``<root>/runs/learning-curve/learning_curve.json``).

``python -m simulations.learning_curve --report JSON [--png PNG]`` prints the Markdown table
(mean +- sd over seeds per N, the command, date and code version, the ratio to the
published BraTS curve) and writes the plot (default: beside the JSON, ``.png``).

``python -m simulations.learning_curve --join A.json,B.json --out JSON`` joins curves of other
seeds, trained with the same cases, test and validation counts, steps and overrides, into one
JSON (each source's command, date, code version and seeds kept); trains nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulations.curve_plot import dice_axes, page_plot_link, save_dice_plot

#: Published reference: a BraTS 2021 study (arXiv 2602.08797) reports validation Dice 0.39
#: with 10 % of the training data and 0.87 with all of it.
PUBLISHED_TENTH = (0.39, 0.87)
DICE_KEYS: tuple[str, ...] = ("dice_mean", "dice_wt", "dice_tc", "dice_et")


def parse_cases(text: str) -> list[int]:
    """``"1,3,10"`` -> ``[1, 3, 10]``: distinct integers >= 1, sorted."""
    try:
        cases = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--cases must be comma-separated integers, got {text!r}") from None
    if not cases or cases[0] < 1:
        raise ValueError(f"--cases must be integers >= 1, got {text!r}")
    return cases


def curve_overrides(max_cases: int, val_cases: int, test_cases: int) -> list[str]:
    """The data overrides of the curve's one reference-scanner site (after the user's)."""
    return ["data.sites=1", f"data.site_sizes=[{max_cases + val_cases}]",
            f"data.test_cases_per_site={test_cases}", "data.val_fraction=0.0",
            "data.site_names=null", "data.lower_grade_sites=[]"]


def nested_subsets(pool: Sequence[Any], cases: Sequence[int], val_cases: int, seed: int
                   ) -> tuple[list[Any], dict[int, list[Any]]]:
    """``(validation, {N: training})``: ``pool`` shuffled by ``seed``; the first
    ``val_cases`` validate, the first N of the rest train (each set contains the smaller)."""
    if len(pool) < max(cases) + val_cases:
        raise ValueError(f"the site holds {len(pool)} non-test cases, fewer than "
                         f"{max(cases)} + {val_cases} validation")
    order = [pool[i] for i in np.random.default_rng([seed, 31337]).permutation(len(pool))]
    val, rest = order[:val_cases], order[val_cases:]
    return val, {n: rest[:n] for n in cases}


def epochs_for_steps(steps: int, cases: int, batch_size: int, rounds: int) -> int:
    """Epochs per round so that ``rounds`` rounds of ``cases`` cases make at least ``steps``
    optimiser steps (``ceil(cases / batch_size)`` per epoch); at least 1."""
    per_epoch = math.ceil(cases / batch_size)
    return max(1, math.ceil(steps / (per_epoch * rounds)))


def code_version(root: Path) -> str:
    """``git describe`` of the checkout (``-dirty`` with local changes), else ``unknown``."""
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_curve(cases: Sequence[int], seeds: Sequence[int], overrides: Sequence[str],
              test_cases: int = 30, val_cases: int = 5, steps: int | None = None,
              out: Path | None = None, argv: Sequence[str] = ()) -> Path:
    """Train the pooled model on each N of ``cases`` for each seed; write the JSON, return
    its path. ``test_cases`` (default 30) and ``val_cases`` (default 5) are fixed per seed;
    ``steps`` (default None: the config's epochs) gives every N about that many steps."""
    from m4fuse.run import provision, settings, workspace
    from m4fuse.training.baselines import run_baseline

    data = curve_overrides(max(cases), val_cases, test_cases)
    base = settings.compose("config", [*overrides, *data])
    root = workspace.project_root(base)
    out = out or root / "runs" / "learning-curve" / "learning_curve.json"
    points: list[dict[str, Any]] = []
    for seed in seeds:
        cfg = settings.compose("config", [*overrides, *data, f"seed={seed}"])
        split = provision.load_sites(cfg)
        (site, parts), = split.items()
        val, train_sets = nested_subsets(parts["train"], cases, val_cases, seed)
        for n, train in train_sets.items():
            extra = [f"seed={seed}", f"run_name=learning-curve-n{n}-seed{seed}"]
            if steps is not None:
                extra.append("fl.local_epochs=" + str(epochs_for_steps(
                    steps, n, int(base.train.batch_size), int(base.fl.rounds))))
            run_cfg = settings.compose("config", [*overrides, *data, *extra])
            summary = run_baseline(run_cfg, "pooled",
                                   split={site: {"train": train, "val": val, "test": parts["test"]}})
            row = summary.rows[0]
            epochs = int(run_cfg.fl.rounds) * int(run_cfg.fl.local_epochs)
            points.append({
                "cases": n, "seed": seed, "seconds": summary.seconds, "epochs": epochs,
                "steps": epochs * math.ceil(n / int(run_cfg.train.batch_size)),
                "test": {k: row.get(f"test_{k}") for k in DICE_KEYS},
                "train_cases": [r.case_id for r in train],
            })
            print(f"learning curve: {n} training case(s), seed {seed}: test mean Dice "
                  f"{row.get('test_dice_mean', float('nan')):.3f} ({summary.seconds:.0f} s)",
                  flush=True)
    payload = {
        "command": "python -m simulations.learning_curve " + " ".join(shlex.quote(a) for a in argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "code_version": code_version(Path(__file__).resolve().parents[1]),
        "cases": list(cases), "seeds": list(seeds), "test_cases": test_cases,
        "val_cases": val_cases, "steps": steps, "overrides": list(overrides),
        "points": points,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return out


#: The keys two learning-curve JSONs must share to be joined.
JOIN_KEYS: tuple[str, ...] = ("cases", "test_cases", "val_cases", "steps", "overrides")


def _sources(payload: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """The runs a curve JSON holds: its own ``sources`` (a joined one), else itself."""
    if payload.get("sources"):
        return [dict(s) for s in payload["sources"]]
    return [{"file": name, "command": payload["command"], "date": payload["date"],
             "code_version": payload["code_version"],
             "seeds": sorted({int(p["seed"]) for p in payload["points"]})}]


def join_curves(payloads: Sequence[tuple[str, Mapping[str, Any]]], argv: Sequence[str] = ()
                ) -> dict[str, Any]:
    """One curve of the points of ``payloads`` (``(file name, learning-curve JSON)`` pairs,
    at least two); each source's command, date, code version and seeds are kept in
    ``sources``. Fails naming the file and key when they were not trained alike, and naming
    both files when an (N, seed) point comes twice."""
    if len(payloads) < 2:
        raise ValueError(f"--join needs at least two JSONs, got {[n for n, _ in payloads]}")
    first_name, first = payloads[0]
    seen: dict[tuple[int, int], str] = {}
    points: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    for name, payload in payloads:
        for key in JOIN_KEYS:
            if payload.get(key) != first.get(key):
                raise ValueError(f"--join: {name} has {key}={payload.get(key)!r}, "
                                 f"{first_name} {first.get(key)!r}; join curves trained alike")
        for point in payload["points"]:
            at = (int(point["cases"]), int(point["seed"]))
            if at in seen:
                raise ValueError(f"--join: N={at[0]} seed {at[1]} is in both {seen[at]} and "
                                 f"{name}; leave one of them out")
            seen[at] = name
            points.append(dict(point))
        sources += _sources(payload, name)
    points.sort(key=lambda p: (int(p["seed"]), int(p["cases"])))
    return {
        "command": "python -m simulations.learning_curve " + " ".join(shlex.quote(a) for a in argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "code_version": code_version(Path(__file__).resolve().parents[1]),
        **{key: first.get(key) for key in JOIN_KEYS},
        "seeds": sorted({s for _, s in seen}), "sources": sources, "points": points,
    }


def curve_table(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per N: mean and sd over seeds of each Dice key (``None`` where no seed has it)."""
    rows = []
    for n in sorted({int(p["cases"]) for p in payload["points"]}):
        pts = [p for p in payload["points"] if int(p["cases"]) == n]
        row: dict[str, Any] = {"cases": n, "seeds": len(pts),
                               "steps": int(np.mean([p["steps"] for p in pts]))}
        for key in DICE_KEYS:
            values = [float(p["test"][key]) for p in pts if p["test"].get(key) is not None]
            row[key] = (float(np.mean(values)), float(np.std(values))) if values else None
        rows.append(row)
    return rows


def report_markdown(payload: Mapping[str, Any], image: str | None = None) -> str:
    """The results page of a learning-curve JSON: the table, with the command, date, code
    version and the comparison with the published BraTS curve; ``image`` (default none): the
    plot's link."""
    rows = curve_table(payload)

    def cell(value: tuple[float, float] | None) -> str:
        return "-" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"

    lines = [
        "# Learning curve of the synthetic task", "",
        *([f"![test Dice against training cases]({image})", ""] if image else []),
        "| training cases | seeds | steps | test mean Dice | WT | TC | ET |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['cases']} | {r['seeds']} | {r['steps']} | {cell(r['dice_mean'])} | "
          f"{cell(r['dice_wt'])} | {cell(r['dice_tc'])} | {cell(r['dice_et'])} |" for r in rows),
        "",
        *(f"Seeds {src['seeds']}: `{src['command']}`; {src['date']}; code "
          f"{src['code_version']}." for src in payload.get("sources", [])),
        (f"{'Joined by' if payload.get('sources') else 'Command:'} `{payload['command']}`; "
         f"{payload['date']}; code {payload['code_version']}. "
         f"Fixed test set of {payload['test_cases']} cases and {payload['val_cases']} validation "
         "cases per seed; nested training sets; mean ± sd over seeds."),
    ]
    largest = rows[-1]
    tenth = min(rows, key=lambda r: abs(r["cases"] - largest["cases"] / 10))
    if largest["dice_mean"] and tenth["dice_mean"] and tenth is not largest:
        ratio = tenth["dice_mean"][0] / largest["dice_mean"][0]
        pub = PUBLISHED_TENTH[0] / PUBLISHED_TENTH[1]
        lines.append(
            f"At {tenth['cases']} of {largest['cases']} cases the test mean Dice is "
            f"{ratio:.2f} of the largest set's ({tenth['dice_mean'][0]:.3f} / "
            f"{largest['dice_mean'][0]:.3f}); a published BraTS 2021 curve (arXiv 2602.08797) "
            f"has {PUBLISHED_TENTH[0]} at 10 % of the data against {PUBLISHED_TENTH[1]} at "
            f"100 %, a ratio of {pub:.2f}.")
    return "\n".join(lines)


def plot_curve(payload: Mapping[str, Any], path: Path) -> Path:
    """Test Dice (mean and each region, mean ± sd over seeds) against training cases, log x."""
    rows = curve_table(payload)
    fig, ax = dice_axes()
    for key, style in zip(DICE_KEYS, ("o-", "s--", "^--", "v--")):
        pts = [(r["cases"], *r[key]) for r in rows if r[key] is not None]
        if pts:
            x, m, s = (np.array(v) for v in zip(*pts))
            ax.errorbar(x, m, yerr=s, fmt=style, capsize=3, label=key.replace("dice_", "").upper()
                        if key != "dice_mean" else "mean")
    ax.set_xscale("log")
    ax.set_xticks([r["cases"] for r in rows], [str(r["cases"]) for r in rows])
    ax.minorticks_off()
    return save_dice_plot(fig, ax, path, "training cases", "test Dice",
                          "Synthetic task: pooled model, reference-scanner mix")


def read_curve(path: Path) -> dict[str, Any]:
    """A learning-curve JSON, or a one-line error naming the file."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("points"), list):
        raise ValueError(f"{path} is not a learning-curve JSON (no 'points' list)")
    return payload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.learning_curve",
        description="Test Dice of a pooled model against its number of training cases.",
        epilog="Example: python -m simulations.learning_curve --cases 1,3,10,30,100 fl.rounds=60")
    parser.add_argument("--cases", default="1,3,10,30,100",
                        help="training-set sizes, comma-separated (default 1,3,10,30,100)")
    parser.add_argument("--seeds", default="0", help="seeds, comma-separated (default 0)")
    parser.add_argument("--test-cases", type=int, default=30, help="fixed test cases (default 30)")
    parser.add_argument("--val-cases", type=int, default=5, help="validation cases (default 5)")
    parser.add_argument("--steps", type=int, default=None,
                        help="about this many optimiser steps at every N (default: the config's "
                             "fl.rounds x fl.local_epochs epochs)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="print the Markdown table of a written JSON and plot it; trains nothing")
    parser.add_argument("--join", default=None, metavar="A.json,B.json",
                        help="join curves of other seeds into --out (required); trains nothing")
    parser.add_argument("--png", type=Path, default=None, help="with --report: the plot (default: beside the JSON)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. fl.rounds=60")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.report is not None:
            payload = read_curve(args.report)
            print(report_markdown(payload, page_plot_link(args.report)))
            png = plot_curve(payload, args.png or args.report.with_suffix(".png"))
            print(f"plot: {png}", file=sys.stderr)
            return 0
        if args.join is not None:
            if args.out is None:
                raise ValueError("--join needs --out, the joined JSON to write")
            files = [Path(f) for f in args.join.split(",") if f.strip()]
            if args.out.resolve() in {f.resolve() for f in files}:
                raise ValueError(f"--out {args.out} is one of the --join inputs; name a new file")
            joined = join_curves([(str(f), read_curve(f)) for f in files], argv)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(joined, indent=1) + "\n")
            print(f"wrote {args.out}")
            return 0
        cases = parse_cases(args.cases)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if args.test_cases < 1 or args.val_cases < 1:
            raise ValueError(f"--test-cases and --val-cases must be >= 1, got "
                             f"{args.test_cases}, {args.val_cases}")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        out = run_curve(cases, seeds, args.overrides, args.test_cases, args.val_cases, args.steps,
                        args.out, argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
