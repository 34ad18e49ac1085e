"""The speed goals, measured side by side in one process: M4Fuse-B now vs before vs SegResNet.

Run: ``python -m benchmarks.bench_speed`` (``--help`` for the options). Prints three tables:

1. Training step (forward + backward, ``mean(logits)`` as the loss) at 1 x 4 x 64 x 128 x 128,
   float32 (the ``bf16`` rows: bfloat16 autocast), ``--threads`` intra-op threads (default 2),
   median of ``--repeats`` runs after ``--warmup``, the models **interleaved** (run 1 of every
   model, then run 2, ...) so that load from other processes falls on all of them alike; peak
   memory of one step (see :class:`benchmarks.measure.PeakMemory`). Models:

   * ``M4Fuse-B now``: :class:`m4fuse.nets.model.M4Fuse`, preset B, 2 experts, routed to expert 0;
   * ``M4Fuse-B now, channels-last``: the same model with ``m4fuse.nets.model.CHANNELS_LAST`` on
     (peer ``channels-last``);
   * ``M4Fuse-B before``: the same network and weights in the code before the speed work
     (``benchmarks/m4fuse_before_speedup.py``, that ``m4fuse/nets/model.py`` verbatim);
   * ``SegResNet-32``: MONAI ``SegResNet(init_filters=32, blocks_down=(1, 2, 2, 4),
     blocks_up=(1, 1, 1))``, the paper's 18.8 M-parameter peer;
   * ``M4Fuse-B now, bf16 autocast`` (peer ``bf16``) and, when ``segresnet`` is among the
     peers too, ``SegResNet-32, bf16 autocast``: the same models and weights with their
     forward under ``torch.autocast`` in bfloat16 on the run's device (CPU or CUDA; what
     ``train.amp_cpu=true`` does in training on the CPU), backward following that graph; the
     loss and the weights stay float32.

   The ratio columns "/ SegResNet (same dtype)" divide by the SegResNet-32 row of the row's own
   precision (a bf16 row by ``SegResNet-32, bf16 autocast``, the others by ``SegResNet-32``);
   "time / M4Fuse-B before" is always against that float32 row, so a bf16 row there is the
   mixed-precision step against the float32 code before the speed work.

   The paper's own code (tonxycs/M4Fuse with mambapy in place of mamba_ssm) is not run here:
   this project does not vendor it, and a faithful re-implementation could not be written
   without copying it. Its ratio is therefore not measured by this benchmark.

2. Sliding-window inference (MONAI ``sliding_window_inference``, Gaussian blending, window
   ``--roi`` default 64 x 128 x 128, ``--overlap`` default 0.25, one window per forward) of one
   BraTS-sized case 4 x 155 x 240 x 240, ``torch.inference_mode``, eval mode, median of
   ``--infer-repeats``; the same models (the bf16 rows: every window's forward under bfloat16
   autocast, blending in float32), ratios against the SegResNet-32 row of the same dtype.

3. The default simulation's model sizes: one training step (batch 2 at 32^3, the synthetic
   data's size and the default batch; Dice+BCE loss; Adam-free: forward + backward only) of the
   tiny widths (8..64, configs/model/tiny.yaml) against preset T (16..128), 1 thread.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from benchmarks.measure import PeakMemory, pick_device, sync_device


class _ChannelsLast(torch.nn.Module):
    """The same model (same weights) with :data:`m4fuse.nets.model.CHANNELS_LAST` on in forward
    (backward follows the graph that forward built)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        from m4fuse.nets import model as m4

        previous, m4.CHANNELS_LAST = m4.CHANNELS_LAST, True
        try:
            return self.model(*args)
        finally:
            m4.CHANNELS_LAST = previous


