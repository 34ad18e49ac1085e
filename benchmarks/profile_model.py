"""``m4fuse bench model --profile``: where an M4Fuse training step spends its time, block by block.

For one preset and input size (default M4-Fuse B with 2 experts, batch 1, 4 x 64 x 128 x 128,
float32, training mode), the step is cut into the blocks of the network, in order:

    e1 e2 e3 (encoder convolutions, each conv + GroupNorm + GELU, with the max-pool before it)
    u4/u5/bn .shared and .expert (the shared and the site grouped mixer of each expert unit,
    on the pooled input) and .out (sum, Dropout3d, GroupNorm, GELU)
    bridge   d1..d5 (decoder stages, with their upsampling and skip add)   head   loss

Every block runs in isolation on the real activations of that step (captured by running the
blocks in sequence once), with inputs as leaves that require a gradient: the forward time, the
backward time (``torch.autograd.backward`` with a random output gradient) and the peak memory
of forward + backward above what was resident before (peak RSS on CPU, ``max_memory_allocated``
on CUDA; see :class:`benchmarks.measure.PeakMemory`) are the medians over ``--repeats``.
The share of the selective scan is measured inside each block by timing the chunked scan's
custom autograd Function (:class:`m4fuse.nets.scan._ChunkedScan`) forward and backward.

Chaining the blocks in evaluation mode reproduces ``model(x, expert)`` (checked at start:
the run stops if it does not), so the table covers the whole network. Blocks run in
isolation do not share the allocator's cached memory, and their sum omits autograd's
bookkeeping between blocks; the whole step, timed the usual way, is printed below the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.measure import PeakMemory, median_time, pick_device, sync_device

#: Profile defaults: the preset, experts and size of the benchmark's network table.
DEFAULT_PRESET = "B"
DEFAULT_EXPERTS = 2


@dataclass
class Block:
    """One step of the chain: ``outputs = fn(*inputs)`` over named activations."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fn: Callable[..., tuple[torch.Tensor, ...]]


@dataclass
class BlockTimes:
    name: str
    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)
    scan_forward: list[float] = field(default_factory=list)
    scan_backward: list[float] = field(default_factory=list)
    peak_bytes: float = float("nan")


