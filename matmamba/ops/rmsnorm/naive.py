"""Reference gated RMSNorm: an explicit loop over normalisation groups.

Also holds the argument checking shared by every implementation. With d = x.shape[-1] and the
last axis cut into groups of ``group_size`` (default d) channels, for each group G::

    norm_before_gate=False (Mamba2's default):
        v   = x * silu(z)                      (v = x when z is None)
        out = v * rsqrt(mean_{c in G}(v_c^2) + eps) * weight
    norm_before_gate=True:
        out = x * rsqrt(mean_{c in G}(x_c^2) + eps) * weight * silu(z)

Statistics and arithmetic in float32 (float64 for float64 inputs); the result is in x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def compute_dtype_for(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any argument is float64, float32 otherwise (also for fp16 / bf16)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_rmsnorm_inputs(x: Tensor, z: Tensor | None, weight: Tensor, group_size: int | None) -> int:
    """Check against the ``gated_rmsnorm`` contract. Returns the group size to use."""
    if x.dim() < 1:
        raise ValueError(f"x must be (..., dim) with at least one axis; got shape {_shape(x)}")
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight must be (dim,) = ({dim},) to match x {_shape(x)}; got {_shape(weight)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have the shape of x {_shape(x)}; got {_shape(z)}")
    if group_size is None:
        return dim
    if not isinstance(group_size, int) or group_size < 1 or dim % group_size != 0:
        raise ValueError(f"group_size must be a positive int dividing dim = {dim}; got {group_size!r}")
    return group_size


def gated_rmsnorm_naive(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    *,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
    group_size: int | None = None,
) -> Tensor:
    """Gated RMSNorm, one group at a time (see the module docstring). x, z (..., d), weight (d,)."""
    group_size = check_rmsnorm_inputs(x, z, weight, group_size)
    dtype = compute_dtype_for(x, z, weight)
    values = x.to(dtype)
    gate = F.silu(z.to(dtype)) if z is not None else None
    if gate is not None and not norm_before_gate:
        values = values * gate
    pieces = []
    for start in range(0, x.shape[-1], group_size):
        group = values[..., start : start + group_size]
        mean_square = (group * group).sum(dim=-1, keepdim=True) / group_size
        pieces.append(group / torch.sqrt(mean_square + eps))
    out = torch.cat(pieces, dim=-1) * weight.to(dtype)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)
