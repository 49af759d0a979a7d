"""Causal depthwise conv1d (+ optional SiLU) over channels-last input, and its decode step.

- :mod:`matmamba.ops.conv1d.naive`: loops over time and taps, the reference.
- :mod:`matmamba.ops.conv1d.torch_impl`: ``F.conv1d`` / masked unfold, autograd.
- ``matmamba.ops.conv1d.triton_impl``: Triton kernels (CUDA), imported lazily.
"""

from __future__ import annotations

import torch

from .._dispatch import pick_implementation
from .naive import causal_conv1d_naive, causal_conv1d_update_naive
from .torch_impl import causal_conv1d_torch, causal_conv1d_update_torch

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "causal_conv1d_naive",
    "causal_conv1d_update_naive",
    "causal_conv1d_torch",
    "causal_conv1d_update_torch",
]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
):
    """``y[t, c] = act(bias[c] + sum_k weight[c, k] * x[t - (w-1) + k, c])``, act = SiLU or None.

    x (b,l,d) channels-last, may be a strided view; weight (d,w); bias (d,);
    initial_state (b,d,w-1): the w-1 inputs before x[:, 0] (oldest first); seq_idx (b,l): inputs
    from another sequence count as 0 (the initial state belongs to the first sequence).
    Returns y (b,l,d) in x.dtype [, final_state (b,d,w-1): the last w-1 inputs, those not in the
    row's last sequence zeroed]. ``impl``: "auto" | "naive" | "torch" | "triton".
    """
    fn = pick_implementation(
        "conv1d", impl, (x, weight, bias, seq_idx, initial_state),
        naive=causal_conv1d_naive, torch_impl=causal_conv1d_torch,
        triton_name="causal_conv1d_triton",
    )
    return fn(
        x, weight, bias, activation=activation, seq_idx=seq_idx, initial_state=initial_state,
        return_final_state=return_final_state,
    )


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    impl: str = "auto",
):
    """One decode step: x (b,d); conv_state (b,d,w-1) updated in place (shift left, append x).
    Returns y (b,d) = act(bias + sum_k weight[:, k] * [conv_state | x][:, :, k])."""
    fn = pick_implementation(
        "conv1d", impl, (x, conv_state, weight, bias),
        naive=causal_conv1d_update_naive, torch_impl=causal_conv1d_update_torch,
        triton_name="causal_conv1d_update_triton",
    )
    return fn(x, conv_state, weight, bias, activation=activation)
