"""``m4fuse model summary``: parameter counts of an M4Fuse configuration."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``model summary`` to the ``m4fuse`` parser."""
    model = sub.add_parser("model", help="inspect the M4Fuse network")
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


def summarize(preset: str = "B", experts: int = 1, classes: int = 3) -> dict[str, Any]:
    """Build the model and return its config and :func:`m4fuse.model.parameter_table`.

    ``preset`` default B, ``experts`` default 1, ``classes`` default 3 (regions; 4 = labels).
    """
    import torch

    from m4fuse.model import M4Fuse, M4FuseConfig, parameter_table

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
