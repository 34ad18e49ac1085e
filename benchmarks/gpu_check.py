"""GPU readiness check: one command for a machine with one CUDA GPU, about 5 minutes.

    python -m benchmarks.gpu_check          (or: sh benchmarks/gpu_check.sh)

It prints, on ``cuda:0``:

1. AMP training steps (forward, Dice+BCE loss in float32, backward; bfloat16 without and
   float16 with ``torch.amp.GradScaler``) of M4Fuse-B (2 experts, routed to expert 0) and MONAI
   SegResNet-32 at 1 x 4 x 64 x 128 x 128: median seconds over ``--repeats`` interleaved runs,
   the time ratio M4Fuse-B / SegResNet, peak ``max_memory_allocated`` and its ratio, and
   whether the loss and every gradient are finite;
2. the selective scan: ``mamba_ssm``'s fused CUDA kernel (when that package is installed)
   against this project's chunked PyTorch scan on the same inputs: largest relative
   difference of the output and of every input gradient, and fwd+bwd time of both; without
   ``mamba_ssm`` the chunked scan alone is timed (and the network above used it);
3. one tiny federated round (2 synthetic sites of 5 cases at 16^3, tiny widths, 1 round) through
   ``simulations.federated.simulate`` with ``device=cuda``, in a temporary root.

Exit status: 0 when every part ran and its checks held; 1 when a check failed (the failing
part is named); 2 when no CUDA device is available (nothing is run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence

import torch

#: AMP dtypes checked, in order.
AMP_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
#: Tiny federation of part 3 (same shape as the CPU tests' one), on the GPU.
TINY_FEDERATION: tuple[str, ...] = (
    "data.sites=2", "data.cases_per_site=5", "data.shape=[24,24,20]", "data.size=[16,16,16]",
    "model.widths=[8,16,24,32,48,64]", "train.batch_size=2", "train.augment=false",
    "fl.rounds=1", "device=cuda", "tracking.enabled=false",
)


def no_cuda_message() -> str | None:
    """Why this machine cannot run the check, or None when it can."""
    if not torch.cuda.is_available():
        return (f"gpu_check: no CUDA device available (torch {torch.__version__}, built for "
                f"CUDA {torch.version.cuda or 'none: a CPU-only build'}; "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). "
                "Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch.")
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_amp_step(model: torch.nn.Module, takes_expert: bool, x: torch.Tensor,
                  target: torch.Tensor, amp_dtype: str
                  ) -> Callable[[], tuple[float, bool]]:
    """One AMP training step (zero grads, autocast forward, float32 loss, scaled backward,
    unscale); returns ``(loss, every gradient finite)``. Works on any device (the CPU tests
    run it with bfloat16)."""
    from m4fuse.training.engine import make_loss

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[amp_dtype]
    device = x.device
    loss_fn = make_loss("regions")
    expert = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == "float16")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # for the scaler's unscale_ only

    def step() -> tuple[float, bool]:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=dtype):
            logits = model(x, expert) if takes_expert else model(x)
        loss = loss_fn(logits.float(), target)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        finite = all(torch.isfinite(p.grad).all().item()
                     for p in model.parameters() if p.grad is not None)
        scaler.update()
        return float(loss.detach()), finite

    return step


def amp_table(device: torch.device, size: Sequence[int], repeats: int, warmup: int) -> bool:
    """Part 1; returns whether every loss and gradient was finite."""
    from monai.networks.nets import SegResNet

    from m4fuse.nets.model import M4Fuse, M4FuseConfig

    torch.manual_seed(0)
    models = {
        "M4Fuse-B": (M4Fuse(M4FuseConfig.preset("B", num_experts=2)), True),
        "SegResNet-32": (SegResNet(spatial_dims=3, init_filters=32, in_channels=4,
                                   out_channels=3, blocks_down=(1, 2, 2, 4),
                                   blocks_up=(1, 1, 1)), False),
    }
    x = torch.randn(1, 4, *size, device=device)
    target = (torch.rand(1, 3, *size, device=device) > 0.7).float()
    ok = True
    print(f"\n1. AMP training step, 1x4x{'x'.join(map(str, size))}, median of {repeats} "
          f"after {warmup} warm-up, models interleaved\n")
    print("| AMP dtype | model | step (s) | peak mem (MiB) | time / SegResNet "
          "| mem / SegResNet | loss, grads finite |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for amp_dtype in AMP_DTYPES:
        if amp_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            print(f"| bfloat16 | (not supported by {torch.cuda.get_device_name(device)}) "
                  "| | | | | |")
            continue
        steps = {name: make_amp_step(model.to(device).train(), takes_expert, x, target,
                                     amp_dtype) for name, (model, takes_expert) in models.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        finite: dict[str, bool] = dict.fromkeys(steps, True)
        for rep in range(warmup + repeats):
            for name, step in steps.items():
                _sync(device)
                start = time.perf_counter()
                loss, grads_ok = step()
                _sync(device)
                if rep >= warmup:
                    times[name].append(time.perf_counter() - start)
                finite[name] &= grads_ok and bool(torch.isfinite(torch.tensor(loss)))
        peak = {}
        for name, step in steps.items():
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            _sync(device)
            peak[name] = torch.cuda.max_memory_allocated(device) - base
        sec = {name: statistics.median(t) for name, t in times.items()}
        for name in steps:
            print(f"| {amp_dtype} | {name} | {sec[name]:.3f} | {peak[name] / 2**20:.0f} "
                  f"| {sec[name] / sec['SegResNet-32']:.2f} "
                  f"| {peak[name] / peak['SegResNet-32']:.2f} | {finite[name]} |")
            ok &= finite[name]
        for model, _ in models.values():
            model.zero_grad(set_to_none=True)
    return ok


def scan_inputs(device: torch.device, batch: int, dim: int, state: int, length: int
                ) -> dict[str, torch.Tensor]:
    """Scan inputs in mamba_ssm's layout, with Mamba-like delta before softplus."""
    gen = torch.Generator().manual_seed(0)
    cpu = {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": torch.randn(batch, dim, length, generator=gen) - 4.0,
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, state, length, generator=gen),
        "C": torch.randn(batch, state, length, generator=gen),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=gen),
        "delta_bias": torch.full((dim,), -1.0),
    }
    return {k: v.to(device) for k, v in cpu.items()}


