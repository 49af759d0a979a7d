"""Single-token SSD state update in PyTorch (vectorised over heads), for decoding.

Same contract as :mod:`matmamba.ops.state_update.naive`; heads are viewed as
(group, head-within-group) so B and C are broadcast, never copied::

    state = exp(dt' A) state + dt' x B^T ;   y = state C + D x
"""

from __future__ import annotations

import math

import torch

from ..ssd.naive import compute_dtype_for, discretize_dt
from .naive import check_state_update_inputs

Tensor = torch.Tensor


def ssd_state_update_torch(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> Tensor:
    """state (b,h,p,n) updated in place; x (b,h,p); dt (b,h); A (h,); B, C (b,g,n); D (h,) or
    (h,p); dt_bias (h,). Returns y (b,h,p) in x.dtype."""
    batch, nheads, headdim, ngroups, dstate = check_state_update_inputs(
        state, x, dt, A, B, C, D, dt_bias, dt_limit
    )
    dtype = compute_dtype_for(state, x, dt, A, B, C, D, dt_bias)
    heads_per_group = nheads // ngroups
    step = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype).view(batch, ngroups, heads_per_group)
    decay = torch.exp(step * A.to(dtype).view(ngroups, heads_per_group))  # (b,g,r)
    x_c = x.to(dtype).view(batch, ngroups, heads_per_group, headdim)
    B_c = B.to(dtype)
    # Read the old state from a copy when autograd may save it: `state` is overwritten below.
    old = state.to(dtype, copy=torch.is_grad_enabled()).view(batch, ngroups, heads_per_group, headdim, dstate)
    # exp(dt' A) state + dt' x B^T                                            (b,g,r,p,n)
    new = decay[..., None, None] * old + torch.einsum("bgr,bgrp,bgn->bgrpn", step, x_c, B_c)
    state.copy_(new.view(batch, nheads, headdim, dstate))
    y = torch.einsum("bgrpn,bgn->bgrp", new, C.to(dtype)).reshape(batch, nheads, headdim)
    if D is not None:
        D_c = D.to(dtype)
        y = y + (D_c[:, None] if D_c.dim() == 1 else D_c) * x.to(dtype)
    return y.to(x.dtype)
