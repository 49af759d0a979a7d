"""Single-token SSD state update for decoding: ``ssd_state_update``.

- :mod:`matmamba.ops.state_update.naive`: loop over heads, the reference.
- :mod:`matmamba.ops.state_update.torch_impl`: vectorised PyTorch.
- ``matmamba.ops.state_update.triton_impl``: Triton kernel (CUDA), imported lazily.
"""

from __future__ import annotations

import math

import torch

from .._dispatch import pick_implementation
from .naive import ssd_state_update_naive
from .torch_impl import ssd_state_update_torch

__all__ = ["ssd_state_update", "ssd_state_update_naive", "ssd_state_update_torch"]


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    impl: str = "auto",
) -> torch.Tensor:
    """One step of the SSD recurrence, per batch row and head (group j // (h // g))::

        dt'   = clamp(softplus(dt + dt_bias) if dt_softplus else dt + dt_bias, *dt_limit)
        state = exp(dt' A) state + dt' x B^T        (in place)
        y     = state C + D x

    state (b,h,p,n) float32, x (b,h,p), dt (b,h), A (h,), B, C (b,g,n), D (h,) or (h,p),
    dt_bias (h,). Returns y (b,h,p) in x.dtype. ``impl``: "auto" | "naive" | "torch" | "triton".
    """
    fn = pick_implementation(
        "state_update", impl, (state, x, dt, A, B, C, D, dt_bias),
        naive=ssd_state_update_naive, torch_impl=ssd_state_update_torch,
        triton_name="ssd_state_update_triton",
    )
    return fn(
        state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit
    )
