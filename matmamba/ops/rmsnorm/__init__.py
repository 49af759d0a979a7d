"""Gated RMSNorm (Mamba2's output norm).

- :mod:`matmamba.ops.rmsnorm.naive`: loop over groups, the reference.
- :mod:`matmamba.ops.rmsnorm.torch_impl`: vectorised PyTorch, autograd.
- ``matmamba.ops.rmsnorm.triton_impl``: Triton kernels (CUDA), imported lazily.
"""

from __future__ import annotations

import torch

from .._dispatch import pick_implementation
from .naive import gated_rmsnorm_naive
from .torch_impl import gated_rmsnorm_torch

__all__ = ["gated_rmsnorm", "gated_rmsnorm_naive", "gated_rmsnorm_torch"]


def gated_rmsnorm(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
    group_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Gated RMSNorm over each group of ``group_size`` channels (default: the whole last axis)::

        norm_before_gate=False:  v = x * silu(z);  out = v * rsqrt(mean(v^2) + eps) * weight
        norm_before_gate=True:   out = x * rsqrt(mean(x^2) + eps) * weight * silu(z)

    x, z (..., d) (z may be None: no gate), weight (d,). Float32 statistics, result in x.dtype.
    ``impl``: "auto" | "naive" | "torch" | "triton".
    """
    fn = pick_implementation(
        "rmsnorm", impl, (x, z, weight),
        naive=gated_rmsnorm_naive, torch_impl=gated_rmsnorm_torch,
        triton_name="gated_rmsnorm_triton",
    )
    return fn(x, z, weight, eps=eps, norm_before_gate=norm_before_gate, group_size=group_size)
