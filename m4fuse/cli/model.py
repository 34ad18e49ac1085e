"""``m4fuse model summary``: parameter counts of an M4Fuse configuration;
``m4fuse model assemble``: a federated run's final model from the server's part and the sites'
state folders (:mod:`m4fuse.io.assembly`)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``model summary`` and ``model assemble`` to the ``m4fuse`` parser."""
    model = sub.add_parser("model", help="inspect the M4Fuse network; assemble a run's model")
    which = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    summary = which.add_parser("summary", help="parameter counts per part of the network")
    summary.add_argument("--preset", default="B", choices=["T", "S", "B", "L"],
                         help="width preset (default B: widths 32,64,96,128,192,256)")
    summary.add_argument("--experts", type=int, default=1,
                         help="site experts per expert unit (default 1)")
    summary.add_argument("--classes", type=int, default=3, choices=[3, 4],
                         help="3 = sigmoid regions WT/TC/ET (default), 4 = softmax labels "
                              "as in the paper")
    summary.add_argument("--json", action="store_true",
                         help="print one JSON object instead of a table")
    summary.set_defaults(func=summary_command)
    assemble = which.add_parser(
        "assemble", help="a federated run's model.ckpt: the server's shared.ckpt plus each "
                         "site's own weights from its state folder")
    assemble.add_argument("run", help="the run folder (runs/<run name>) holding shared.ckpt")
    assemble.add_argument("--site", action="append", default=[], metavar="NAME=FOLDER",
                          help="a site's state folder (repeatable); default: every site of the "
                               "run at <run>/clients/<site> (simulation). A hospital of a "
                               "deployment names its own folder and gets its own model")
    assemble.add_argument("--out", default=None,
                          help="model file to write (default <run>/model.ckpt)")
    assemble.set_defaults(func=assemble_command)


def summarize(preset: str = "B", experts: int = 1, classes: int = 3) -> dict[str, Any]:
    """Build the model and return its config and :func:`m4fuse.nets.summary.parameter_table`.

    ``preset`` default B, ``experts`` default 1, ``classes`` default 3 (regions; 4 = labels).
    """
    import torch

    from m4fuse.nets.model import M4Fuse, M4FuseConfig
    from m4fuse.nets.summary import parameter_table

    output = {3: "regions", 4: "labels"}.get(classes)
    if output is None:
        raise ValueError(f"classes must be 3 (regions) or 4 (labels), got {classes!r}")
    config = M4FuseConfig.preset(preset, output=output, num_experts=experts)
    with torch.device("meta"):  # counting only: no memory, no init cost
        model = M4Fuse(config)
    table = parameter_table(model)
    per_expert = table["experts"] // config.num_experts
    return {**table, "per_expert": per_expert, "config": config.to_dict()}


def summary_command(args: argparse.Namespace) -> int:
    """Print the summary as a table or (``--json``) one JSON object."""
    import sys

    try:
        result = summarize(args.preset, args.experts, args.classes)
    except ValueError as err:  # a bad value (e.g. --experts 0): one line, no traceback
        print(f"m4fuse model summary: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
        return 0
    cfg = result["config"]
    print(f"M4Fuse-{args.preset}  widths={cfg['widths']}  experts={cfg['num_experts']}  "
          f"output={cfg['output']} ({cfg['out_channels']} channels)")
    rows = [("encoder", result["encoder"]),
            (f"experts ({cfg['num_experts']} x {result['per_expert']:,})", result["experts"]),
            ("bridge", result["bridge"]), ("decoder", result["decoder"]),
            ("total", result["total"])]
    for name, count in rows:
        if name == "total":
            print("-" * 44)
        print(f"{name:<28}{count:>10,}  {count / 1e6:6.3f}M")
    return 0


def parse_site_folders(entries: list[str]) -> dict[str, str] | None:
    """``["NAME=FOLDER", ...]`` -> ``{NAME: FOLDER}``; None when empty (the run's own)."""
    if not entries:
        return None
    folders: dict[str, str] = {}
    for entry in entries:
        name, sep, folder = entry.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--site takes NAME=FOLDER, got {entry!r}")
        if name in folders:
            raise ValueError(f"--site names {name!r} twice")
        folders[name] = folder
    return folders


def check_named_sites(run: str, folders: dict[str, str] | None) -> None:
    """Refuse a ``--site NAME=FOLDER`` whose NAME is not a site of the run's model (listing
    them) or whose FOLDER holds no site state: a misspelt name or folder must not leave that
    site's own weights out quietly."""
    from pathlib import Path

    from m4fuse.io.checkpoint import SERVER_MODEL_NAME, load_checkpoint
    from m4fuse.personal.site_store import newest_kept

    server_model = Path(run) / SERVER_MODEL_NAME
    if not folders or not server_model.is_file():
        return
    sites = [str(s) for s in load_checkpoint(server_model).metadata.get("sites") or []]
    for site, folder in folders.items():
        if sites and site not in sites:
            raise ValueError(f"--site {site}={folder}: {site!r} is not a site of {run} (its "
                             f"sites: {', '.join(sites)})")
        if newest_kept(folder) is None:
            raise ValueError(f"--site {site}={folder}: no site state there (files "
                             "site-state-r<N>.pt of the SuperNode's state-dir)")


def assemble_command(args: argparse.Namespace) -> int:
    """Write the run's final model (:func:`m4fuse.io.assembly.assemble_run`) and print it."""
    import sys

    from m4fuse.io.assembly import assemble_run
    from m4fuse.io.checkpoint import CheckpointError, load_checkpoint

    try:
        folders = parse_site_folders(args.site)
        check_named_sites(args.run, folders)
        assembled = assemble_run(args.run, folders, args.out)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"m4fuse model assemble: error: {err}", file=sys.stderr)
        return 2
    if assembled.model is None:
        print(f"{args.run}: a local run has no shared model; each site's model is in its folder")
        return 0
    ckpt = load_checkpoint(assembled.model)
    own = sorted(ckpt.metadata.get("site_rounds", {}))
    print(f"wrote {assembled.model}: {len(ckpt.sites)} site(s) "
          f"({', '.join(ckpt.sites) or 'none'}); own weights from the folders of "
          f"{', '.join(own) or 'no site'}")
    if args.out is None:  # the run's own files: logged to the run's MLflow run
        from pathlib import Path

        from m4fuse.run.tracking import log_to_recorded_run

        print(log_to_recorded_run(Path(args.run), assembled.artifacts))
    return 0
