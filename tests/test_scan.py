"""The chunked selective scan against the sequential reference, its memory bound and dispatch."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m4fuse.nets import scan
from m4fuse.nets.scan import selective_scan, selective_scan_chunked, selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    batch: int,
    dim: int,
    state: int,
    length: int,
    dtype: torch.dtype = torch.float64,
    with_d: bool = True,
    with_z: bool = True,
    with_bias: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Random inputs in mamba_ssm's layout with realistic ranges (A < 0, delta of any sign)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    inputs: dict[str, torch.Tensor | None] = {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length, scale=0.5),
        "A": -torch.exp(rnd(dim, state)).to(dtype),
        "B": rnd(batch, state, length),
        "C": rnd(batch, state, length),
        "D": rnd(dim) if with_d else None,
        "z": rnd(batch, dim, length) if with_z else None,
        "delta_bias": rnd(dim, scale=0.5) if with_bias else None,
    }
    for value in inputs.values():
        if value is not None:
            value.requires_grad_(True)
    return inputs


def run_both(
    inputs: dict[str, torch.Tensor | None], softplus: bool, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Outputs of reference and chunked scan, and (name, ref grad, chunked grad) per input."""
    args = [inputs[name] for name in NAMES]
    y_ref = selective_scan_ref(*args, delta_softplus=softplus)
    y = selective_scan_chunked(*args, delta_softplus=softplus, chunk_size=chunk)
    weight = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    present = [(n, t) for n, t in zip(NAMES, args) if t is not None]
    tensors = [t for _, t in present]
    g_ref = torch.autograd.grad((y_ref * weight).sum(), tensors)
    g = torch.autograd.grad((y * weight).sum(), tensors)
    return y_ref, y, [(n, a, b) for (n, _), a, b in zip(present, g_ref, g)]


@pytest.mark.parametrize(
    ("batch", "dim", "state", "length", "chunk"),
    [
        (2, 3, 4, 37, 8),  # L not a multiple of the chunk
        (1, 2, 3, 1, 8),  # a single token
        (2, 3, 2, 16, 16),  # exactly one chunk
        (1, 4, 5, 19, 1),  # chunk of one token
        (3, 2, 4, 23, 4),  # many chunks, odd tail
        (2, 3, 4, 10, 64),  # chunk longer than the sequence
    ],
)
@pytest.mark.parametrize("softplus", [True, False])
def test_matches_reference_float64(
    batch: int, dim: int, state: int, length: int, chunk: int, softplus: bool
) -> None:
    inputs = make_inputs(batch, dim, state, length)
    y_ref, y, grads = run_both(inputs, softplus, chunk)
    assert y.dtype == torch.float64 and y.shape == (batch, dim, length)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert {name for name, _, _ in grads} == set(NAMES)
    for name, g_ref, g in grads:
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize(
    ("with_d", "with_z", "with_bias"),
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
)
def test_optional_inputs_none(with_d: bool, with_z: bool, with_bias: bool) -> None:
    inputs = make_inputs(2, 3, 4, 21, with_d=with_d, with_z=with_z, with_bias=with_bias)
    y_ref, y, grads = run_both(inputs, softplus=True, chunk=8)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    expected = {"u", "delta", "A", "B", "C"} | {
        n for n, on in (("D", with_d), ("z", with_z), ("delta_bias", with_bias)) if on
    }
    assert {name for name, _, _ in grads} == expected
    for name, g_ref, g in grads:
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def harsh_inputs(dtype: torch.dtype, length: int = 200) -> dict[str, torch.Tensor | None]:
    """Realistic extremes: delta up to ~5 after softplus, A down to -16*e^2 (~ -118)."""
    inputs = make_inputs(2, 8, 16, length, dtype=torch.float64, seed=3)
    gen = torch.Generator().manual_seed(4)
    a_log = torch.log(torch.arange(1, 17, dtype=torch.float64)).repeat(8, 1)
    a_log = a_log + torch.linspace(0.0, 2.0, 8, dtype=torch.float64)[:, None]
    inputs["A"] = -torch.exp(a_log)
    inputs["delta"] = torch.rand(2, 8, length, generator=gen, dtype=torch.float64) * 10 - 5
    return {
        k: None if v is None else v.detach().to(dtype).requires_grad_(True)
        for k, v in inputs.items()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_is_finite_and_close(dtype: torch.dtype) -> None:
    inputs = harsh_inputs(dtype)
    assert float(inputs["A"].detach().min()) < -100  # the range we claim to survive
    args = [inputs[name] for name in NAMES]
    y = selective_scan_chunked(*args, delta_softplus=True)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    # Reference in float64 on exactly the same (rounded) inputs.
    ref_args = [
        None if t is None else t.detach().double().requires_grad_(True) for t in args
    ]
    y_ref = selective_scan_ref(*ref_args, delta_softplus=True)
    y_ref.square().sum().backward()
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.double(), y_ref.to(dtype).double(), rtol=tol, atol=tol)
    for name, t, r in zip(NAMES, args, ref_args):
        assert t.grad is not None and torch.isfinite(t.grad.float()).all(), name
        if dtype == torch.float32:  # low-precision grads are only required to be finite
            scale = float(r.grad.abs().max()) + 1.0
            torch.testing.assert_close(
                t.grad.double() / scale, r.grad / scale, rtol=1e-4, atol=1e-4, msg=name
            )


