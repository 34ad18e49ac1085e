"""``m4fuse bench data``: prepare throughput, and per-sample read time from the cache vs NIfTI.

On a synthetic set at the BraTS grid (240 x 240 x 155 by default) it measures, each phase in a
fresh worker process so that its peak resident memory (``ru_maxrss``) is its own:

* prepare: cases per second of :func:`m4fuse.data.prepare_dataset` (fresh cache);
* one training sample (image + region masks, no augmentation) read from the cache (float32
  memory-mapped ``.npy``, as training does), from a float16 copy of the cache (the dtype
  alternative), from the NIfTI files (decode only: the 5 ``.nii.gz`` of a case) and from the NIfTI
  files through preprocessing (what training would pay without a cache).

Prints a markdown table. Numbers depend on the disk cache: the cache is read warm (after one
pass), which is the steady state of a training epoch.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"),
                        help="synthetic grid (default 240 240 155, the BraTS grid)")
    parser.add_argument("--cases", type=int, default=4, help="synthetic cases (default 4)")
    parser.add_argument("--size", type=int, nargs=3, default=[64, 128, 128], metavar=("D", "H", "W"),
                        help="training size (default 64 128 128)")
    parser.add_argument("--workers", type=int, default=2, help="prepare workers (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the cases per read timing (default 3)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _phase_synth(root: str, cases: int, shape: list[int]) -> dict[str, Any]:
    from m4fuse.data import synthesize

    t = time.perf_counter()
    synthesize(root, sites=1, cases_per_site=cases, seed=0, shape=shape, progress=False)
    return {"seconds": time.perf_counter() - t, "peak_mb": _peak_mb()}


def _phase_prepare(root: str, cache: str, size: list[int], workers: int) -> dict[str, Any]:
    from m4fuse.data import prepare_dataset

    t = time.perf_counter()
    report = prepare_dataset(root, cache, size, workers=workers, progress=False)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "cases": len(report.prepared), "peak_mb": _peak_mb()}


def _phase_read(kind: str, cache: str, repeats: int) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np
    import torch

    from m4fuse.data import load_records, preprocess_case, preprocess_label
    from m4fuse.data.loader import PreparedCaseDataset

    torch.set_num_threads(1)
    records = load_records(cache)
    if kind == "cache":
        ds = PreparedCaseDataset(records, 0)
        read = lambda i: ds[i]  # noqa: E731
    elif kind == "cache16":
        copies = []
        for r in records:
            path = Path(cache) / "f16" / f"{r.case_id}.npy"
            path.parent.mkdir(exist_ok=True)
            np.save(path, np.asarray(r.image(), np.float16))
            copies.append(path)

        def read(i: int) -> Any:
            return (torch.from_numpy(np.array(np.load(copies[i], mmap_mode="r"), dtype=np.float32)),
                    torch.from_numpy(np.asarray(records[i].label(), np.float32)))
    elif kind == "nifti":
        def read(i: int) -> Any:
            files = records[i].source_files + [records[i].seg_file]
            return [np.asarray(nib.load(f).dataobj, dtype=np.float32) for f in files]
    elif kind == "nifti+prep":
        def read(i: int) -> Any:
            r = records[i]
            image, meta = preprocess_case(r.source_files, r.meta["size"], case_id=r.case_id)
            return image, preprocess_label(r.seg_file, meta, r.et_label)
    else:
        raise ValueError(f"unknown read kind {kind!r}")
    read(0)  # warm the page cache / imports
    times = []
    for _ in range(repeats if kind.startswith("cache") else 1):
        for i in range(len(records)):
            t = time.perf_counter()
            read(i)
            times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "peak_mb": _peak_mb()}


def _in_process(fn: Any, *args: Any) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def run(args: argparse.Namespace) -> int:
    if args.cases < 1 or args.repeats < 1:
        raise SystemExit(f"--cases and --repeats must be >= 1, got {args.cases}, {args.repeats}")
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="m4fuse-bench-data-")
    work = Path(args.dir or tmp.name)  # type: ignore[union-attr]
    root, cache = str(work / "raw"), str(work / "cache")
    try:
        synth = _in_process(_phase_synth, root, args.cases, list(args.shape))
        prep = _in_process(_phase_prepare, root, cache, list(args.size), args.workers)
        reads = {k: _in_process(_phase_read, k, cache, args.repeats)
                 for k in ("cache", "cache16", "nifti", "nifti+prep")}
    finally:
        if tmp is not None:
            tmp.cleanup()
    grid = "x".join(map(str, args.shape))
    size = "x".join(map(str, args.size))
    print(f"\n### m4fuse bench data: {args.cases} synthetic cases at {grid}, training size {size}\n")
    print("| phase | value | peak RSS (MB) |")
    print("| --- | --- | --- |")
    print(f"| synthesise | {synth['seconds'] / args.cases:.2f} s/case | {synth['peak_mb']:.0f} |")
    print(f"| prepare ({args.workers} workers) | {prep['cases'] / prep['seconds']:.2f} cases/s "
          f"({prep['seconds']:.1f} s, incl. start) | {prep['peak_mb']:.0f} |")
    base = reads["cache"]["seconds"]
    names = {"cache": "read sample: cache (float32 mmap)", "cache16": "read sample: cache as float16",
             "nifti": "read sample: NIfTI decode only", "nifti+prep": "read sample: NIfTI + preprocessing"}
    for key, label in names.items():
        s = reads[key]["seconds"]
        print(f"| {label} | {s * 1000:.1f} ms ({s / base:.1f}x cache) | {reads[key]['peak_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
