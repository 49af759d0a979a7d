"""Gated RMSNorm: torch implementation against the reference, the reference against a hand
computation, precision of low-precision inputs, errors."""

from __future__ import annotations

import math

import pytest
import torch

from matmamba.ops import gated_rmsnorm
from matmamba.ops.rmsnorm.naive import gated_rmsnorm_naive
from matmamba.ops.rmsnorm.torch_impl import gated_rmsnorm_torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def make_inputs(shape, *, seed, gate=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64) if gate else None
    weight = 1 + 0.1 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    return x.to(dtype), (z.to(dtype) if z is not None else None), weight.to(dtype)


def test_naive_by_hand():
    x, z, w, eps = [1.0, -2.0, 0.5, 3.0], [0.3, -1.0, 2.0, 0.0], [1.0, 0.5, 2.0, -1.0], 1e-5
    silu = [v / (1 + math.exp(-v)) for v in z]
    tensors = [torch.tensor(v, dtype=torch.float64) for v in (x, z, w)]

    gated = [a * s for a, s in zip(x, silu, strict=True)]  # norm_before_gate=False, two groups of 2
    expected = []
    for group in (gated[:2], gated[2:]):
        scale = 1 / math.sqrt(sum(v * v for v in group) / 2 + eps)
        expected += [v * scale for v in group]
    expected = [v * wc for v, wc in zip(expected, w, strict=True)]
    out = gated_rmsnorm_naive(*tensors, eps=eps, group_size=2)
    assert out.tolist() == pytest.approx(expected, rel=1e-14)

    scale = 1 / math.sqrt(sum(v * v for v in x) / 4 + eps)  # norm_before_gate=True, one group
    expected = [v * scale * wc * s for v, wc, s in zip(x, w, silu, strict=True)]
    out = gated_rmsnorm_naive(*tensors, eps=eps, norm_before_gate=True)
    assert out.tolist() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("group_size", [None, 8, 24])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("gate", [True, False], ids=["gated", "no-gate"])
def test_torch_matches_naive_values_and_gradients_float64(group_size, norm_before_gate, gate):
    x, z, weight = make_inputs((2, 5, 48), seed=1, gate=gate)
    leaves = [t.requires_grad_(True) for t in (x, z, weight) if t is not None]
    grad_out = torch.randn(2, 5, 48, dtype=torch.float64)
    results = []
    for fn in (gated_rmsnorm_naive, gated_rmsnorm_torch):
        out = fn(x, z, weight, eps=1e-6, norm_before_gate=norm_before_gate, group_size=group_size)
        results.append((out, torch.autograd.grad((out * grad_out).sum(), leaves)))
    (out_ref, grads_ref), (out, grads) = results
    assert rel_err(out, out_ref) < 1e-13
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-12


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_output_dtype_and_accuracy(dtype, tolerance):
    x, z, weight = make_inputs((4, 96), seed=2)
    x_low, z_low, w_low = (t.to(dtype) for t in (x, z, weight))
    reference = gated_rmsnorm_naive(x_low.double(), z_low.double(), w_low.double(), group_size=32)
    for fn in (gated_rmsnorm_torch, gated_rmsnorm_naive):
        out = fn(x_low, z_low, w_low, group_size=32)
        assert out.dtype == dtype
        assert rel_err(out, reference) < tolerance


def test_large_values_do_not_overflow_in_half_precision():
    x = torch.full((2, 64), 300.0, dtype=torch.float16)  # x^2 = 9e4 overflows float16
    out = gated_rmsnorm(x, None, torch.ones(64, dtype=torch.float16), impl="torch")
    assert torch.isfinite(out).all() and torch.allclose(out.float(), torch.ones(2, 64), atol=1e-3)


def test_public_function_dispatches():
    x, z, weight = make_inputs((3, 16), seed=3)
    assert rel_err(gated_rmsnorm(x, z, weight, impl="torch"), gated_rmsnorm(x, z, weight, impl="naive")) < 1e-14


BAD_INPUTS = {
    "weight shape": (dict(weight=torch.ones(15)), "weight must be"),
    "z shape": (dict(z=torch.ones(3, 15)), "z must have"),
    "group_size": (dict(group_size=5), "group_size must be"),
    "x scalar": (dict(x=torch.tensor(1.0)), "x must be"),
}


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(case, impl):
    x, z, weight = make_inputs((3, 16), seed=4)
    overrides, message = BAD_INPUTS[case]
    args = dict(x=x, z=z, weight=weight, group_size=None)
    args.update(overrides)
    with pytest.raises(ValueError, match=message):
        gated_rmsnorm(args["x"], args["z"], args["weight"], group_size=args["group_size"], impl=impl)
