"""Reference single-token SSD state update (decoding): an explicit loop over heads.

Also holds the argument checking shared by every implementation. One step of the
:func:`matmamba.ops.ssd_scan` recurrence, for each batch row and head j (group j // (h // g))::

    dt'   = clamp(softplus(dt + dt_bias) if dt_softplus else dt + dt_bias, *dt_limit)
    state = exp(dt' A) state + dt' x B^T          (p, n), written into ``state`` in place
    y     = state C + D x                         (p,)
"""

from __future__ import annotations

import math

import torch

from ..ssd.naive import check_dt_limit, compute_dtype_for, discretize_dt

Tensor = torch.Tensor


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_state_update_inputs(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    dt_bias: Tensor | None,
    dt_limit,
) -> tuple[int, int, int, int, int]:
    """Check against the ``ssd_state_update`` contract. Returns (batch, nheads, headdim, ngroups, dstate)."""
    if state.dim() != 4:
        raise ValueError(f"state must be (batch, nheads, headdim, dstate); got shape {_shape(state)}")
    if not state.dtype.is_floating_point:
        raise ValueError(f"state must be a floating tensor (float32); got {state.dtype}")
    batch, nheads, headdim, dstate = state.shape
    if x.shape != (batch, nheads, headdim):
        raise ValueError(
            f"x must be (batch, nheads, headdim) = ({batch}, {nheads}, {headdim}) to match state "
            f"{_shape(state)}; got {_shape(x)}"
        )
    if dt.shape != (batch, nheads):
        raise ValueError(f"dt must be (batch, nheads) = ({batch}, {nheads}); got {_shape(dt)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be (nheads,) = ({nheads},); got {_shape(A)}")
    if B.dim() != 3 or B.shape[0] != batch or B.shape[2] != dstate:
        raise ValueError(
            f"B must be (batch, ngroups, dstate) with batch = {batch}, dstate = {dstate}; got {_shape(B)}"
        )
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {_shape(B)}; got {_shape(C)}")
    ngroups = B.shape[1]
    if ngroups < 1 or nheads % ngroups != 0:
        raise ValueError(f"the number of groups (B.shape[1] = {ngroups}) must divide nheads = {nheads}")
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(
            f"D must be (nheads,) = ({nheads},) or (nheads, headdim) = ({nheads}, {headdim}); "
            f"got {_shape(D)}"
        )
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must be (nheads,) = ({nheads},); got {_shape(dt_bias)}")
    check_dt_limit(dt_limit)
    return batch, nheads, headdim, ngroups, dstate


def ssd_state_update_naive(
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
    (h,p); dt_bias (h,). Returns y (b,h,p) in x.dtype. Computed one head at a time."""
    batch, nheads, headdim, ngroups, dstate = check_state_update_inputs(
        state, x, dt, A, B, C, D, dt_bias, dt_limit
    )
    dtype = compute_dtype_for(state, x, dt, A, B, C, D, dt_bias)
    step = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # (b,h)
    heads_per_group = nheads // ngroups
    # Read the old state from a copy when autograd may save it: `state` is overwritten below.
    old_state = state.to(dtype, copy=torch.is_grad_enabled())
    outputs = []
    for head in range(nheads):
        group = head // heads_per_group
        b_vec = B[:, group].to(dtype)  # (b,n)
        c_vec = C[:, group].to(dtype)
        x_head = x[:, head].to(dtype)  # (b,p)
        dt_head = step[:, head, None, None]  # (b,1,1)
        old = old_state[:, head]  # (b,p,n)
        new = torch.exp(dt_head * A[head].to(dtype)) * old + dt_head * x_head[:, :, None] * b_vec[:, None, :]
        state[:, head] = new
        y_head = torch.einsum("bpn,bn->bp", new, c_vec)
        if D is not None:
            y_head = y_head + D[head].to(dtype) * x_head
        outputs.append(y_head)
    return torch.stack(outputs, dim=1).to(x.dtype)
