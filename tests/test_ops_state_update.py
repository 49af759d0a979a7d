"""Single-token SSD state update: torch implementation against the reference, the reference by
hand, and step-by-step decoding against the full scan."""

from __future__ import annotations

import math

import pytest
import torch

from matmamba.ops import ssd_scan, ssd_state_update
from matmamba.ops.state_update.naive import ssd_state_update_naive
from matmamba.ops.state_update.torch_impl import ssd_state_update_torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def make_sequence(batch, seqlen, nheads, headdim, ngroups, dstate, *, seed):
    """Scan inputs for softplus discretisation: dt' = softplus(dt + dt_bias) ~ 0.001..0.5."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "x": randn(batch, seqlen, nheads, headdim),
        "dt": randn(batch, seqlen, nheads) - 0.5,
        "A": -(0.5 + 7.5 * torch.rand(nheads, generator=gen, dtype=torch.float64)),
        "B": randn(batch, seqlen, ngroups, dstate),
        "C": randn(batch, seqlen, ngroups, dstate),
        "D": randn(nheads, headdim),
        "dt_bias": torch.log(torch.expm1(0.001 + 0.099 * torch.rand(nheads, generator=gen, dtype=torch.float64))),
        "initial_state": randn(batch, nheads, headdim, dstate),
    }


def test_naive_one_step_by_hand():
    h0, x, dt, a, b, c, d = 0.6, -1.2, 0.3, -2.0, 0.7, 1.5, 0.4
    new_state = math.exp(dt * a) * h0 + dt * x * b
    state = torch.tensor([[[[h0]]]], dtype=torch.float64)
    t = lambda v, shape: torch.tensor([v], dtype=torch.float64).reshape(shape)  # noqa: E731
    y = ssd_state_update_naive(state, t(x, (1, 1, 1)), t(dt, (1, 1)), t(a, (1,)), t(b, (1, 1, 1)),
                               t(c, (1, 1, 1)), D=t(d, (1,)))
    assert y.item() == pytest.approx(c * new_state + d * x, rel=1e-14)
    assert state.item() == pytest.approx(new_state, rel=1e-14)


@pytest.mark.parametrize("ngroups,D_shape", [(1, "h"), (3, "hp")])
def test_torch_matches_naive_values_state_and_gradients_float64(ngroups, D_shape):
    seq = make_sequence(2, 1, 3, 24, ngroups, 8, seed=ngroups)
    args = {k: (v[:, 0] if k in ("x", "dt", "B", "C") else v) for k, v in seq.items()}
    if D_shape == "h":
        args["D"] = args["D"][:, 0].contiguous()
    state0 = args.pop("initial_state")
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    grad_y = torch.randn(2, 3, 24, dtype=torch.float64)
    grad_state = torch.randn_like(state0)
    results = []
    for fn in (ssd_state_update_naive, ssd_state_update_torch):
        state = state0.clone()
        y = fn(state, leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
               dt_bias=leaves["dt_bias"], dt_softplus=True, dt_limit=(0.002, 0.08))
        grads = torch.autograd.grad((y * grad_y).sum() + (state * grad_state).sum(), list(leaves.values()))
        results.append((y, state, grads))
    (y_ref, state_ref, grads_ref), (y, state, grads) = results
    assert rel_err(y, y_ref) < 1e-13 and rel_err(state, state_ref) < 1e-13
    for name, g, g_ref in zip(leaves, grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-12, f"gradient of {name}"


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_step_by_step_decoding_equals_scan(impl):
    batch, seqlen, nheads, headdim, ngroups, dstate = 2, 40, 6, 16, 2, 8
    seq = make_sequence(batch, seqlen, nheads, headdim, ngroups, dstate, seed=5)
    options = dict(D=seq["D"], dt_bias=seq["dt_bias"], dt_softplus=True, dt_limit=(0.0, 0.3))
    y_scan, final_scan = ssd_scan(seq["x"], seq["dt"], seq["A"], seq["B"], seq["C"], chunk_size=16,
                                  initial_state=seq["initial_state"], return_final_state=True, impl="naive",
                                  **options)
    state = seq["initial_state"].clone()
    storage = state.data_ptr()
    for t in range(seqlen):
        y_t = ssd_state_update(state, seq["x"][:, t], seq["dt"][:, t], seq["A"], seq["B"][:, t], seq["C"][:, t],
                               impl=impl, **options)
        assert rel_err(y_t, y_scan[:, t]) < 1e-12, f"step {t}"
    assert state.data_ptr() == storage
    assert rel_err(state, final_scan) < 1e-12


def test_float32_state_with_bfloat16_inputs():
    seq = make_sequence(1, 1, 4, 8, 1, 4, seed=6)
    state = seq["initial_state"].float()
    reference_state = seq["initial_state"].clone()
    low = {k: v.bfloat16() for k, v in seq.items()}
    y = ssd_state_update_torch(state, low["x"][:, 0], low["dt"][:, 0], low["A"], low["B"][:, 0], low["C"][:, 0],
                               D=low["D"], dt_bias=low["dt_bias"], dt_softplus=True)
    y_ref = ssd_state_update_naive(reference_state, *(low[k][:, 0].double() for k in ("x", "dt")),
                                   low["A"].double(), *(low[k][:, 0].double() for k in ("B", "C")),
                                   D=low["D"].double(), dt_bias=low["dt_bias"].double(), dt_softplus=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(state, reference_state) < 1e-6
    assert rel_err(y, y_ref) < 1e-2


def _good_args():
    return dict(state=torch.zeros(2, 4, 8, 5), x=torch.zeros(2, 4, 8), dt=torch.zeros(2, 4), A=torch.zeros(4),
                B=torch.zeros(2, 2, 5), C=torch.zeros(2, 2, 5))


BAD_INPUTS = {
    "state rank": (dict(state=torch.zeros(2, 4, 8)), "state must be"),
    "state dtype": (dict(state=torch.zeros(2, 4, 8, 5, dtype=torch.int64)), "floating"),
    "x shape": (dict(x=torch.zeros(2, 4, 7)), "x must be"),
    "dt shape": (dict(dt=torch.zeros(2, 3)), "dt must be"),
    "A shape": (dict(A=torch.zeros(3)), "A must be"),
    "B dstate": (dict(B=torch.zeros(2, 2, 4), C=torch.zeros(2, 2, 4)), "B must be"),
    "C shape": (dict(C=torch.zeros(2, 1, 5)), "C must have"),
    "groups": (dict(B=torch.zeros(2, 3, 5), C=torch.zeros(2, 3, 5)), "must divide nheads"),
    "D shape": (dict(D=torch.zeros(8)), "D must be"),
    "dt_bias shape": (dict(dt_bias=torch.zeros(8)), "dt_bias must be"),
}


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(case, impl):
    overrides, message = BAD_INPUTS[case]
    args = _good_args()
    args.update(overrides)
    positional = [args.pop(k) for k in ("state", "x", "dt", "A", "B", "C")]
    with pytest.raises(ValueError, match=message):
        ssd_state_update(*positional, **args, impl=impl)
