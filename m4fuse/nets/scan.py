"""Selective scan (the S6 recurrence of Mamba), memory-bounded, in plain PyTorch.

Layout follows ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

    u, delta, z : (B, D, L)      A : (D, N)      B, C : (B, N, L)      D : (D,)
    delta <- softplus(delta + delta_bias)       (each step only when asked)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (h: (B, D, N), h_{-1} = 0)
    y_t = <C_t, h_t> + D * u_t ;  y = y * silu(z) when z is given  -> (B, D, L)

:func:`selective_scan` is the entry point the network uses. On CUDA tensors, when the
``mamba_ssm`` package is importable, it calls that package's fused kernel; everywhere else it
runs :func:`selective_scan_chunked`, which:

* cuts the sequence into chunks of ``chunk_size`` tokens and walks them in order, carrying only
  the (B, D, N) state from one chunk to the next, so no tensor ever holds the full
  (L x D x N) history: working memory is O(chunk * B * D * N), not O(L * B * D * N);
* inside a chunk, solves the linear recurrence with a log-depth (Hillis-Steele) parallel scan
  over the token axis: ``log2(chunk)`` vectorised steps instead of a Python loop per token.
  It multiplies only decay factors exp(delta * A) <= 1 together, so unlike the
  "cumulative log-decay" factorisation exp(cum_t) * exp(-cum_s) it can never overflow, even
  for delta ~ 5 and A ~ -16 * e^k (float32 products just underflow to an exact 0);
* is a custom :class:`torch.autograd.Function` whose backward walks the chunks in reverse,
  recomputing each chunk's states from the saved chunk-boundary state and running the adjoint
  recurrence (a reverse scan) inside the chunk. Autograd keeps only the inputs and one
  (B, D, N) state per chunk: L / chunk_size times less than the full history.

Under torch.func transforms (vmap/grad, as Opacus uses for per-sample gradients) the same
chunked scan runs with out-of-place ops and ordinary autograd instead of the custom Function.

bfloat16 / float16 inputs are upcast to float32 inside (float64 stays float64) and the output
is cast back to ``u``'s dtype. :func:`selective_scan_ref` is the slow sequential reference,
for tests only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Chunk size (tokens per chunk) of the PyTorch path, chosen by measurement: forward+backward
# CPU seconds (process time, 1 thread, median of 3, float32, B=4, D=128, N=16) on a 2-core
# AMD EPYC (2 MiB L2 per core). L=8192: 16 -> 1.39, 32 -> 1.21 / 1.31, 48 -> 1.27,
# 64 -> 1.30 / 1.32, 96 -> 1.49, 128 -> 1.71, 256 -> 2.31 (two sweeps where two numbers);
# L=2048: 16 -> 0.29, 32 -> 0.31, 64 -> 0.30, 128 -> 0.42. Small chunks pay per-chunk Python
# and dispatch overhead; large ones pay log2(chunk) passes over a working set that no longer
# fits in L2. 32..64 is flat within noise; 64 halves the number of chunk iterations (better
# for multi-threaded ops and, untested here, for CUDA kernel-launch counts).
DEFAULT_CHUNK_SIZE: int = 64


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Sequential reference, one step per token. Slow; for tests only."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)  # (B, D, N)
        dBu = delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        h = dA * h + dBu
        ys.append((h * C[:, None, :, t]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def _check_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the first argument whose shape breaks the layout."""
    if u.dim() != 3:
        raise ValueError(f"u must be (B, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError(f"u must hold at least one token, got shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D={dim}, N), got shape {tuple(A.shape)}")
    state = A.shape[1]
    expected = {
        "delta": (delta, (batch, dim, length)),
        "B": (B, (batch, state, length)),
        "C": (C, (batch, state, length)),
        "D": (D, (dim,)),
        "z": (z, (batch, dim, length)),
        "delta_bias": (delta_bias, (dim,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} (u is {tuple(u.shape)}, A is "
                f"{tuple(A.shape)}), got {tuple(tensor.shape)}"
            )


def _scan_(
    a: torch.Tensor,
    x: torch.Tensor,
    a_tmp: torch.Tensor,
    x_tmp: torch.Tensor,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hillis-Steele inclusive scan of ``h_t = a_t * h_{t-1} + x_t`` along dim 0, h_{-1} = 0.

    With ``reverse`` it solves ``h_t = a_t * h_{t+1} + x_t`` instead (the adjoint direction).
    ``a`` and ``x`` are overwritten; ``a_tmp``/``x_tmp`` are same-shaped workspaces, so a
    chunk loop allocates nothing. Returns ``(h, spare)``: the buffer that holds the result and
    the other x buffer, now free. Written by hand because no PyTorch op scans a first-order
    linear recurrence (torch.cumsum/cumprod cannot, and the log-space cumsum form overflows).
    """
    length = x.shape[0]
    k = 1
    while k < length:
        if reverse:  # h_t += (a_t ... a_{t+k-1}) * h_{t+k}
            torch.addcmul(x[:-k], a[:-k], x[k:], out=x_tmp[:-k])
            x_tmp[-k:].copy_(x[-k:])
        else:  # h_t += (a_{t-k+1} ... a_t) * h_{t-k}
            torch.addcmul(x[k:], a[k:], x[:-k], out=x_tmp[k:])
            x_tmp[:k].copy_(x[:k])
        x, x_tmp = x_tmp, x
        if 2 * k < length:  # window products for the next level; not needed after the last
            if reverse:
                torch.mul(a[:-k], a[k:], out=a_tmp[:-k])
                a_tmp[-k:].copy_(a[-k:])
            else:
                torch.mul(a[k:], a[:-k], out=a_tmp[k:])
                a_tmp[:k].copy_(a[:k])
            a, a_tmp = a_tmp, a
        k *= 2
    return x, x_tmp


class _ChunkedScan(torch.autograd.Function):
    """Core recurrence ``y_t = <C_t, h_t>`` on time-major, contiguous tensors.

    u, delta: (L, B, D); At = A transposed: (N, D); B, C: (L, B, N) -> y (L, B, D). States are
    held as (T, B, N, D): each chunk is one contiguous block, every scan step is a plain
    vectorised op over contiguous memory, and the contractions over N and D are batched
    row-vector x matrix products (measured 2-5x faster than reducing a trailing N=16 axis).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        u: torch.Tensor,
        delta: torch.Tensor,
        At: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        length, batch, dim = u.shape
        state = At.shape[0]
        step = min(chunk, length)
        a, x, a_tmp, x_tmp = (u.new_empty(step, batch, state, dim) for _ in range(4))
        starts = range(0, length, step)
        boundary = u.new_empty(len(starts), batch, state, dim)
        y = u.new_empty(length, batch, dim)
        h_last = u.new_zeros(batch, state, dim)
        for i, s in enumerate(starts):
            e = min(s + step, length)
            t = e - s
            boundary[i].copy_(h_last)
            ca, cx = a[:t], x[:t]
            torch.mul(delta[s:e, :, None, :], At, out=ca)
            ca.exp_()
            torch.mul((delta[s:e] * u[s:e])[:, :, None, :], B[s:e, :, :, None], out=cx)
            cx[0].addcmul_(ca[0], h_last)  # carry the previous chunk's state in
            h, _ = _scan_(ca, cx, a_tmp[:t], x_tmp[:t])
            torch.bmm(
                C[s:e].reshape(t * batch, 1, state),
                h.view(t * batch, state, dim),
                out=y[s:e].view(t * batch, 1, dim),
            )
            h_last = h[-1].clone()
        ctx.save_for_backward(u, delta, At, B, C, boundary)
        ctx.chunk = step
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        u, delta, At, B, C, boundary = ctx.saved_tensors
        step: int = ctx.chunk
        length, batch, dim = u.shape
        state = At.shape[0]
        grad_y = grad_y.contiguous()
        decay, work, xs, gh, t1, t2, gda = (
            u.new_empty(step, batch, state, dim) for _ in range(7)
        )
        grad_u = torch.empty_like(u)
        grad_delta = torch.empty_like(delta)
        grad_B = torch.empty_like(B)
        grad_C = torch.empty_like(C)
        grad_At = u.new_zeros(batch, state, dim)  # summed over batch at the end
        carry = u.new_zeros(batch, state, dim)  # a_{t+1} * lambda_{t+1} from the next chunk
        for i in reversed(range(boundary.shape[0])):
            s = i * step
            e = min(s + step, length)
            t = e - s
            tb = t * batch
            h0 = boundary[i]
            d_c, u_c, gy = delta[s:e], u[s:e], grad_y[s:e]
            du = d_c * u_c
            a, w = decay[:t], work[:t]
            h, spare = _recompute_chunk(a, w, xs[:t], t1[:t], t2[:t], d_c, du, At, B[s:e], h0)
            # Adjoint: lambda_t = C_t * gy_t + a_{t+1} * lambda_{t+1}.
            g = gh[:t]
            torch.mul(gy[:, :, None, :], C[s:e, :, :, None], out=g)
            g[-1].add_(carry)
            w[:-1].copy_(a[1:])
            w[-1].fill_(1.0)  # a_{t+1} of the last token is never used (carry holds it)
            # h lives in one x buffer and `spare` is the other; work/t1 are free again.
            lam, _ = _scan_(w, g, t1[:t], spare, reverse=True)
            carry = a[0] * lam[0]
            # d(loss)/d(delta_t * A) = lambda_t * a_t * h_{t-1}.
            gd = gda[:t]
            torch.mul(lam, a, out=gd)
            gd[1:].mul_(h[:-1])
            gd[0].mul_(h0)
            h_rows = h.view(tb, state, dim)
            lam_rows = lam.view(tb, state, dim)
            grad_C[s:e] = torch.bmm(h_rows, gy.reshape(tb, dim, 1)).view(t, batch, state)
            grad_B[s:e] = torch.bmm(lam_rows, du.reshape(tb, dim, 1)).view(t, batch, state)
            lam_b = torch.bmm(B[s:e].reshape(tb, 1, state), lam_rows).view(t, batch, dim)
            grad_u[s:e] = d_c * lam_b
            grad_delta[s:e] = u_c * lam_b
            torch.mul(gd, At, out=a)  # `a` is no longer needed: reuse its buffer
            grad_delta[s:e] += a.sum(2)
            gd.mul_(d_c[:, :, None, :])
            grad_At += gd.sum(0)
        return grad_u, grad_delta, grad_At.sum(0), grad_B, grad_C, None


def _recompute_chunk(
    a: torch.Tensor, w: torch.Tensor, x: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
    delta: torch.Tensor, du: torch.Tensor, At: torch.Tensor, B: torch.Tensor, h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute one chunk's states from its boundary state ``h0`` (the backward pass of
    :class:`_ChunkedScan`): the decays ``exp(delta_t A)`` into ``a`` (and a copy in ``w``,
    scanned over), the inputs ``delta_t u_t B_t`` into ``x``; returns ``(h, the spare buffer)``
    of :func:`_scan_` over ``(w, x)`` with ``t1``/``t2``."""
    torch.mul(delta[:, :, None, :], At, out=a)
    a.exp_()
    w.copy_(a)
    torch.mul(du[:, :, None, :], B[:, :, :, None], out=x)
    x[0].addcmul_(a[0], h0)
    return _scan_(w, x, t1, t2)


def _functorch_active() -> bool:
    """True inside torch.func transforms (vmap/grad), e.g. Opacus' per-sample gradients."""
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


def _chunked_autograd(
    u: torch.Tensor, delta: torch.Tensor, At: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """The same chunked log-depth scan as :class:`_ChunkedScan`, out-of-place ops only.

    Used under torch.func transforms (vmap/grad: Opacus' per-sample gradients), which cannot
    run a custom Function that writes into preallocated buffers. Autograd saves every chunk's
    intermediates here, so memory is O(L*B*N*D) like any unfused scan; this path is for
    differential-privacy training, where the transform runs one sample at a time anyway.
    """
    length = u.shape[0]
    step = min(chunk, length)
    h = u.new_zeros(u.shape[1], At.shape[0], u.shape[2])
    ys = []
    for s in range(0, length, step):
        e = min(s + step, length)
        a = torch.exp(delta[s:e, :, None, :] * At)
        x = (delta[s:e] * u[s:e])[:, :, None, :] * B[s:e, :, :, None]
        x = torch.cat([x[:1] + a[:1] * h, x[1:]])
        k = 1
        while k < e - s:
            x = torch.cat([x[:k], torch.addcmul(x[k:], a[k:], x[:-k])])
            if 2 * k < e - s:
                a = torch.cat([a[:k], a[k:] * a[:-k]])
            k *= 2
        ys.append(torch.matmul(C[s:e, :, None, :], x).squeeze(2))
        h = x[-1]
    return torch.cat(ys)


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The plain-PyTorch path of :func:`selective_scan` (any device, memory-bounded).

    ``chunk_size`` (default :data:`DEFAULT_CHUNK_SIZE` = 64 tokens) bounds the working set to
    ``chunk_size * B * D * N`` elements per buffer. Softplus, bias, D and z gating are O(B*D*L)
    and use ordinary autograd; only the O(B*D*N*L) recurrence is the custom Function.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = torch.promote_types(u.dtype, torch.float32)
    for tensor in (delta, A, B, C):
        dtype = torch.promote_types(dtype, tensor.dtype)
    u_c = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def time_major(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).permute(2, 0, 1).contiguous()

    core = _chunked_autograd if _functorch_active() else _ChunkedScan.apply
    y = core(
        time_major(u_c),
        time_major(delta),
        A.to(dtype).t().contiguous(),
        time_major(B),
        time_major(C),
        chunk_size,
    ).permute(1, 2, 0)
    if D is not None:
        y = y + u_c * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype)


def _on_cuda(tensor: torch.Tensor) -> bool:
    """Whether the fused CUDA kernel could take this tensor (a seam for dispatch tests)."""
    return tensor.is_cuda


def _fused_selective_scan() -> Callable[..., torch.Tensor] | None:
    """``mamba_ssm``'s fused ``selective_scan_fn`` if that package imports, else None."""
    try:
        module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except ImportError:
        return None
    return getattr(module, "selective_scan_fn", None)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Selective scan in ``mamba_ssm``'s layout (see the module docstring); returns (B, D, L).

    Uses ``mamba_ssm``'s fused CUDA kernel when the tensors are on CUDA and the package is
    installed; otherwise, silently, :func:`selective_scan_chunked` (same maths, any device).
    Defaults follow ``selective_scan_fn`` (Gu & Dao, "Mamba", 2023): ``D=None`` (no skip
    term), ``z=None`` (no gate), ``delta_bias=None`` (no bias), ``delta_softplus=False``.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if _on_cuda(u):
        fused = _fused_selective_scan()
        if fused is not None:
            return fused(
                u, delta, A, B, C, D, z, delta_bias=delta_bias, delta_softplus=delta_softplus
            )
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
