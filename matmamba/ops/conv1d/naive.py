"""Sequential reference for the causal depthwise conv1d (+ optional SiLU), and its decode step.

Also holds the argument checking shared by every implementation of the two ops.

Semantics, for input x (b,l,d) channels-last, weight (d,w), bias (d,)::

    y[t, c] = act(bias[c] + sum_{k=0}^{w-1} weight[c, k] * x[t - (w-1) + k, c])

where x at negative times is read from ``initial_state`` (b,d,w-1): ``initial_state[:, :, j]``
is the input at time j - (w-1), so its last column is the step just before x[:, 0] (zeros when
no initial state is given). With ``seq_idx`` (b,l), an input counts as zero when a change of
seq_idx lies between its position and t; the initial state belongs to the first sequence.
``final_state`` (b,d,w-1) holds the last w-1 inputs, in the same layout, with inputs that do not
belong to the row's last sequence set to zero (so it continues that sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ACTIVATIONS = (None, "silu", "swish")


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def compute_dtype_for(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any argument is float64, float32 otherwise (also for fp16 / bf16)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_activation(activation) -> bool:
    """True for SiLU ("silu" / "swish"), False for None; ValueError otherwise."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    return activation is not None


def _check_weight_bias(weight: Tensor, bias: Tensor | None, dim: int) -> int:
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"weight must be (dim, width) with dim = {dim}; got {_shape(weight)}")
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"bias must be (dim,) = ({dim},); got {_shape(bias)}")
    return weight.shape[1]


def check_conv1d_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation,
    seq_idx: Tensor | None,
    initial_state: Tensor | None,
) -> tuple[int, int, int, int, bool]:
    """Check against the ``causal_conv1d`` contract. Returns (batch, seqlen, dim, width, use_silu)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, seqlen, dim) channels-last; got shape {_shape(x)}")
    batch, seqlen, dim = x.shape
    width = _check_weight_bias(weight, bias, dim)
    if initial_state is not None and initial_state.shape != (batch, dim, width - 1):
        raise ValueError(
            f"initial_state must be (batch, dim, width - 1) = ({batch}, {dim}, {width - 1}); "
            f"got {_shape(initial_state)}"
        )
    if seq_idx is not None:
        if seq_idx.shape != (batch, seqlen):
            raise ValueError(
                f"seq_idx must be (batch, seqlen) = ({batch}, {seqlen}); got {_shape(seq_idx)}"
            )
        if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be an integer tensor (int32/int64); got {seq_idx.dtype}")
    return batch, seqlen, dim, width, check_activation(activation)


def check_conv1d_update_inputs(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation
) -> tuple[int, int, int, bool]:
    """Check against the ``causal_conv1d_update`` contract. Returns (batch, dim, width, use_silu)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, dim) (one token); got shape {_shape(x)}")
    batch, dim = x.shape
    width = _check_weight_bias(weight, bias, dim)
    if conv_state.shape != (batch, dim, width - 1):
        raise ValueError(
            f"conv_state must be (batch, dim, width - 1) = ({batch}, {dim}, {width - 1}); "
            f"got {_shape(conv_state)}"
        )
    return batch, dim, width, check_activation(activation)


def causal_conv1d_naive(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = "silu",
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
):
    """Causal depthwise conv1d by loops over time and taps (see the module docstring).

    x (b,l,d) (any strides), weight (d,w), bias (d,), seq_idx (b,l), initial_state (b,d,w-1).
    Returns y (b,l,d) in x.dtype [, final_state (b,d,w-1) in x.dtype].
    """
    batch, seqlen, dim, width, use_silu = check_conv1d_inputs(
        x, weight, bias, activation, seq_idx, initial_state
    )
    dtype = compute_dtype_for(x, weight, bias, initial_state)
    history = width - 1
    if initial_state is None:
        past = x.new_zeros(batch, history, dim, dtype=dtype)
    else:
        past = initial_state.to(dtype).transpose(1, 2)  # (b, w-1, d)
    # inputs[:, u] is the input at time u - (w-1).
    inputs = torch.cat([past, x.to(dtype)], dim=1)
    if seq_idx is not None:
        # The initial state carries the sequence id of position 0.
        seq_of_input = torch.cat([seq_idx[:, :1].expand(batch, history), seq_idx], dim=1)
    w_c = weight.to(dtype)

    outputs = []
    for t in range(seqlen):
        now = t + history  # index of time t in `inputs`
        acc = bias.to(dtype).expand(batch, dim) if bias is not None else inputs.new_zeros(batch, dim)
        for k in range(width):
            term = w_c[:, k] * inputs[:, t + k]
            if seq_idx is not None:
                # same sequence <=> seq_idx constant from the input's position up to t
                same = (seq_of_input[:, t + k : now + 1] == seq_of_input[:, now : now + 1]).all(dim=1)
                term = term * same[:, None].to(dtype)
            acc = acc + term
        outputs.append(F.silu(acc) if use_silu else acc)
    y = (torch.stack(outputs, dim=1) if outputs else inputs[:, :0]).to(x.dtype)
    if not return_final_state:
        return y

    # Column j of the final state is the input at time l - (w-1) + j, i.e. inputs[:, l + j].
    last = seqlen + history - 1
    columns = []
    for j in range(history):
        column = inputs[:, seqlen + j]
        if seq_idx is not None:
            same = (seq_of_input[:, seqlen + j : last + 1] == seq_of_input[:, last : last + 1]).all(dim=1)
            column = column * same[:, None].to(dtype)
        columns.append(column)
    final_state = torch.stack(columns, dim=2) if columns else inputs.new_zeros(batch, dim, 0)
    return y, final_state.to(x.dtype)


def causal_conv1d_update_naive(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = "silu",
):
    """One decode step: x (b,d) is the input at the next time, conv_state (b,d,w-1) the w-1 inputs
    before it (oldest first). Computes ``y = act(bias + sum_k weight[:, k] * window[:, :, k])`` with
    window = conv_state followed by x, then shifts conv_state left by one and writes x into its
    last column, in place. Returns y (b,d) in x.dtype.
    """
    batch, dim, width, use_silu = check_conv1d_update_inputs(x, conv_state, weight, bias, activation)
    dtype = compute_dtype_for(x, conv_state, weight, bias)
    x_c = x.to(dtype)
    acc = bias.to(dtype).expand(batch, dim) if bias is not None else x_c.new_zeros(batch, dim)
    past = conv_state.to(dtype, copy=True)  # a copy: conv_state is overwritten below
    for k in range(width - 1):
        acc = acc + weight[:, k].to(dtype) * past[:, :, k]
    acc = acc + weight[:, width - 1].to(dtype) * x_c
    y = F.silu(acc) if use_silu else acc
    for k in range(width - 2):  # shift left, oldest column dropped
        conv_state[:, :, k] = conv_state[:, :, k + 1]
    if width > 1:
        conv_state[:, :, width - 2] = x
    return y.to(x.dtype)
