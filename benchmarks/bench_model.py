"""``m4fuse bench model``: M4Fuse T/S/B vs MONAI SegResNet and UNet, and the scan vs mambapy.

Part 1, whole networks at 4 x D x H x W (default 4 x 64 x 128 x 128), batch 1, on one device:

* parameters;
* forward FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (it counts matmul and
  convolution FLOPs; elementwise work such as the scan's recurrence is not counted);
* median wall time of forward + backward (``mean(logits)`` as the loss) over ``--repeats``
  runs after ``--warmup`` runs;
* peak memory of one forward + backward above what was resident before it. CUDA:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU (Linux): the
  process's peak resident set (``VmHWM`` in ``/proc/self/status``), reset before the run by
  writing ``5`` to ``/proc/self/clear_refs`` after ``malloc_trim(0)``; it includes allocator
  slack and, for small runs, reuse of pages still resident can hide part of the peak;
* ratios to SegResNet from the same run.

Peers: MONAI ``SegResNet(init_filters=32, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
in_channels=4, out_channels=3)`` (the paper's 18.8M configuration) and MONAI
``UNet(spatial_dims=3, in_channels=4, out_channels=3, channels=(16, 32, 64, 128, 256),
strides=(2, 2, 2, 2), num_res_units=2)`` (MONAI's standard residual 3D U-Net).

Part 2, the selective scan alone, forward + backward, float32, at L = 2048, 8192, 32768
(``--scan-lengths``) with batch*groups = 4, d_inner = 128, d_state = 16 (``--scan-shape``):
:func:`m4fuse.nets.scan.selective_scan_chunked` vs the ``mambapy`` package's parallel-scan
selective scan (``mambapy.mamba.MambaBlock.selective_scan``, which calls ``mambapy.pscan``),
each given its own native layout, the same maths (delta already positive, D term, no z).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchmarks.measure import PeakMemory, median_time, pick_device

#: Input size (D, H, W) of the network table: the training size of docs/design.md §4.
DEFAULT_SIZE: tuple[int, int, int] = (64, 128, 128)
#: Sequence lengths of the scan table: 2048 is the first mixer at 64x128x128; 8192 and
#: 32768 are that mixer at 2x and 4x the volume along two axes (or a finer first stage).
DEFAULT_SCAN_LENGTHS: tuple[int, ...] = (2048, 8192, 32768)
#: (batch*groups, d_inner, d_state) of the scan table: one sample's four channel groups,
#: d_inner = 2*C/4 for C = 256, d_state = 16 (the paper's setting).
DEFAULT_SCAN_SHAPE: tuple[int, int, int] = (4, 128, 16)
#: --quick: a smoke test that runs in seconds.
QUICK_SIZE: tuple[int, int, int] = (16, 32, 32)
QUICK_SCAN_LENGTHS: tuple[int, ...] = (64,)
QUICK_SCAN_SHAPE: tuple[int, int, int] = (2, 16, 4)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``m4fuse bench model``."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (auto: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed forward+backward runs per row; the median is shown (3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs before timing (1)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("D", "H", "W"),
                        default=list(DEFAULT_SIZE), help="input size (64 128 128)")
    parser.add_argument("--presets", default="T,S,B",
                        help="comma-separated M4Fuse presets among T,S,B,L (T,S,B)")
    parser.add_argument("--skip-peers", action="store_true",
                        help="skip SegResNet/UNet and mambapy (ratios to SegResNet are then n/a)")
    parser.add_argument("--skip-models", action="store_true", help="only the scan table")
    parser.add_argument("--skip-scan", action="store_true", help="only the network table")
    parser.add_argument("--scan-lengths", default=",".join(map(str, DEFAULT_SCAN_LENGTHS)),
                        help="comma-separated sequence lengths of the scan table")
    parser.add_argument("--scan-shape", type=int, nargs=3, metavar=("BATCH", "D", "N"),
                        default=list(DEFAULT_SCAN_SHAPE),
                        help="batch*groups, d_inner, d_state of the scan table (4 128 16)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default). On a shared, "
                             "oversubscribed CPU, 1 avoids OpenMP stalls on many small ops")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the tables, profile one training step of "
                             "--profile-preset block by block (benchmarks/profile_model.py); "
                             "--threads 0 means 1 thread here")
    parser.add_argument("--profile-preset", default="B", choices=("T", "S", "B", "L"),
                        help="preset of the profiled model (B)")
    parser.add_argument("--experts", type=int, default=2,
                        help="site experts of the profiled model (2)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: size {QUICK_SIZE}, scan L={QUICK_SCAN_LENGTHS}, "
                             f"shape {QUICK_SCAN_SHAPE}, 1 repeat, no warm-up")


@dataclass
class Row:
    """One line of a table."""

    name: str
    params: int | None
    flops: float | None
    seconds: float
    peak_bytes: float


# ----------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------


def build_models(presets: Sequence[str], peers: bool) -> list[tuple[str, torch.nn.Module, bool]]:
    """(name, module, takes an expert index) for every network of the table."""
    from m4fuse.nets.model import M4Fuse, M4FuseConfig

    models: list[tuple[str, torch.nn.Module, bool]] = []
    for preset in presets:
        models.append((f"M4Fuse-{preset}", M4Fuse(M4FuseConfig.preset(preset)), True))
    if peers:
        from monai.networks.nets import SegResNet, UNet

        models.append(("SegResNet", SegResNet(spatial_dims=3, init_filters=32, in_channels=4,
                                              out_channels=3, blocks_down=(1, 2, 2, 4),
                                              blocks_up=(1, 1, 1)), False))
        models.append(("UNet", UNet(spatial_dims=3, in_channels=4, out_channels=3,
                                    channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                                    num_res_units=2), False))
    return models


def measure_model(name: str, model: torch.nn.Module, takes_expert: bool,
                  size: Sequence[int], device: torch.device, repeats: int,
                  warmup: int) -> Row:
    """Parameters, forward FLOPs, median fwd+bwd seconds, peak memory of one network."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to(device).train()
    x = torch.randn(1, 4, *size, device=device)
    expert = torch.zeros(1, dtype=torch.long, device=device) if takes_expert else None

    def forward() -> torch.Tensor:
        return model(x, expert) if takes_expert else model(x)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        forward().float().mean().backward()

    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    flops = float(counter.get_total_flops())
    seconds = median_time(step, device, repeats, warmup)
    model.zero_grad(set_to_none=True)
    with PeakMemory(device) as memory:
        step()
    model.zero_grad(set_to_none=True)
    return Row(name, params, flops, seconds, memory.peak_bytes)


