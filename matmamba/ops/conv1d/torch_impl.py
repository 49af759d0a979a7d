"""Causal depthwise conv1d (+ optional SiLU) in PyTorch, with autograd; and its decode step.

Same contract as :mod:`matmamba.ops.conv1d.naive`::

    y[t, c] = act(bias[c] + sum_{k=0}^{w-1} weight[c, k] * x[t - (w-1) + k, c])

Without ``seq_idx`` this is ``F.conv1d(groups=d)`` over the input with the w-1 history steps
(``initial_state`` or zeros) prepended. With ``seq_idx`` it is a masked sliding window:
``x_padded.unfold`` gives every (t, k) tap, and taps whose input lies in another sequence are
multiplied by 0. Compute in float32 (float64 for float64 inputs); y is returned contiguous in
x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ssd.chunked import segment_ids
from .naive import check_conv1d_inputs, check_conv1d_update_inputs, compute_dtype_for

Tensor = torch.Tensor


def causal_conv1d_torch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = "silu",
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
):
    """x (b,l,d) channels-last (any strides), weight (d,w), bias (d,), seq_idx (b,l),
    initial_state (b,d,w-1). Returns y (b,l,d) [, final_state (b,d,w-1)], both in x.dtype."""
    batch, seqlen, dim, width, use_silu = check_conv1d_inputs(
        x, weight, bias, activation, seq_idx, initial_state
    )
    dtype = compute_dtype_for(x, weight, bias, initial_state)
    history = width - 1
    if initial_state is None:
        past = x.new_zeros(batch, history, dim, dtype=dtype)
    else:
        past = initial_state.to(dtype).transpose(1, 2)
    # padded[:, t + k] is the input at time t - (w-1) + k.                         (b, l+w-1, d)
    padded = torch.cat([past, x.to(dtype)], dim=1)
    weight_c = weight.to(dtype)
    bias_c = bias.to(dtype) if bias is not None else None

    if seq_idx is None:
        y = F.conv1d(padded.transpose(1, 2), weight_c[:, None, :], bias_c, groups=dim)  # (b,d,l)
        y = y.transpose(1, 2)
    else:
        segments = segment_ids(seq_idx)  # 0 for the first sequence, which owns the initial state
        segments_padded = torch.cat([segments.new_zeros(batch, history), segments], dim=1)  # (b, l+w-1)
        taps = padded.unfold(1, width, 1)  # (b,l,d,w): taps[:, t, :, k] = padded[:, t + k]
        tap_segments = segments_padded.unfold(1, width, 1)  # (b,l,w)
        same_sequence = (tap_segments == segments[:, :, None]).to(dtype)  # (b,l,w)
        y = torch.einsum("bldk,blk,dk->bld", taps, same_sequence, weight_c)
        if bias_c is not None:
            y = y + bias_c
    if use_silu:
        y = F.silu(y)
    y = y.to(x.dtype).contiguous()
    if not return_final_state:
        return y

    final_state = padded[:, seqlen:]  # (b, w-1, d): inputs at times l-(w-1) .. l-1
    if seq_idx is not None:
        keep = segments_padded[:, seqlen:] == segments[:, -1:]  # only the last sequence's inputs
        final_state = final_state * keep[:, :, None].to(dtype)
    return y, final_state.transpose(1, 2).to(x.dtype)


def causal_conv1d_update_torch(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = "silu",
):
    """One decode step. x (b,d), conv_state (b,d,w-1) updated in place::

        window = [conv_state | x]                       (b,d,w)
        y      = act(bias + sum_k weight[:, k] * window[:, :, k])
        conv_state <- window[:, :, 1:]

    Returns y (b,d) in x.dtype.
    """
    _, _, _, use_silu = check_conv1d_update_inputs(x, conv_state, weight, bias, activation)
    dtype = compute_dtype_for(x, conv_state, weight, bias)
    window = torch.cat([conv_state.to(dtype), x.to(dtype)[:, :, None]], dim=-1)
    y = (window * weight.to(dtype)).sum(dim=-1)
    if bias is not None:
        y = y + bias.to(dtype)
    if use_silu:
        y = F.silu(y)
    conv_state.copy_(window[:, :, 1:])
    return y.to(x.dtype)
