"""Sequential reference for the SSD (Mamba2) scan: one Python step per time position.

This is the test oracle: it follows the recurrence literally, keeps every intermediate in the
compute dtype (float64 when the inputs are float64) and is differentiable through autograd.

Besides the scan, this module holds what every implementation of the scan (and the single-step
decode update) shares: argument checking and the discretisation of ``dt``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Shared semantics
# ----------------------------------------------------------------------------------------------


def compute_dtype_for(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any floating argument is float64, float32 otherwise (also for fp16 / bf16)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_dt_limit(dt_limit) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"dt_limit must be a pair (low, high) of numbers; got {dt_limit!r}") from None
    if math.isnan(low) or math.isnan(high) or low > high:
        raise ValueError(f"dt_limit must be (low, high) with low <= high; got {dt_limit!r}")
    return low, high


def discretize_dt(
    dt: Tensor,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> Tensor:
    """The step size actually used, in ``dtype``; heads on the last axis of ``dt``::

        dt' = softplus(dt + dt_bias)  if dt_softplus  else  dt + dt_bias
        dt' = clamp(dt', dt_limit[0], dt_limit[1])

    softplus is ``torch.nn.functional.softplus`` (linear above 20, as in mamba_ssm). The clamp is
    always applied; with the default (0, inf) it only matters for negative ``dt + dt_bias``
    without softplus, which it sets to 0.
    """
    low, high = check_dt_limit(dt_limit)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=low, max=high)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_ssd_inputs(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_limit=(0.0, math.inf),
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[int, int, int, int, int, int]:
    """Check shapes against the ``ssd_scan`` contract; raise ValueError saying what was expected.

    Returns ``(batch, seqlen, nheads, headdim, ngroups, dstate)``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim); got shape {_shape(x)}")
    batch, seqlen, nheads, headdim = x.shape
    if dt.shape != (batch, seqlen, nheads):
        raise ValueError(
            f"dt must be (batch, seqlen, nheads) = ({batch}, {seqlen}, {nheads}) to match x "
            f"{_shape(x)}; got {_shape(dt)}"
        )
    if A.shape != (nheads,):
        raise ValueError(f"A must be (nheads,) = ({nheads},); got {_shape(A)}")
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen):
        raise ValueError(
            f"B must be (batch, seqlen, ngroups, dstate) with batch, seqlen = {batch}, {seqlen}; "
            f"got {_shape(B)}"
        )
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {_shape(B)}; got {_shape(C)}")
    ngroups, dstate = B.shape[2], B.shape[3]
    if ngroups < 1 or nheads % ngroups != 0:
        raise ValueError(
            f"the number of groups (B.shape[2] = {ngroups}) must divide nheads = {nheads}"
        )
    if D is not None and D.shape not in ((nheads,), (nheads, headdim)):
        raise ValueError(
            f"D must be (nheads,) = ({nheads},) or (nheads, headdim) = ({nheads}, {headdim}); "
            f"got {_shape(D)}"
        )
    if dt_bias is not None and dt_bias.shape != (nheads,):
        raise ValueError(f"dt_bias must be (nheads,) = ({nheads},); got {_shape(dt_bias)}")
    if initial_state is not None and initial_state.shape != (batch, nheads, headdim, dstate):
        raise ValueError(
            f"initial_state must be (batch, nheads, headdim, dstate) = "
            f"({batch}, {nheads}, {headdim}, {dstate}); got {_shape(initial_state)}"
        )
    if seq_idx is not None:
        if seq_idx.shape != (batch, seqlen):
            raise ValueError(
                f"seq_idx must be (batch, seqlen) = ({batch}, {seqlen}); got {_shape(seq_idx)}"
            )
        if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be an integer tensor (int32/int64); got {seq_idx.dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    check_dt_limit(dt_limit)
    return batch, seqlen, nheads, headdim, ngroups, dstate


# ----------------------------------------------------------------------------------------------
# The reference scan
# ----------------------------------------------------------------------------------------------


def ssd_scan_naive(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 256,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_state: bool = False,
):
    """SSD scan by a loop over time. Shapes (g groups, head j reads group j // (h // g))::

        x (b,l,h,p)  dt (b,l,h)  A (h,)  B, C (b,l,g,n)  D (h,) or (h,p)  dt_bias (h,)
        initial_state (b,h,p,n)  seq_idx (b,l)

    For every batch row and head, with dt' the discretised step (see :func:`discretize_dt`)::

        state_{-1} = initial_state (zeros if None)
        state_t    = 0                                  if t > 0 and seq_idx[t] != seq_idx[t-1]
        state_t    = exp(dt'_t A) state_{t-1} + dt'_t x_t B_t^T       (p, n): outer product
        y_t        = state_t C_t + D x_t                              (p,)

    So ``initial_state`` only feeds the first sequence of a packed row, and the final state is
    the state of the last sequence. ``chunk_size`` is accepted for signature parity and unused.

    Returns ``y`` (b,l,h,p) in x.dtype, and with ``return_final_state`` also the final state
    (b,h,p,n) in the compute dtype (float32, or float64 for float64 inputs).
    """
    batch, seqlen, nheads, headdim, ngroups, dstate = check_ssd_inputs(
        x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=dt_limit,
        initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size,
    )
    dtype = compute_dtype_for(x, dt, A, B, C, D, dt_bias, initial_state)
    step = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # (b,l,h)
    heads_per_group = nheads // ngroups
    # Give every head its own copy of its group's B and C: head j <- group j // heads_per_group.
    B_per_head = B.to(dtype).repeat_interleave(heads_per_group, dim=2)  # (b,l,h,n)
    C_per_head = C.to(dtype).repeat_interleave(heads_per_group, dim=2)
    x_c = x.to(dtype)
    A_c = A.to(dtype)

    if initial_state is None:
        state = torch.zeros(batch, nheads, headdim, dstate, dtype=dtype, device=x.device)
    else:
        state = initial_state.to(dtype)

    outputs = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            new_sequence = (seq_idx[:, t] != seq_idx[:, t - 1]).view(batch, 1, 1, 1)
            state = torch.where(new_sequence, torch.zeros_like(state), state)
        decay = torch.exp(step[:, t] * A_c)  # (b,h)
        # dt'_t x_t B_t^T, per head: (b,h,p,1) * (b,h,1,n)
        write = (step[:, t, :, None] * x_c[:, t])[..., None] * B_per_head[:, t, :, None, :]
        state = decay[:, :, None, None] * state + write
        outputs.append((state * C_per_head[:, t, :, None, :]).sum(dim=-1))  # (b,h,p)
    y = torch.stack(outputs, dim=1) if outputs else x_c.new_zeros(x.shape)

    if D is not None:
        D_c = D.to(dtype)
        y = y + (D_c[:, None] if D_c.dim() == 1 else D_c) * x_c
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y