# ----------------------------------------------------------------------------------------
# Scan
# ----------------------------------------------------------------------------------------


def scan_inputs(batch: int, dim: int, state: int, length: int) -> dict[str, torch.Tensor]:
    """Realistic CPU scan inputs in mamba_ssm's layout: delta = softplus(randn - 4) (about
    0.002..0.2, like Mamba's dt init), A = the S4D-real init -(1..N), D = 1."""
    gen = torch.Generator().manual_seed(0)
    return {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": torch.nn.functional.softplus(torch.randn(batch, dim, length, generator=gen) - 4),
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, state, length, generator=gen),
        "C": torch.randn(batch, state, length, generator=gen),
        "D": torch.ones(dim),
    }


def measure_scan(impl: str, inputs: dict[str, torch.Tensor], device: torch.device,
                 repeats: int, warmup: int) -> Row:
    """Median fwd+bwd seconds and peak memory of one scan implementation."""
    if impl == "m4fuse chunked":
        from m4fuse.nets.scan import selective_scan_chunked

        leaves = {k: v.to(device).requires_grad_(True) for k, v in inputs.items()}

        def forward() -> torch.Tensor:
            return selective_scan_chunked(leaves["u"], leaves["delta"], leaves["A"],
                                          leaves["B"], leaves["C"], leaves["D"])
    elif impl == "mambapy pscan":
        from mambapy.mamba import MambaBlock

        # mambapy's layout: x, delta (B, L, ED); B, C (B, L, N); A (ED, N); D (ED,).
        leaves = {
            k: (v.transpose(1, 2).contiguous() if v.dim() == 3 else v).to(device)
            .requires_grad_(True) for k, v in inputs.items()
        }

        def forward() -> torch.Tensor:
            # selective_scan does not use ``self``; it is called unbound on purpose.
            return MambaBlock.selective_scan(None, leaves["u"], leaves["delta"],  # type: ignore[arg-type]
                                             leaves["A"], leaves["B"], leaves["C"],
                                             leaves["D"])
    else:
        raise ValueError(f"unknown scan implementation {impl!r}")

    def step() -> None:
        for leaf in leaves.values():
            leaf.grad = None
        forward().sum().backward()

    seconds = median_time(step, device, repeats, warmup)
    with PeakMemory(device) as memory:
        step()
    for leaf in leaves.values():
        leaf.grad = None
    return Row(impl, None, None, seconds, memory.peak_bytes)


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------


def _fmt(value: float | None, scale: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value / scale:.{digits}f}"


def _ratio(value: float | None, ref: float | None) -> str:
    if value is None or ref is None or math.isnan(value) or math.isnan(ref) or ref == 0:
        return "n/a"
    return f"{value / ref:.2f}"


