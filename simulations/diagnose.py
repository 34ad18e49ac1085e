"""Diagnose a finished federated run: do the site experts matter?

``python -m simulations.diagnose RUN_NAME [RUN_NAME ...] [hydra overrides]`` rebuilds each
site's model of ``runs/<RUN_NAME>`` as it was after the last round (the server's last round
checkpoint plus what the site kept in ``runs/<RUN_NAME>/clients/<site>/``; a ``-ft``
strategy's fine-tuning is not in there: it happens at the final test only), then prints per
site: ``||expert|| / ||shared||`` and their cosine per expert unit (on the site's test cases), the test mean
Dice with the expert and with ``expert=None``, and the run's training-loss curve. The
overrides must be those of the run (seed, data); ``fl.strategy`` is read from the run's
checkpoint. Writes ``runs/<RUN_NAME>/diagnosis.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import torch


def site_model(cfg: Any, run: str, site: str, arrays: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Site ``site``'s model after the last round of run ``run``."""
    from client.weights import load_round_state
    from m4fuse.personal.site_store import newest_kept
    from m4fuse.run import settings, workspace

    model = settings.build_model(cfg, num_experts=1)
    kept = newest_kept(workspace.project_root(cfg) / "runs" / run / "clients" / site)
    load_round_state(model, str(cfg.fl.strategy), arrays,
                     None if kept is None else kept["state"])
    return model


def diagnose(run: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The diagnosis of run ``run`` (see the module docstring) as a JSON-able dict."""
    from m4fuse.evaluation import diagnostics
    from m4fuse.run import provision, settings, workspace

    cfg = settings.compose(overrides=list(overrides))
    rdir = workspace.project_root(cfg) / "runs" / run
    ckpt = torch.load(rdir / "server_checkpoint.pt", weights_only=True, map_location="cpu")
    cfg.fl.strategy = str(ckpt["strategy"])
    arrays = {k: torch.as_tensor(v) for k, v in ckpt["arrays"].items()}
    split = provision.load_sites(cfg)
    out: dict[str, Any] = {"run": run, "strategy": cfg.fl.strategy, "sites": {},
                           "train_loss": diagnostics.loss_curve(rdir / "history.json")}
    for site in provision.site_names(split):
        model = site_model(cfg, run, site, arrays)
        test = split[site]["test"]
        row = diagnostics.with_and_without_expert(model, test, 0)
        row["units"] = diagnostics.expert_output_stats(model, test, 0)
        out["sites"][site] = row
        ratios = " ".join(f"{k.split('.')[-1]}={v['ratio']:.3f} (cos {v['cosine']:.2f})"
                          for k, v in row["units"].items())
        print(f"{run} {site}: Dice with expert {row['dice_with']:.3f}, without "
              f"{row['dice_without']:.3f} (delta {row['dice_delta']:+.3f}); "
              f"||expert||/||shared|| {ratios}", flush=True)
    mean_with = sum(r["dice_with"] for r in out["sites"].values()) / len(out["sites"])
    mean_without = sum(r["dice_without"] for r in out["sites"].values()) / len(out["sites"])
    print(f"{run}: mean Dice with expert {mean_with:.3f}, without {mean_without:.3f}; "
          f"train loss per round {[round(v, 3) for v in out['train_loss']]}")
    (rdir / "diagnosis.json").write_text(json.dumps(out, indent=1))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    runs = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if not runs or any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0 if runs or args else 2
    for run in runs:
        diagnose(run, overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