def test_saved_tensors_do_not_scale_with_history() -> None:
    """Autograd keeps inputs and one (B, N, D) state per chunk, never the L*D*N history."""
    batch, dim, state, length, chunk = 1, 8, 16, 4096, 64
    inputs = make_inputs(batch, dim, state, length, dtype=torch.float32)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan_chunked(
            *[inputs[n] for n in NAMES], delta_softplus=True, chunk_size=chunk
        )
    history = batch * dim * state * length
    assert max(saved) <= max(history // chunk, batch * max(dim, state) * length)
    inputs_numel = sum(t.numel() for t in inputs.values() if t is not None)
    assert sum(saved) <= 3 * inputs_numel + history // chunk
    assert sum(saved) < history
    y.sum().backward()  # the recompute-backward still works from what was kept
    assert inputs["A"].grad is not None and torch.isfinite(inputs["A"].grad).all()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_working_memory_is_bounded_by_chunk() -> None:
    """No op allocates anything near L*D*N, in forward or backward; the reference does."""
    batch, dim, state, length, chunk = 1, 32, 16, 1024, 64
    inputs = make_inputs(batch, dim, state, length, dtype=torch.float32)
    args = [inputs[n] for n in NAMES]
    history = batch * dim * state * length
    with _LargestTensor() as probe:
        selective_scan_chunked(*args, delta_softplus=True, chunk_size=chunk).sum().backward()
    assert probe.largest <= max(chunk * batch * dim * state, batch * max(dim, state) * length)
    assert probe.largest < history // 8
    with _LargestTensor() as probe_peer:  # the probe does see a full-history tensor
        torch.exp(inputs["delta"].detach()[..., None] * inputs["A"].detach()[:, None, :])
    assert probe_peer.largest == history


def test_per_sample_gradients_under_torch_func() -> None:
    """vmap(grad(...)) (what Opacus uses for per-sample gradients) runs the out-of-place path
    and gives each sample's own gradient, equal to the reference run on that sample alone."""
    inputs = make_inputs(3, 2, 3, 11)
    args = {k: v.detach() for k, v in inputs.items() if v is not None}
    params = {"A": args.pop("A"), "D": args.pop("D"), "delta_bias": args.pop("delta_bias")}

    def loss(p: dict[str, torch.Tensor], u, delta, B, C, z):  # noqa: ANN001
        y = selective_scan(u[None], delta[None], p["A"], B[None], C[None], p["D"], z[None],
                           p["delta_bias"], delta_softplus=True)
        return y.square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0, 0, 0))(
        params, args["u"], args["delta"], args["B"], args["C"], args["z"]
    )
    for i in range(3):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        y = selective_scan_ref(args["u"][i : i + 1], args["delta"][i : i + 1], leaves["A"],
                               args["B"][i : i + 1], args["C"][i : i + 1], leaves["D"],
                               args["z"][i : i + 1], leaves["delta_bias"], delta_softplus=True)
        y.square().sum().backward()
        for name, leaf in leaves.items():
            torch.testing.assert_close(per_sample[name][i], leaf.grad, msg=f"{name}[{i}]")


def test_dispatch_uses_fused_kernel_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def fake_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):  # noqa: ANN001
        calls.append({"D": D, "z": z, "delta_bias": delta_bias, "softplus": delta_softplus})
        return torch.full_like(u, 7.0)

    fake = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    fake.selective_scan_fn = fake_fn  # type: ignore[attr-defined]
    inputs = make_inputs(1, 2, 3, 5, with_z=False)
    args = [inputs[n] for n in NAMES]
    expected = selective_scan_ref(*args, delta_softplus=True)

    # 1) CPU tensors, mamba_ssm absent: the PyTorch path.
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", None)
    assert scan._fused_selective_scan() is None
    torch.testing.assert_close(selective_scan(*args, delta_softplus=True), expected)
    # 2) "CUDA" tensors but mamba_ssm absent: still the PyTorch path, silently.
    monkeypatch.setattr(scan, "_on_cuda", lambda t: True)
    torch.testing.assert_close(selective_scan(*args, delta_softplus=True), expected)
    # 3) "CUDA" tensors and mamba_ssm present: the fused kernel, with every argument.
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", fake)
    out = selective_scan(*args, delta_softplus=True)
    assert torch.equal(out, torch.full_like(out, 7.0))
    assert calls == [
        {"D": inputs["D"], "z": None, "delta_bias": inputs["delta_bias"], "softplus": True}
    ]
    # 4) mamba_ssm present but CPU tensors: the PyTorch path.
    monkeypatch.setattr(scan, "_on_cuda", lambda t: t.is_cuda)
    torch.testing.assert_close(selective_scan(*args, delta_softplus=True), expected)
    assert len(calls) == 1


def test_bad_arguments_name_the_culprit() -> None:
    inputs = make_inputs(2, 3, 4, 6)
    args = [inputs[n] for n in NAMES]
    with pytest.raises(ValueError, match=r"C must have shape \(2, 4, 6\)"):
        selective_scan(*args[:4], args[4][:, :, :5], *args[5:])
    with pytest.raises(ValueError, match=r"A must be \(D=3, N\)"):
        selective_scan(args[0], args[1], args[2][:2], *args[3:])
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        selective_scan_chunked(*args, chunk_size=0)


def test_bench_model_quick_scan_table(capsys: pytest.CaptureFixture[str]) -> None:
    """Smoke test of ``m4fuse bench model --quick --skip-models`` (the scan table only: the
    network table needs the MONAI import and several seconds of compute, too slow here)."""
    from m4fuse.cli.main import main

    assert main(["bench", "model", "--quick", "--skip-models"]) == 0
    out = capsys.readouterr().out
    assert "| M4Fuse-" not in out
    scan_row = next(line for line in out.splitlines() if line.startswith("| 64 |"))
    cells = [c.strip() for c in scan_row.strip("|").split("|")]
    assert len(cells) == 7
    assert float(cells[1]) > 0 and float(cells[2]) > 0  # both scans timed
    assert float(cells[3]) > 0  # the speed-up column
