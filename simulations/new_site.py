"""A held-out fifth site that never trained joins a finished federation.

``python -m simulations.new_site --model runs/<run>/model.ckpt [--cases 2,5,all]
[--epochs 20] [hydra overrides...]``: the synthetic set of the composed config is generated
with one site more (``data.sites + 1``; the extra site has its own scanner, see
:func:`m4fuse.data.synth.site_acquisition`); that site's training cases were never seen by
the federation. For each k a fresh expert is fine-tuned on k of its training cases
(:func:`m4fuse.personal.new_site.join_site`, shared weights frozen) and scored with the shared model
alone on the site's test cases; the per-case pairs go through a Wilcoxon test. Under a
strategy that keeps norm layers at the sites, both start from the sites' mean layers of
``model.ckpt`` (:func:`m4fuse.personal.new_site.start_layers`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m4fuse.evaluation.stats import case_score, mean_sd, paired_test
from m4fuse.run import provision, runtime, settings


def new_site_split(overrides: Sequence[str]) -> tuple[str, dict[str, list[Any]], Any]:
    """``(site name, {"train", "val", "test": records}, config)`` of the site one past the
    federation's (``site<data.sites>``), from the synthetic set with ``data.sites + 1``
    sites (same seed, so the first sites' cases are those of the federation's set)."""
    cfg = settings.compose("config", list(overrides))
    if cfg.data.kind != "synthetic":
        raise ValueError(f"a held-out synthetic site needs data.kind=synthetic, got "
                         f"{cfg.data.kind!r}; use `m4fuse site join --data` for real data")
    if cfg.data.get("site_sizes") is not None:
        raise ValueError("a held-out synthetic site is drawn only for equal sites, but "
                         f"data.site_sizes is set ({list(cfg.data.site_sizes)}): run the "
                         "comparison with --new-site-cases none, or join a site with "
                         "`m4fuse site join`")
    sites = int(cfg.data.sites)
    bigger = settings.compose("config", [*overrides, f"data.sites={sites + 1}"])
    split = provision.load_sites(bigger)
    name = provision.site_names(split)[-1]
    return name, split[name], bigger


def federation_checkpoint(run_dir: Path, cfg: Any) -> Path | None:
    """The model a new site joins: the federated run's ``model.ckpt`` when it wrote one;
    otherwise (a strategy that keeps norm layers at the sites, whose final model does not fit
    one checkpoint) ``new_site/federation.ckpt``, built from the server's final arrays plus
    the *initial* values of the kept non-expert layers (what every site started from; the new
    site then fine-tunes them with its expert; without the sites' layers there is no mean to
    start from). None for a run without shared weights."""
    from m4fuse.io.checkpoint import save_checkpoint
    from m4fuse.personal.sets import is_expert
    from server import round_checkpoint as server_ckpt
    from server.runner import CHECKPOINT_FILE

    run_dir = Path(run_dir)
    if (run_dir / "model.ckpt").is_file():
        return run_dir / "model.ckpt"
    if not (run_dir / CHECKPOINT_FILE).is_file():
        return None
    import numpy as np
    import torch

    arrays = server_ckpt.load(run_dir / CHECKPOINT_FILE).arrays
    if not arrays:
        return None  # local training: nothing shared
    initial = settings.build_model(cfg, num_experts=1).state_dict()
    shared = {k: v.detach().cpu() for k, v in initial.items() if not is_expert(k)}
    shared.update({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()
                   if not is_expert(k)})
    return save_checkpoint(
        run_dir / "new_site" / "federation.ckpt", settings.model_config(cfg, num_experts=1),
        shared, {}, size=list(cfg.data.size),
        metadata={"strategy": str(cfg.fl.strategy),
                  "note": "server's shared weights + initial values of the kept layers"})


def parse_cases(text: str) -> list[int | str]:
    """``"2,5,all"`` -> ``[2, 5, "all"]``."""
    out: list[int | str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        out.append("all" if part == "all" else int(part))
    return out


def evaluate_new_site(overrides: Sequence[str], model_path: str | Path,
                      cases: Sequence[int | str] = (2, 5, "all"), epochs: int = 20,
                      out_dir: Path | None = None, label: dict[str, Any] | None = None,
                      expert_init: str = "fresh") -> dict[str, Any]:
    """Join the held-out site for each k in ``cases``; returns ``{"site", "rows", "by_k"}``.

    ``rows``: one per k, model (``shared`` / ``fine-tuned``) and test case, with the case
    scores and ``label`` (e.g. ``{"seed": 0}``); ``by_k``: per k the mean test Dice of both,
    the paired Wilcoxon test and the wall time. Bad k fail before any training.
    ``expert_init``: ``fresh`` (default) or ``mean`` (:func:`m4fuse.personal.new_site.join_site`).
    """
    from m4fuse.io.checkpoint import load_checkpoint
    from m4fuse.personal.new_site import check_cases

    site, records, cfg = new_site_split(overrides)
    runtime.apply_threads(cfg)
    ks = [check_cases(k, len(records["train"]), site) for k in cases]  # fail early
    checkpoint = load_checkpoint(model_path)
    rows: list[dict[str, Any]] = []
    by_k: dict[str, Any] = {}
    from m4fuse.personal.new_site import join_site

    for k in ks:
        start = time.perf_counter()
        out = None if out_dir is None else Path(out_dir) / f"{site}-k{k}.ckpt"
        result = join_site(checkpoint, records["train"], records["test"], site, cfg, cases=k,
                           epochs=epochs, seed=int(cfg.seed), out=out, expert_init=expert_init)
        for model, case_rows in (("shared", result.shared_rows),
                                 ("fine-tuned", result.tuned_rows)):
            rows += [{**(label or {}), "site": site, "k": k, "model": model, **r}
                     for r in case_rows]
        shared = [case_score(r) for r in result.shared_rows]
        tuned = [case_score(r) for r in result.tuned_rows]
        by_k[str(k)] = {"shared": mean_sd(shared)[0], "fine-tuned": mean_sd(tuned)[0],
                        "test": paired_test(tuned, shared), "train_loss": result.train["loss"],
                        "frozen_unchanged": result.frozen_unchanged, "start": result.start,
                        "seconds": time.perf_counter() - start}
        print(f"[new site] {site} k={k}: shared {by_k[str(k)]['shared']:.3f}, fine-tuned "
              f"{by_k[str(k)]['fine-tuned']:.3f} ({by_k[str(k)]['seconds']:.0f} s)", flush=True)
    return {"site": site, "model": str(model_path), "train_cases": len(records["train"]),
            "test_cases": len(records["test"]), "epochs": int(epochs), "rows": rows,
            "by_k": by_k}


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """A table of one or more :func:`evaluate_new_site` results (e.g. one per seed): per k
    the mean test Dice of the shared model alone and of the fine-tuned expert, and the
    per-case Wilcoxon test over the cases of all of them."""
    if not results:
        return ""
    lines = ["| k (training cases) | shared alone | fine-tuned expert | difference | "
             "Wilcoxon p | n cases |", "|---|---|---|---|---|---|"]
    for k in results[0]["by_k"]:
        pairs: dict[tuple, dict[str, float]] = {}
        for res in results:
            for r in res["rows"]:
                if str(r["k"]) == k:
                    pairs.setdefault((r.get("seed"), r["case"]), {})[r["model"]] = case_score(r)
        shared = [v["shared"] for v in pairs.values()]
        tuned = [v["fine-tuned"] for v in pairs.values()]
        test = paired_test(tuned, shared)
        p = "n/a" if test["p"] is None else f"{test['p']:.3g}"
        lines.append(f"| {k} | {mean_sd(shared)[0]:.3f} | {mean_sd(tuned)[0]:.3f} | "
                     f"{(test['mean_diff'] or 0.0):+.3f} | {p} | {test['n']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.new_site --model PATH [--cases 2,5,all] [--epochs N]
    [hydra overrides...]``."""
    parser = argparse.ArgumentParser(prog="python -m simulations.new_site",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="the federation's model.ckpt (or its run folder); several, "
                             "comma-separated, with --seeds (one seed each): their results "
                             "are pooled case by case")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds, one per --model (default: the config's "
                             "seed for a single model)")
    parser.add_argument("--cases", default="2,5,all",
                        help="comma-separated k (training cases of the new site) or 'all' "
                             "(default 2,5,all)")
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (default 20)")
    parser.add_argument("--expert-init", choices=("fresh", "mean"), default="fresh",
                        help="the new expert's start (default fresh; mean: the sites' experts "
                             "averaged)")
    parser.add_argument("--out", default=None, help="JSON file for the results (default: none)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. seed=1")
    args = parser.parse_intermixed_args(argv)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()] if args.seeds else []
    if seeds and len(seeds) != len(models):
        raise SystemExit(f"--seeds gives {len(seeds)} seed(s) for {len(models)} --model(s): "
                         "give one seed per model")
    if len(models) > 1 and not seeds:
        raise SystemExit("several --model need --seeds (one seed per model)")
    results = []
    for i, model in enumerate(models):
        extra = [f"seed={seeds[i]}"] if seeds else []
        results.append(evaluate_new_site([*args.overrides, *extra], model,
                                         parse_cases(args.cases), args.epochs,
                                         label={"seed": int(seeds[i])} if seeds else None,
                                         expert_init=args.expert_init))
    print(markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results[0] if len(results) == 1 else results,
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
