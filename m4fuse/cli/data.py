"""``m4fuse data synth|sites|prepare``: the synthetic set, site tables/partition CSVs, the cache."""

from __future__ import annotations

import argparse
import sys
from collections import Counter


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="BraTS data: synthesise, list sites, prepare the cache")
    which = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = which.add_parser("synth", help="write the synthetic multi-site BraTS2021-layout set")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    synth.add_argument("--cases-per-site", type=int, default=12, help="cases per site (default 12)")
    synth.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    synth.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                       help="grid in 1 mm voxels (default 96 96 64; BraTS is 240 240 155)")
    synth.set_defaults(func=_synth)

    sites = which.add_parser("sites", help="print site -> cases; --out writes a FeTS partition CSV")
    sites.add_argument("root", help="BraTS folder")
    src = sites.add_mutually_exclusive_group()
    src.add_argument("--partition-csv", help="FeTS Partition_ID,Subject_ID or any case,site CSV")
    src.add_argument("--random", type=int, metavar="N", help="stratified random split into N sites")
    sites.add_argument("--case-column", help="case column of --partition-csv (default: detected)")
    sites.add_argument("--site-column", help="site column of --partition-csv (default: detected)")
    sites.add_argument("--seed", type=int, default=None,
                       help="seed of --random and the split (default: the config's seed)")
    sites.add_argument("--val-fraction", type=float, default=None,
                       help="per site (default: the config's data.val_fraction)")
    sites.add_argument("--test-fraction", type=float, default=None,
                       help="per site (default: the config's data.test_fraction)")
    sites.add_argument("--out", help="write the partition as a Partition_ID,Subject_ID CSV "
                                     "(outside ROOT, which is never written)")
    sites.add_argument("overrides", nargs="*",
                       help="Hydra overrides of the split's settings, as for a run (the split "
                            "is the runs' own: provision.split_site), e.g. data=brats "
                            "data.source=/abs/BraTS or seed=1 data.test_fraction=0.2")
    sites.set_defaults(func=_sites)

    prep = which.add_parser("prepare", help="check, crop, normalise, resize and cache every case")
    prep.add_argument("root", help="BraTS folder")
    prep.add_argument("--cache", required=True, help="cache folder")
    prep.add_argument("--size", type=int, nargs=3, metavar=("D", "H", "W"), default=[64, 128, 128],
                      help="training size (Z, Y, X) (default 64 128 128)")
    prep.add_argument("--workers", type=int, default=2, help="worker threads (default 2)")
    prep.add_argument("--partition-csv", help="sites to record (default ROOT/partition.csv if present)")
    prep.add_argument("--strict", action="store_true", help="exit 1 if any case was skipped")
    prep.set_defaults(func=_prepare)


def _synth(args: argparse.Namespace) -> int:
    from m4fuse.data.synth import SYNTH_SHAPE, synthesize

    shape = tuple(args.shape) if args.shape else SYNTH_SHAPE
    part = synthesize(args.out, sites=args.sites, cases_per_site=args.cases_per_site,
                      seed=args.seed, shape=shape)
    print(f"wrote {len(part)} cases ({args.sites} sites, grid {shape}) and partition.csv to {args.out}")
    return 0


def _sites(args: argparse.Namespace) -> int:
    from m4fuse.data.guard import check_outside
    from m4fuse.data.layout import discover_cases
    from m4fuse.data.partition import read_site_csv, write_partition_csv
    from m4fuse.data.sites import institution_sites, random_sites
    from m4fuse.run import provision, settings

    given = [f"seed={args.seed}" if args.seed is not None else "",
             f"data.val_fraction={args.val_fraction}" if args.val_fraction is not None else "",
             f"data.test_fraction={args.test_fraction}" if args.test_fraction is not None
             else ""]
    cfg = settings.compose("config", list(args.overrides) + [o for o in given if o])
    args.seed = int(cfg.seed)
    if args.out:
        check_outside(args.out, [("ROOT", args.root)], "--out")
    cases = discover_cases(args.root)
    ids = [c.case_id for c in cases]
    if not ids:
        print(f"no BraTS cases found below {args.root}", file=sys.stderr)
        return 1
    try:
        if args.partition_csv:
            mapping = read_site_csv(args.partition_csv, ids, args.case_column, args.site_column)
            mapping = {c: s for c, s in mapping.items() if c in set(ids)}
        elif args.random:
            mapping = random_sites(ids, args.random, args.seed,
                                   strata={c.case_id: c.grade or "" for c in cases})
        else:
            mapping = institution_sites(ids)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = Counter(mapping.values())
    print(provision.split_rule(cfg))
    print(f"{'site':<12} {'cases':>5} {'train':>5} {'val':>5} {'test':>5}")
    for site in sorted(counts):
        parts = provision.split_site(cfg, site, [c for c, s in mapping.items() if s == site])
        print(f"{site:<12} {counts[site]:>5} {len(parts['train']):>5} {len(parts['val']):>5} {len(parts['test']):>5}")
    print(f"{'total':<12} {sum(counts.values()):>5}")
    unlisted = len(ids) - len(mapping)
    if unlisted:
        print(f"({unlisted} cases under {args.root} have no site and are left out)")
    if args.out:
        write_partition_csv(args.out, mapping)
        print(f"wrote {args.out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from m4fuse.data.cache import prepare_dataset

    report = prepare_dataset(args.root, args.cache, size=args.size, workers=args.workers,
                             strict=False, partition_csv=args.partition_csv)
    print(report.summary())
    return 1 if (args.strict and report.skipped) else 0