class _Bf16Autocast(torch.nn.Module):
    """The same model (same weights) with its forward under ``torch.autocast`` in bfloat16 on
    the input's device type (``cpu`` or ``cuda``); backward follows the graph that forward
    built, the weights stay float32 (what ``train.amp_cpu`` does on the CPU)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=args[0].device.type, dtype=torch.bfloat16):
            return self.model(*args)


#: The ``--peers`` names (M4Fuse-B now is always run).
PEERS: tuple[str, ...] = ("channels-last", "before", "segresnet", "bf16")


def _same_dtype_reference(model: torch.nn.Module, names: Sequence[str]) -> str | None:
    """The SegResNet-32 row that ``model``'s row is divided by: the one of its own precision
    (None when that row is not among ``names``)."""
    ref = "SegResNet-32, bf16 autocast" if isinstance(model, _Bf16Autocast) else "SegResNet-32"
    return ref if ref in names else None


def _ratio(value: float, ref: float) -> str:
    """``value / ref`` to 2 decimals; "n/a" when ``ref`` is not a positive number (a peak
    memory can read 0 bytes at a tiny size on the CPU)."""
    return f"{value / ref:.2f}" if ref > 0 else "n/a"


def _models(which: Sequence[str]) -> list[tuple[str, torch.nn.Module, bool]]:
    from monai.networks.nets import SegResNet

    from benchmarks import m4fuse_before_speedup as before
    from m4fuse.nets.model import M4Fuse, M4FuseConfig

    torch.manual_seed(0)
    now = M4Fuse(M4FuseConfig.preset("B", num_experts=2))
    models: list[tuple[str, torch.nn.Module, bool]] = [("M4Fuse-B now", now, True)]
    if "channels-last" in which:
        models.append(("M4Fuse-B now, channels-last", _ChannelsLast(now), True))
    if "bf16" in which:
        models.append(("M4Fuse-B now, bf16 autocast", _Bf16Autocast(now), True))
    if "before" in which:
        old = before.M4Fuse(before.M4FuseConfig.preset("B", num_experts=2))
        old.load_state_dict(now.state_dict())
        models.append(("M4Fuse-B before", old, True))
    if "segresnet" in which:
        segresnet = SegResNet(spatial_dims=3, init_filters=32, in_channels=4, out_channels=3,
                              blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
        models.append(("SegResNet-32", segresnet, False))
        if "bf16" in which:
            models.append(("SegResNet-32, bf16 autocast", _Bf16Autocast(segresnet), False))
    return models


def _interleaved(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int,
                 warmup: int) -> dict[str, float]:
    """Median seconds per step, the steps run round-robin."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(warmup + repeats):
        for name, step in steps.items():
            print(f"  {name}: run {rep + 1}/{warmup + repeats}", file=sys.stderr, flush=True)
            sync_device(device)
            start = time.perf_counter()
            step()
            sync_device(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [title, "", "| " + " | ".join(header) + " |",
             "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def train_table(models: list[tuple[str, torch.nn.Module, bool]], size: Sequence[int],
                device: torch.device, repeats: int, warmup: int) -> str:
    x = torch.randn(1, 4, *size, device=device)
    expert = torch.zeros(1, dtype=torch.long, device=device)
    steps = {}
    for name, model, takes_expert in models:
        model.to(device).train()

        def step(model: torch.nn.Module = model, takes_expert: bool = takes_expert) -> None:
            model.zero_grad(set_to_none=True)
            out = model(x, expert) if takes_expert else model(x)
            out.float().mean().backward()

        steps[name] = step
    seconds = _interleaved(steps, device, repeats, warmup)
    memory = {}
    for name, step in steps.items():
        with PeakMemory(device) as peak:
            step()
        memory[name] = peak.peak_bytes
        gc.collect()
    rows = []
    for name, model, _ in models:
        ref = _same_dtype_reference(model, list(seconds))
        rows.append([
            name, f"{seconds[name]:.2f}", f"{memory[name] / 2**20:.0f}",
            _ratio(seconds[name], seconds[ref]) if ref else "n/a",
            _ratio(memory[name], memory[ref]) if ref else "n/a",
            f"{seconds[name] / seconds['M4Fuse-B before']:.2f}"
            if "M4Fuse-B before" in seconds else "n/a",
        ])
    return _table(f"Training step (fwd+bwd), 1x4x{'x'.join(map(str, size))}, float32 "
                  "(bf16 rows: bfloat16 autocast)",
                  ["model", "fwd+bwd (s)", "peak mem (MiB)", "time / SegResNet (same dtype)",
                   "mem / SegResNet (same dtype)", "time / M4Fuse-B before"], rows)


def infer_table(models: list[tuple[str, torch.nn.Module, bool]], case: Sequence[int],
                roi: Sequence[int], overlap: float, device: torch.device,
                repeats: int) -> str:
    from monai.inferers import sliding_window_inference

    image = torch.randn(1, 4, *case, device=device)
    expert = torch.zeros(1, dtype=torch.long, device=device)
    steps = {}
    for name, model, takes_expert in models:
        model.to(device).eval()

        def predictor(window: torch.Tensor, model: torch.nn.Module = model,
                      takes_expert: bool = takes_expert) -> torch.Tensor:
            return model(window, expert.expand(window.shape[0])) if takes_expert else model(window)

        def step(predictor: Callable = predictor) -> None:
            with torch.inference_mode():
                sliding_window_inference(image, tuple(roi), 1, predictor, overlap=overlap,
                                         mode="gaussian")

        steps[name] = step
    seconds = _interleaved(steps, device, repeats, 0)
    rows = []
    for name, model, _ in models:
        ref = _same_dtype_reference(model, list(seconds))
        rows.append([name, f"{seconds[name]:.1f}",
                     _ratio(seconds[name], seconds[ref]) if ref else "n/a"])
    return _table(f"Sliding-window inference of one 4x{'x'.join(map(str, case))} case, window "
                  f"{'x'.join(map(str, roi))}, overlap {overlap}",
                  ["model", "seconds", "time / SegResNet (same dtype)"], rows)


def sizes_table(repeats: int, warmup: int) -> str:
    from m4fuse.nets.model import M4Fuse, M4FuseConfig
    from m4fuse.training.engine import make_loss

    torch.set_num_threads(1)
    x = torch.randn(2, 4, 32, 32, 32)
    target = (torch.rand(2, 3, 32, 32, 32) > 0.7).float()
    expert = torch.zeros(2, dtype=torch.long)
    loss = make_loss("regions")
    configs = {"tiny (8..64)": M4FuseConfig(widths=(8, 16, 24, 32, 48, 64)),
               "preset T (16..128)": M4FuseConfig.preset("T")}
    steps = {}
    params = {}
    for name, cfg in configs.items():
        model = M4Fuse(cfg).train()
        params[name] = sum(p.numel() for p in model.parameters())

        def step(model: torch.nn.Module = model) -> None:
            model.zero_grad(set_to_none=True)
            loss(model(x, expert), target).backward()

        steps[name] = step
    seconds = _interleaved(steps, torch.device("cpu"), repeats, warmup)
    tiny = seconds["tiny (8..64)"]
    rows = [[name, f"{params[name] / 1e6:.3f}", f"{seconds[name]:.3f}",
             f"{seconds[name] / tiny:.2f}"] for name in configs]
    return _table("Default simulation's step: batch 2 x 4 x 32^3, Dice+BCE, fwd+bwd, 1 thread",
                  ["model", "params (M)", "step (s)", "time / tiny"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model (1)")
    parser.add_argument("--size", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--case", type=int, nargs=3, default=[155, 240, 240])
    parser.add_argument("--roi", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--infer-repeats", type=int, default=1)
    parser.add_argument("--parts", default="train,infer,sizes",
                        help="comma-separated tables to run among train,infer,sizes")
    parser.add_argument("--peers", default="channels-last,before,segresnet",
                        help="comma-separated peers among " + ",".join(PEERS)
                        + " (bf16: the bfloat16-autocast rows)")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"train", "infer", "sizes"}
    if unknown:
        raise SystemExit(f"--parts: unknown table(s) {sorted(unknown)}")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if set(peers) - set(PEERS):
        raise SystemExit(f"--peers: unknown peer(s) {sorted(set(peers) - set(PEERS))}")
    if args.repeats < 1 or args.warmup < 0 or args.infer_repeats < 1 or args.threads < 1:
        raise SystemExit("--repeats, --infer-repeats and --threads must be >= 1, --warmup >= 0")
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} after {args.warmup} warm-up, models interleaved",
          flush=True)
    models = _models(peers)
    if "train" in parts:
        print("\n" + train_table(models, args.size, device, args.repeats, args.warmup),
              flush=True)
    if "infer" in parts:
        print("\n" + infer_table(models, args.case, args.roi, args.overlap, device,
                                 args.infer_repeats), flush=True)
    if "sizes" in parts:
        print("\n" + sizes_table(args.repeats, args.warmup), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
