"""The SSD (Mamba2) selective scan: ``ssd_scan`` and its implementations.

- :func:`matmamba.ops.ssd.naive.ssd_scan_naive`: loop over time, the reference.
- :func:`matmamba.ops.ssd.chunked.ssd_scan_chunked`: chunked PyTorch form, autograd.
- ``matmamba.ops.ssd.triton_impl.ssd_scan_triton``: Triton kernels (CUDA), imported lazily.
"""

from __future__ import annotations

import math

import torch

from .._dispatch import pick_implementation
from .chunked import ssd_scan_chunked
from .naive import ssd_scan_naive

__all__ = ["ssd_scan", "ssd_scan_naive", "ssd_scan_chunked"]


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
):
    """SSD scan: per batch row and head (head j reads group j // (h // g) of B and C)::

        dt'_t   = clamp(softplus(dt_t + dt_bias) if dt_softplus else dt_t + dt_bias, *dt_limit)
        state_t = exp(dt'_t A) state_{t-1} + dt'_t x_t B_t^T     (state reset to 0 where seq_idx changes)
        y_t     = state_t C_t + D x_t

    Shapes: x (b,l,h,p), dt (b,l,h), A (h,), B, C (b,l,g,n), D (h,) or (h,p), dt_bias (h,),
    initial_state (b,h,p,n) (feeds only the first sequence of a packed row), seq_idx (b,l) int.
    Returns y (b,l,h,p) in x.dtype [, final_state (b,h,p,n) float32 (float64 for float64 inputs)].
    ``impl``: "auto" | "naive" | "torch" | "triton" (see :mod:`matmamba.ops._dispatch`).
    """
    fn = pick_implementation(
        "ssd", impl, (x, dt, A, B, C, D, dt_bias, initial_state, seq_idx),
        naive=ssd_scan_naive, torch_impl=ssd_scan_chunked, triton_name="ssd_scan_triton",
    )
    return fn(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, initial_state=initial_state, seq_idx=seq_idx,
        return_final_state=return_final_state,
    )