class ScanClock:
    """Accumulates the wall time of :class:`m4fuse.nets.scan._ChunkedScan` forward/backward."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.forward = 0.0
        self.backward = 0.0

    def __enter__(self) -> ScanClock:
        from m4fuse.nets import scan

        self._cls = scan._ChunkedScan
        self._fwd, self._bwd = self._cls.forward, self._cls.backward
        clock = self

        def timed(fn: Callable[..., object], slot: str) -> Callable[..., object]:
            def wrapper(*args: object) -> object:
                sync_device(clock.device)
                start = time.perf_counter()
                out = fn(*args)
                sync_device(clock.device)
                setattr(clock, slot, getattr(clock, slot) + time.perf_counter() - start)
                return out
            return staticmethod(wrapper)

        self._cls.forward = timed(self._fwd, "forward")
        self._cls.backward = timed(self._bwd, "backward")
        return self

    def reset(self) -> None:
        self.forward = self.backward = 0.0

    def __exit__(self, *exc: object) -> None:
        self._cls.forward = staticmethod(self._fwd)
        self._cls.backward = staticmethod(self._bwd)


def build_blocks(model: torch.nn.Module, expert_index: int | None) -> list[Block]:
    """The chain of blocks of :class:`m4fuse.nets.model.M4Fuse` (mirrors its ``forward``)."""
    from m4fuse.nets import model as m

    enc, bridge, dec = model.encoder, model.bridge, model.decoder

    def unit_blocks(prefix: str, unit: torch.nn.Module, source: str, pre: Callable,
                    post: Callable, out: str) -> list[Block]:
        blocks = [Block(f"{prefix}.shared", (source,), (f"{prefix}_s",),
                        lambda t: (unit.shared(pre(t)),))]
        parts = [f"{prefix}_s"]
        if expert_index is not None:
            blocks.append(Block(f"{prefix}.expert", (source,), (f"{prefix}_x",),
                                lambda t: (unit.site_experts[expert_index](pre(t)),)))
            parts.append(f"{prefix}_x")
        blocks.append(Block(f"{prefix}.out", tuple(parts), (out,),
                            lambda *ts: (post(unit.dropout(sum(ts[1:], ts[0]))),)))
        return blocks

    blocks = [
        Block("e1", ("x",), ("t1",), lambda x: (F.gelu(enc.norm1(m._conv(enc.conv1, x))),)),
        Block("e2", ("t1",), ("t2",),
              lambda t: (F.gelu(enc.norm2(m._conv(enc.conv2, m._pool(t)))),)),
        Block("e3", ("t2",), ("t3",),
              lambda t: (F.gelu(enc.norm3(m._conv(enc.conv3, m._pool(t)))),)),
    ]
    blocks += unit_blocks("u4", enc.unit4, "t3", lambda t: m._pool(enc.dropout(t)),
                          lambda t: F.gelu(enc.norm4(t)), "t4")
    blocks += unit_blocks("u5", enc.unit5, "t4", m._pool, lambda t: F.gelu(enc.norm5(t)), "t5")
    blocks += unit_blocks("bn", enc.bottleneck, "t5", lambda t: t, F.gelu, "b")
    blocks += [
        Block("bridge", ("t1", "t2", "t3", "t4", "t5"), ("g1", "g2", "g3", "g4", "g5"),
              lambda *ts: tuple(bridge(list(ts)))),
        Block("d1", ("b", "g5"), ("y1",), lambda x, s: (F.gelu(dec.norm1(dec.mix1(x))) + s,)),
        Block("d2", ("y1", "g4"), ("y2",),
              lambda x, s: (F.gelu(dec.norm2(dec.mix2(m._up(x, s)))) + s,)),
        Block("d3", ("y2", "g3"), ("y3",),
              lambda x, s: (dec.dropout(F.gelu(dec.norm3(dec.mix3(m._up(x, s)))) + s),)),
        Block("d4", ("y3", "g2"), ("y4",),
              lambda x, s: (F.gelu(dec.norm4(m._conv(dec.conv4, m._up(x, s)))) + s,)),
        Block("d5", ("y4", "g1"), ("y5",),
              lambda x, s: (F.gelu(dec.norm5(m._conv(dec.conv5, m._up(x, s)))) + s,)),
        Block("head", ("y5",), ("logits",), lambda x: (dec.head(x),)),
    ]
    return blocks


def run_chain(blocks: Sequence[Block], values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the blocks in order (no grad), adding their outputs to ``values``."""
    with torch.no_grad():
        for block in blocks:
            outs = block.fn(*(values[k] for k in block.inputs))
            values.update(zip(block.outputs, outs))
    return values


def time_block(block: Block | Callable, inputs: Sequence[torch.Tensor], device: torch.device,
               repeats: int, warmup: int, clock: ScanClock, name: str,
               needs_grad: Sequence[bool] | None = None) -> BlockTimes:
    """Median forward / backward / scan seconds and peak memory of one block in isolation.

    ``needs_grad`` (default: every floating input) says which inputs get a gradient; the
    network's input image does not, as in training."""
    result = BlockTimes(name)
    fn = block.fn if isinstance(block, Block) else block
    gen = torch.Generator(device="cpu").manual_seed(0)

    def once(record: bool) -> None:
        flags = needs_grad if needs_grad is not None else [True] * len(inputs)
        leaves = [t.detach().requires_grad_(t.is_floating_point() and flag)
                  for t, flag in zip(inputs, flags)]
        clock.reset()
        sync_device(device)
        start = time.perf_counter()
        outs = fn(*leaves)
        sync_device(device)
        middle = time.perf_counter()
        scan_fwd = clock.forward
        grads = [torch.randn(o.shape, generator=gen).to(device, o.dtype) for o in outs]
        sync_device(device)
        middle2 = time.perf_counter()
        torch.autograd.backward(outs, grads)
        sync_device(device)
        end = time.perf_counter()
        if record:
            result.forward.append(middle - start)
            result.backward.append(end - middle2)
            result.scan_forward.append(scan_fwd)
            result.scan_backward.append(clock.backward)

    for _ in range(warmup):
        once(False)
    for _ in range(repeats):
        once(True)
    with PeakMemory(device) as memory:
        once(False)
    result.peak_bytes = memory.peak_bytes
    return result


