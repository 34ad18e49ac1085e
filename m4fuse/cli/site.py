"""``m4fuse site join``: a hospital that joins a finished federation later.

It loads the federation's model, adds a fresh expert for itself (``model.add_expert()``, which
starts as the shared model), fine-tunes only that expert (and the non-expert part of the
federation's personal set, e.g. norm layers, which start from the mean of the sites' own;
:mod:`m4fuse.personal.sets`) on k of its own training cases with the shared weights frozen, scores
the shared model alone and the fine-tuned one on
its test cases, and writes a checkpoint holding its expert (usable with ``m4fuse segment
--site NAME``). The work is done by :func:`m4fuse.personal.new_site.join_site`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    site = sub.add_parser("site", help="a hospital joining the federation later")
    actions = site.add_subparsers(dest="site_command", metavar="ACTION", required=True)
    join = actions.add_parser(
        "join", help="fine-tune a fresh expert for a new site on its own cases (shared frozen)",
        description=__doc__.splitlines()[0])
    join.add_argument("--model", required=True,
                      help="the federation's model.ckpt (or the run folder holding it)")
    join.add_argument("--data", required=True,
                      help="the site's prepared cache folder (m4fuse data prepare)")
    join.add_argument("--site", required=True, help="the new site's name (no expert yet)")
    join.add_argument("--cases", default="all",
                      help="training cases to fine-tune on: a number or 'all' (default all)")
    join.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (default 20)")
    join.add_argument("--expert-init", choices=("fresh", "mean"), default="fresh",
                      help="the new expert's start: fresh (contributes nothing at first) or "
                           "mean (the sites' experts averaged, case-weighted); default fresh")
    join.add_argument("--partition-csv", default=None,
                      help="site of each case (FeTS-style CSV); default: the site recorded "
                           "in the cache, else the institution token of the case ids")
    join.add_argument("--out", default=None,
                      help="checkpoint to write (default: <model folder>/model-<site>.ckpt)")
    join.add_argument("--json", default=None, help="per-case scores as JSON (default: none)")
    join.add_argument("overrides", nargs="*",
                      help="Hydra overrides for the training settings and the split, e.g. "
                           "train.lr=0.003 seed=1 data.test_fraction=0.5")
    join.set_defaults(func=run_join)


def run_join(args: argparse.Namespace) -> int:
    """Translate the arguments into :func:`m4fuse.personal.new_site.join_site`; bad input -> one line
    on stderr naming the option and value, exit code 2."""
    try:
        return _join(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"m4fuse site join: error: {err}", file=sys.stderr)
        return 2


def _join(args: argparse.Namespace) -> int:
    from m4fuse.evaluation.stats import case_score, mean_sd, paired_test
    from m4fuse.io.checkpoint import load_checkpoint, resolve_checkpoint_path
    from m4fuse.personal.new_site import check_cases, join_site
    from m4fuse.run import provision, runtime, settings

    cfg = settings.compose("config", list(args.overrides))
    data = Path(args.data)
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder (a prepared cache is expected)")
    split = provision.split_prepared(cfg, data, args.partition_csv)
    print(provision.split_rule(cfg))
    if args.site not in split:
        raise ValueError(f"--site {args.site!r}: no such site in {data} (sites: {sorted(split)})")
    records = split[args.site]
    check_cases(args.cases, len(records["train"]), args.site)  # before loading the model
    model_path = resolve_checkpoint_path(args.model)
    out = Path(args.out) if args.out else model_path.parent / f"model-{args.site}.ckpt"
    runtime.apply_threads(cfg)
    result = join_site(load_checkpoint(model_path), records["train"], records["test"],
                       args.site, cfg, cases=args.cases, epochs=args.epochs, seed=int(cfg.seed),
                       out=out, expert_init=args.expert_init)
    shared = [case_score(r) for r in result.shared_rows]
    tuned = [case_score(r) for r in result.tuned_rows]
    test = paired_test(tuned, shared)
    p = "n/a" if test["p"] is None else f"{test['p']:.3g}"
    print(f"site {args.site}: fine-tuned {len(result.trained)} tensors on {result.cases} "
          f"training case(s), {args.epochs} epochs (shared weights unchanged: "
          f"{result.frozen_unchanged}; layers from the {result.start['layers']}, expert "
          f"{result.start['expert']})\n"
          f"test Dice over {len(tuned)} cases: shared model alone {mean_sd(shared)[0]:.3f}, "
          f"with its fine-tuned expert {mean_sd(tuned)[0]:.3f} (paired Wilcoxon p {p})\n"
          f"checkpoint: {result.checkpoint}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"site": args.site, "cases": result.cases, "epochs": args.epochs,
             "shared": result.shared_rows, "fine-tuned": result.tuned_rows, "test": test},
            indent=1))
    return 0
