"""Causal depthwise conv1d and its decode step: torch implementation against the reference, the
reference against hand-computed values, state carrying, packed sequences, strided input, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matmamba.ops import causal_conv1d, causal_conv1d_update
from matmamba.ops.conv1d.naive import causal_conv1d_naive, causal_conv1d_update_naive
from matmamba.ops.conv1d.torch_impl import causal_conv1d_torch, causal_conv1d_update_torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def make_inputs(batch, seqlen, dim, width, *, seed, bias=True, initial_state=False, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch, seqlen, dim, generator=gen, dtype=torch.float64),
        "weight": torch.randn(dim, width, generator=gen, dtype=torch.float64) / width**0.5,
        "bias": torch.randn(dim, generator=gen, dtype=torch.float64) if bias else None,
    }
    if initial_state:
        inputs["initial_state"] = torch.randn(batch, dim, width - 1, generator=gen, dtype=torch.float64)
    return {k: (v.to(dtype) if v is not None else None) for k, v in inputs.items()}


def call_conv(fn, inputs, **options):
    inputs = dict(inputs)
    return fn(inputs.pop("x"), inputs.pop("weight"), inputs.pop("bias"), **inputs, **options)


def test_naive_by_hand():
    """d = 1, w = 3, three steps, two history inputs from initial_state, bias, with and without SiLU."""
    x = [0.5, -1.0, 2.0]
    w0, w1, w2, bias = 0.3, -0.7, 1.1, 0.2
    h_minus2, h_minus1 = 0.4, -0.9  # inputs at times -2, -1
    series = [h_minus2, h_minus1] + x
    pre = [bias + w0 * series[t] + w1 * series[t + 1] + w2 * series[t + 2] for t in range(3)]
    x_t = torch.tensor(x, dtype=torch.float64).view(1, 3, 1)
    weight = torch.tensor([[w0, w1, w2]], dtype=torch.float64)
    init = torch.tensor([[[h_minus2, h_minus1]]], dtype=torch.float64)
    y, final = causal_conv1d_naive(x_t, weight, torch.tensor([bias], dtype=torch.float64), activation=None,
                                   initial_state=init, return_final_state=True)
    assert y.flatten().tolist() == pytest.approx(pre, rel=1e-14)
    assert final.flatten().tolist() == [-1.0, 2.0]
    y_silu = causal_conv1d_naive(x_t, weight, torch.tensor([bias], dtype=torch.float64), initial_state=init)
    assert rel_err(y_silu.flatten(), F.silu(torch.tensor(pre, dtype=torch.float64))) < 1e-15
    # A new sequence at t = 2: its output sees only x[2]; the final state keeps only x[2].
    y_seq, final_seq = causal_conv1d_naive(x_t, weight, None, activation=None, initial_state=init,
                                           seq_idx=torch.tensor([[0, 0, 1]]), return_final_state=True)
    assert y_seq[0, 2, 0].item() == pytest.approx(w2 * 2.0, rel=1e-14)
    assert y_seq[0, 1, 0].item() == pytest.approx(w0 * h_minus1 + w1 * 0.5 + w2 * -1.0, rel=1e-14)
    assert final_seq.flatten().tolist() == [0.0, 2.0]


# (batch, seqlen, dim, width, bias, initial_state, seq_idx boundaries per row, activation)
CASES = {
    "w4-len37-silu": (2, 37, 6, 4, True, False, None, "silu"),
    "w4-len37-init-seq": (2, 37, 6, 4, True, True, [[1, 10, 11], [36]], "silu"),
    "w4-len2-init-seq": (2, 2, 5, 4, False, True, [[1], []], None),  # shorter than the history
    "w4-len1-init": (1, 1, 5, 4, True, True, None, "silu"),
    "w2-len20-seq": (1, 20, 7, 2, True, True, [[5, 6, 19]], None),
    "w1-len9": (2, 9, 3, 1, True, False, [[4], []], "silu"),
}


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_torch_matches_naive_values_and_gradients_float64(case, strided):
    batch, seqlen, dim, width, bias, init, boundaries, activation = CASES[case]
    inputs = make_inputs(batch, seqlen, dim, width, seed=list(CASES).index(case), bias=bias, initial_state=init)
    if strided:  # x as a channels-last view of a (b, d, l) buffer, sliced out of wider channels
        buffer = torch.randn(batch, dim + 3, seqlen, dtype=torch.float64).transpose(1, 2)
        buffer[:, :, 2 : 2 + dim] = inputs["x"]
        inputs["x"] = buffer[:, :, 2 : 2 + dim]
        assert seqlen == 1 or not inputs["x"].is_contiguous()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    if strided:
        leaves["x"] = inputs["x"].detach().requires_grad_(True)
    inputs.update(leaves)
    options = dict(activation=activation, return_final_state=True)
    if boundaries is not None:
        seq = torch.zeros(batch, seqlen, dtype=torch.int64)
        for row, starts in enumerate(boundaries):
            for start in starts:
                seq[row, start:] += 1
        options["seq_idx"] = seq

    gen = torch.Generator().manual_seed(99)
    grad_y = torch.randn(batch, seqlen, dim, generator=gen, dtype=torch.float64)
    grad_state = torch.randn(batch, dim, width - 1, generator=gen, dtype=torch.float64)
    results = []
    for fn in (causal_conv1d_naive, causal_conv1d_torch):
        y, final = call_conv(fn, inputs, **options)
        loss = (y * grad_y).sum() + (final * grad_state).sum()
        results.append((y, final, torch.autograd.grad(loss, list(leaves.values()))))
    (y_ref, final_ref, grads_ref), (y, final, grads) = results
    assert y.shape == (batch, seqlen, dim) and y.is_contiguous()
    assert rel_err(y, y_ref) < 1e-12
    assert final.shape == (batch, dim, width - 1)
    if width > 1:
        assert rel_err(final, final_ref) < 1e-12
    for name, g, g_ref in zip(leaves, grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-12, f"gradient of {name}"


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_split_sequence_carrying_final_state_equals_one_shot(impl):
    inputs = make_inputs(2, 40, 6, 4, seed=1, initial_state=True)
    y_full, final_full = call_conv(causal_conv1d, inputs, return_final_state=True, impl=impl)
    for split in (1, 2, 17):
        first = dict(inputs, x=inputs["x"][:, :split])
        y_first, state = call_conv(causal_conv1d, first, return_final_state=True, impl=impl)
        second = dict(inputs, x=inputs["x"][:, split:], initial_state=state)
        y_second, final = call_conv(causal_conv1d, second, return_final_state=True, impl=impl)
        assert rel_err(torch.cat([y_first, y_second], dim=1), y_full) < 1e-14
        assert rel_err(final, final_full) < 1e-14


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_packed_sequences_equal_separate_convs(impl):
    lengths = [5, 1, 2, 12]
    inputs = make_inputs(1, sum(lengths), 4, 4, seed=2, initial_state=True)
    seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))[None].to(torch.int32)
    y_packed, final_packed = call_conv(causal_conv1d, inputs, seq_idx=seq_idx, return_final_state=True, impl=impl)
    start = 0
    for index, length in enumerate(lengths):
        piece = dict(inputs, x=inputs["x"][:, start : start + length])
        if index > 0:  # the initial state belongs to the first sequence only
            del piece["initial_state"]
        y_piece, final_piece = call_conv(causal_conv1d, piece, return_final_state=True, impl=impl)
        assert rel_err(y_packed[:, start : start + length], y_piece) < 1e-14, f"sequence {index}"
        start += length
    assert rel_err(final_packed, final_piece) < 1e-14


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("width", [4, 2, 1])
def test_update_step_by_step_equals_full_conv(impl, width):
    inputs = make_inputs(2, 11, 5, width, seed=3, initial_state=True)
    y_full, final_full = call_conv(causal_conv1d_naive, inputs, return_final_state=True)
    conv_state = inputs["initial_state"].clone()
    storage = conv_state.data_ptr()
    for t in range(11):
        y_t = causal_conv1d_update(inputs["x"][:, t], conv_state, inputs["weight"], inputs["bias"], impl=impl)
        assert rel_err(y_t, y_full[:, t]) < 1e-14
    assert conv_state.data_ptr() == storage  # updated in place
    assert conv_state.shape == final_full.shape == (2, 5, width - 1)
    if width > 1:
        assert rel_err(conv_state, final_full) < 1e-14


def test_update_torch_matches_naive_gradients_and_float32_state():
    inputs = make_inputs(3, 1, 6, 4, seed=4, initial_state=True)
    weight = inputs["weight"].clone().requires_grad_(True)
    x = inputs["x"][:, 0].clone().requires_grad_(True)
    grads = []
    for fn in (causal_conv1d_update_naive, causal_conv1d_update_torch):
        state = inputs["initial_state"].clone()
        y = fn(x, state, weight, inputs["bias"], activation="silu")
        grads.append(torch.autograd.grad(y.square().sum(), [x, weight]))
    for g, g_ref in zip(grads[1], grads[0], strict=True):
        assert rel_err(g, g_ref) < 1e-13
    # float32 state, bfloat16 token: the state keeps its dtype, y takes the token's
    state32 = inputs["initial_state"].float()
    y = causal_conv1d_update_torch(x.detach().bfloat16(), state32, weight.detach().float(), None)
    assert y.dtype == torch.bfloat16 and state32.dtype == torch.float32


def test_float32_close_to_float64_naive():
    inputs64 = make_inputs(2, 64, 8, 4, seed=5, initial_state=True)
    seq_idx = torch.tensor([[0] * 30 + [1] * 34, [0] * 64])
    y_ref = call_conv(causal_conv1d_naive, inputs64, seq_idx=seq_idx)
    inputs32 = {k: v.float() for k, v in inputs64.items()}
    for fn in (causal_conv1d_torch, causal_conv1d_naive):
        y = call_conv(fn, inputs32, seq_idx=seq_idx)
        assert y.dtype == torch.float32 and rel_err(y, y_ref) < 1e-6
    y16 = call_conv(causal_conv1d_torch, {k: v.bfloat16() for k, v in inputs64.items()})
    assert y16.dtype == torch.bfloat16


BAD_INPUTS = {
    "x rank": (dict(x=torch.zeros(2, 10)), "x must be"),
    "weight shape": (dict(weight=torch.zeros(5, 4)), "weight must be"),
    "weight rank": (dict(weight=torch.zeros(6)), "weight must be"),
    "bias shape": (dict(bias=torch.zeros(5)), "bias must be"),
    "initial_state": (dict(initial_state=torch.zeros(2, 6, 4)), "initial_state must be"),
    "seq_idx shape": (dict(seq_idx=torch.zeros(2, 9, dtype=torch.int64)), "seq_idx must be"),
    "seq_idx dtype": (dict(seq_idx=torch.zeros(2, 10)), "integer"),
    "activation": (dict(activation="relu"), "activation must be"),
}


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(case, impl):
    overrides, message = BAD_INPUTS[case]
    inputs = make_inputs(2, 10, 6, 4, seed=6)
    inputs.update(overrides)
    with pytest.raises(ValueError, match=message):
        call_conv(causal_conv1d, inputs, impl=impl)


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_update_bad_inputs_raise_value_error(impl):
    weight = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d_update(torch.zeros(2, 1, 6), torch.zeros(2, 6, 3), weight, impl=impl)
    with pytest.raises(ValueError, match="conv_state must be"):
        causal_conv1d_update(torch.zeros(2, 6), torch.zeros(2, 6, 4), weight, impl=impl)
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d_update(torch.zeros(2, 6), torch.zeros(2, 6, 3), torch.zeros(5, 4), impl=impl)
