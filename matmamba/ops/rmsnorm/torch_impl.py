"""Gated RMSNorm in PyTorch, with autograd. Same contract as :mod:`matmamba.ops.rmsnorm.naive`::

    norm_before_gate=False:  out = (x * silu(z)) * rsqrt(mean_G((x * silu(z))^2) + eps) * weight
    norm_before_gate=True:   out = x * rsqrt(mean_G(x^2) + eps) * weight * silu(z)

mean_G is over each group of ``group_size`` consecutive channels (default: all d). The groups
are a reshape (..., d/group_size, group_size). Float32 statistics, result in x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import check_rmsnorm_inputs, compute_dtype_for

Tensor = torch.Tensor


def gated_rmsnorm_torch(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    *,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
    group_size: int | None = None,
) -> Tensor:
    """x, z (..., d) (z may be None), weight (d,). Returns (..., d) in x.dtype."""
    group_size = check_rmsnorm_inputs(x, z, weight, group_size)
    dtype = compute_dtype_for(x, z, weight)
    dim = x.shape[-1]
    values = x.to(dtype)
    gate = F.silu(z.to(dtype)) if z is not None else None
    if gate is not None and not norm_before_gate:
        values = values * gate
    grouped = values.unflatten(-1, (dim // group_size, group_size))
    normed = grouped * torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = normed.flatten(-2) * weight.to(dtype)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)