def profile_table(rows: Sequence[BlockTimes], title: str) -> str:
    med = statistics.median
    total_f = sum(med(r.forward) for r in rows)
    total_b = sum(med(r.backward) for r in rows)
    total = total_f + total_b
    lines = [title, "",
             "| block | fwd (s) | bwd (s) | fwd+bwd share | scan fwd (s) | scan bwd (s) "
             "| peak mem (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        f, b = med(r.forward), med(r.backward)
        lines.append(f"| {r.name} | {f:.3f} | {b:.3f} | {100 * (f + b) / total:.1f}% "
                     f"| {med(r.scan_forward):.3f} | {med(r.scan_backward):.3f} "
                     f"| {r.peak_bytes / 2**20:.0f} |")
    scan = sum(med(r.scan_forward) + med(r.scan_backward) for r in rows)
    lines.append(f"| **sum** | {total_f:.3f} | {total_b:.3f} | 100% "
                 f"| {sum(med(r.scan_forward) for r in rows):.3f} "
                 f"| {sum(med(r.scan_backward) for r in rows):.3f} | |")
    lines += ["", f"selective scan share of the summed step: {100 * scan / total:.1f}%"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Profile ``--profile-preset`` (default B) with ``--experts`` (default 2) at ``--size``."""
    from m4fuse.nets.model import M4Fuse, M4FuseConfig
    from m4fuse.training.engine import make_loss

    preset = getattr(args, "profile_preset", DEFAULT_PRESET)
    experts = args.experts
    threads = args.threads or 1
    torch.set_num_threads(threads)
    device = pick_device(args.device)
    size = list(args.size)
    repeats, warmup = args.repeats, args.warmup
    if args.quick:
        size, repeats, warmup = [16, 32, 32], 1, 0
    torch.manual_seed(0)
    model = M4Fuse(M4FuseConfig.preset(preset, num_experts=experts)).to(device)
    expert_index = 0
    x = torch.randn(1, 4, *size, device=device)
    target = (torch.rand(1, 3, *size, device=device) > 0.7).float()
    loss_fn = make_loss("regions")
    blocks = build_blocks(model, expert_index)

    model.eval()
    values = run_chain(blocks, {"x": x})
    with torch.no_grad():
        whole = model(x, torch.tensor([expert_index], device=device))
    err = (values["logits"] - whole).abs().max().item()
    scale = whole.abs().max().item()
    if not err <= 1e-5 * max(scale, 1e-12):
        raise SystemExit(f"profile chain differs from model(x): max |diff| {err:g} "
                         f"(max |logit| {scale:g}); benchmarks/profile_model.py is out of date")
    model.train()
    torch.manual_seed(0)
    values = run_chain(blocks, {"x": x})  # training-mode activations (dropout on)

    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"M4Fuse-{preset} ({experts} experts), input 1x4x{'x'.join(map(str, size))}, "
          f"float32, median of {repeats} after {warmup} warm-up", flush=True)
    rows = []
    with ScanClock(device) as clock:
        for block in blocks:
            print(f"profiling {block.name} ...", file=sys.stderr, flush=True)
            rows.append(time_block(block, [values[k] for k in block.inputs], device, repeats,
                                   warmup, clock, block.name,
                                   needs_grad=[k != "x" for k in block.inputs]))
        rows.append(time_block(lambda logits: (loss_fn(logits, target),), [values["logits"]],
                               device, repeats, warmup, clock, "loss (Dice+BCE)"))

        expert = torch.tensor([expert_index], device=device)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(x, expert), target).backward()

        whole = median_time(step, device, repeats, warmup)
    print()
    print(profile_table(rows, f"M4Fuse-{preset} blocks, forward and backward in isolation"))
    print(f"whole training step (forward + loss + backward, median): {whole:.3f} s")
    return 0