def scan_part(device: torch.device, lengths: Sequence[int], repeats: int) -> bool:
    """Part 2; returns whether the fused and chunked scans agree (or True without fused)."""
    from m4fuse.nets import scan

    fused = scan._fused_selective_scan()
    print(f"\n2. Selective scan, fwd+bwd, float32, batch*groups=4, d_inner=128, d_state=16; "
          f"mamba_ssm fused kernel: {'installed' if fused else 'NOT installed'}\n")
    print("| L | chunked (ms) | fused (ms) | chunked / fused | max rel diff out "
          "| max rel diff grads |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    ok = True
    for length in lengths:
        inputs = scan_inputs(device, 4, 128, 16, length)
        results = {}
        times = {}
        impls: dict[str, Callable[..., torch.Tensor]] = {"chunked": scan.selective_scan_chunked}
        if fused is not None:
            impls["fused"] = fused
        for name, fn in impls.items():
            def step(fn: Callable[..., torch.Tensor] = fn,
                     inputs: dict[str, torch.Tensor] = inputs) -> tuple[torch.Tensor, list]:
                leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
                out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                         leaves["D"], leaves["z"], delta_bias=leaves["delta_bias"],
                         delta_softplus=True)
                out.backward(torch.ones_like(out))
                return out.detach(), [leaves[k].grad for k in inputs]

            step()
            samples = []
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                results[name] = step()
                _sync(device)
                samples.append(time.perf_counter() - start)
            times[name] = statistics.median(samples)

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()

        if fused is not None:
            out_diff = rel(results["chunked"][0], results["fused"][0])
            grad_diff = max(rel(a, b) for a, b in zip(results["chunked"][1], results["fused"][1]))
            ok &= out_diff <= 1e-3 and grad_diff <= 1e-2
            print(f"| {length} | {1e3 * times['chunked']:.1f} | {1e3 * times['fused']:.1f} "
                  f"| {times['chunked'] / times['fused']:.1f} | {out_diff:.1e} "
                  f"| {grad_diff:.1e} |")
        else:
            print(f"| {length} | {1e3 * times['chunked']:.1f} | n/a | n/a | n/a | n/a |")
    return ok


def federated_part() -> bool:
    """Part 3: one tiny federated round on cuda; returns whether it wrote its summary."""
    # Ray hides GPUs from actors that did not ask for one (num_gpus=0) by emptying
    # CUDA_VISIBLE_DEVICES; this keeps the device visible so `device=cuda` is honoured.
    os.environ.setdefault("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    from simulations.federated import simulate

    print("\n3. One tiny federated round on cuda (2 sites x 5 cases, 16^3, tiny widths)\n")
    with tempfile.TemporaryDirectory(prefix="m4fuse-gpu-check-") as root:
        start = time.perf_counter()
        result = simulate([f"root={root}", "run_name=gpu-check", *TINY_FEDERATION])
        seconds = time.perf_counter() - start
        summary = result["summary"]
        print(f"round done in {seconds:.1f} s; summary keys: {sorted(summary)[:8]}")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[64, 128, 128],
                        help="training input size D H W (64 128 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs (2)")
    parser.add_argument("--scan-lengths", default="2048,8192,32768",
                        help="comma-separated scan lengths (2048,8192,32768)")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip among amp,scan,federated")
    args = parser.parse_args(argv)
    reason = no_cuda_message()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    unknown = skip - {"amp", "scan", "federated"}
    if unknown:
        print(f"gpu_check: --skip: unknown part(s) {sorted(unknown)}", file=sys.stderr)
        return 1
    device = torch.device("cuda", 0)
    print(f"gpu_check on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}")
    torch.backends.cudnn.benchmark = True
    lengths = [int(v) for v in args.scan_lengths.split(",") if v.strip()]
    parts: list[tuple[str, Callable[[], bool]]] = [
        ("amp", lambda: amp_table(device, args.size, args.repeats, args.warmup)),
        ("scan", lambda: scan_part(device, lengths, args.repeats)),
        ("federated", federated_part),
    ]
    failed = []
    for name, part in parts:
        if name in skip:
            continue
        try:
            if not part():
                failed.append(name)
        except Exception:  # report every part; the exit status says one failed
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"\ngpu_check: FAILED part(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    print("\ngpu_check: all parts ran and their checks held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