def model_table(rows: Sequence[Row], size: Sequence[int]) -> str:
    ref = next((r for r in rows if r.name == "SegResNet"), None)
    lines = [
        f"Networks, input 1x4x{'x'.join(map(str, size))}, forward+backward",
        "",
        "| model | params (M) | fwd GFLOPs | fwd+bwd (s) | peak mem (MiB) "
        "| params / SegResNet | FLOPs / SegResNet | time / SegResNet | mem / SegResNet |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {_fmt(r.params, 1e6, 3)} | {_fmt(r.flops, 1e9, 1)} "
            f"| {_fmt(r.seconds, 1, 3)} | {_fmt(r.peak_bytes, 2**20, 0)} "
            f"| {_ratio(r.params, ref.params if ref else None)} "
            f"| {_ratio(r.flops, ref.flops if ref else None)} "
            f"| {_ratio(r.seconds, ref.seconds if ref else None)} "
            f"| {_ratio(r.peak_bytes, ref.peak_bytes if ref else None)} |"
        )
    return "\n".join(lines)


def scan_table(results: Sequence[tuple[int, Row, Row | None]],
               shape: Sequence[int]) -> str:
    batch, dim, state = shape
    lines = [
        f"Selective scan, forward+backward, float32, batch*groups={batch}, d_inner={dim}, "
        f"d_state={state}",
        "",
        "| L | m4fuse chunked (s) | mambapy pscan (s) | speed-up | m4fuse peak (MiB) "
        "| mambapy peak (MiB) | memory ratio (m4fuse / mambapy) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for length, ours, peer in results:
        lines.append(
            f"| {length} | {_fmt(ours.seconds, 1, 3)} | {_fmt(peer.seconds if peer else None, 1, 3)} "
            f"| {_ratio(peer.seconds, ours.seconds) if peer else 'n/a'} "
            f"| {_fmt(ours.peak_bytes, 2**20, 0)} "
            f"| {_fmt(peer.peak_bytes if peer else None, 2**20, 0)} "
            f"| {_ratio(ours.peak_bytes, peer.peak_bytes) if peer else 'n/a'} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print its markdown tables; returns 0."""
    if getattr(args, "profile", False):
        from benchmarks import profile_model

        if args.experts < 1:
            raise SystemExit(f"--experts must be >= 1, got {args.experts}")
        return profile_model.run(args)
    presets = [p.strip().upper() for p in args.presets.split(",") if p.strip()]
    bad = [p for p in presets if p not in ("T", "S", "B", "L")]
    if bad:
        raise SystemExit(f"--presets: unknown preset(s) {bad}; choose among T,S,B,L")
    for flag in ("repeats", "warmup"):
        if getattr(args, flag) < (1 if flag == "repeats" else 0):
            raise SystemExit(f"--{flag} must be >= {1 if flag == 'repeats' else 0}, "
                             f"got {getattr(args, flag)}")
    try:
        lengths = [int(v) for v in args.scan_lengths.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(
            f"--scan-lengths must be comma-separated ints, got {args.scan_lengths!r}") from None
    size, shape = list(args.size), list(args.scan_shape)
    repeats, warmup = args.repeats, args.warmup
    if args.quick:
        size, lengths, shape, repeats, warmup = (list(QUICK_SIZE), list(QUICK_SCAN_LENGTHS),
                                                 list(QUICK_SCAN_SHAPE), 1, 0)
    if any(s < 1 for s in size) or any(v < 1 for v in lengths) or any(v < 1 for v in shape):
        raise SystemExit(f"sizes must be positive: --size {size}, --scan-lengths {lengths}, "
                         f"--scan-shape {shape}")
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, repeats {repeats} after {warmup} warm-up; "
          f"peak memory: {'CUDA max_memory_allocated' if device.type == 'cuda' else 'peak RSS delta (VmHWM)'}")
    if not args.skip_models:
        rows = []
        for model_name, model, takes_expert in build_models(presets, not args.skip_peers):
            print(f"measuring {model_name} ...", file=sys.stderr, flush=True)
            rows.append(measure_model(model_name, model, takes_expert, size, device,
                                      repeats, warmup))
            del model
            gc.collect()
        print()
        print(model_table(rows, size))
    if not args.skip_scan:
        results: list[tuple[int, Row, Row | None]] = []
        for length in lengths:
            inputs = scan_inputs(*shape, length)
            print(f"measuring the scan at L={length} ...", file=sys.stderr, flush=True)
            ours = measure_scan("m4fuse chunked", inputs, device, repeats, warmup)
            peer = None if args.skip_peers else measure_scan("mambapy pscan", inputs, device,
                                                              repeats, warmup)
            results.append((length, ours, peer))
        print()
        print(scan_table(results, shape))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_model", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
