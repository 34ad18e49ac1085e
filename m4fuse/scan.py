"""Selective scan (the S6 recurrence of Mamba).

Layout follows ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

    u, delta, z : (B, D, L)      A : (D, N)      B, C : (B, N, L)      D : (D,)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (h: (B, D, N))
    y_t = <C_t, h_t> + D * u_t ;  y = y * silu(z) when z is given  -> (B, D, L)

PLACEHOLDER until the chunked scan lands: ``selective_scan`` calls the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
