"""SSD scan: the chunked torch implementation against the sequential reference, the reference
against hand-computed values, state carrying, packed sequences, dtypes, errors and dispatch."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from matmamba.ops import get_default_impl, ssd_scan, use_impl
from matmamba.ops._dispatch import resolve_impl
from matmamba.ops.ssd.chunked import ssd_scan_chunked, stable_segsum
from matmamba.ops.ssd.naive import ssd_scan_naive


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def make_inputs(
    batch, seqlen, nheads, headdim, ngroups, dstate, *, seed, dtype=torch.float64,
    D=None, dt_bias=False, softplus=False, initial_state=False,
):
    """Random scan inputs with realistic magnitudes: A in [-8, -0.5], dt' roughly 0.003..0.3."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "x": randn(batch, seqlen, nheads, headdim),
        "A": -uniform(0.5, 8.0, nheads),
        "B": randn(batch, seqlen, ngroups, dstate),
        "C": randn(batch, seqlen, ngroups, dstate),
    }
    if softplus:  # dt' = softplus(dt + dt_bias); dt_bias = inverse softplus of 0.001..0.1
        inputs["dt"] = randn(batch, seqlen, nheads) - 0.5
    else:  # dt' = dt (+ a small bias), positive
        inputs["dt"] = 3 * uniform(0.001, 0.1, batch, seqlen, nheads)
    if dt_bias:
        inputs["dt_bias"] = (
            torch.log(torch.expm1(uniform(0.001, 0.1, nheads))) if softplus else uniform(0.0, 0.05, nheads)
        )
    if D == "h":
        inputs["D"] = randn(nheads)
    elif D == "hp":
        inputs["D"] = randn(nheads, headdim)
    if initial_state:
        inputs["initial_state"] = randn(batch, nheads, headdim, dstate)
    return {k: v.to(dtype) for k, v in inputs.items()}


def call_scan(fn, inputs, **options):
    inputs = dict(inputs)
    return fn(inputs.pop("x"), inputs.pop("dt"), inputs.pop("A"), inputs.pop("B"), inputs.pop("C"),
              **inputs, **options)


def seq_idx_from_boundaries(seqlen, boundaries_per_row):
    """(b, l) int32: a new sequence starts at each listed position."""
    rows = []
    for boundaries in boundaries_per_row:
        row = torch.zeros(seqlen, dtype=torch.int32)
        for start in boundaries:
            row[start:] += 1
        rows.append(row)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# The reference is right: hand-computed cases
# ---------------------------------------------------------------------------------------------


def test_naive_two_steps_by_hand():
    """One head, p = n = 1, two steps, with initial state, D, dt_bias + softplus."""
    x1, x2, dt1, dt2, a = 0.7, -1.3, 0.2, -0.4, -1.5
    b1, b2, c1, c2, d, bias, h0 = 0.9, -0.6, 1.1, 0.4, 0.25, 0.1, 0.8
    sp1, sp2 = math.log1p(math.exp(dt1 + bias)), math.log1p(math.exp(dt2 + bias))
    h1 = math.exp(sp1 * a) * h0 + sp1 * b1 * x1
    h2 = math.exp(sp2 * a) * h1 + sp2 * b2 * x2
    expected_y = [c1 * h1 + d * x1, c2 * h2 + d * x2]

    t = lambda values, shape: torch.tensor(values, dtype=torch.float64).reshape(shape)  # noqa: E731
    y, final = ssd_scan_naive(
        t([x1, x2], (1, 2, 1, 1)), t([dt1, dt2], (1, 2, 1)), t([a], (1,)),
        t([b1, b2], (1, 2, 1, 1)), t([c1, c2], (1, 2, 1, 1)),
        D=t([d], (1,)), dt_bias=t([bias], (1,)), dt_softplus=True,
        initial_state=t([h0], (1, 1, 1, 1)), return_final_state=True,
    )
    assert y.flatten().tolist() == pytest.approx(expected_y, rel=1e-14)
    assert final.item() == pytest.approx(h2, rel=1e-14)


def test_naive_reset_and_groups_by_hand():
    """Two steps with a sequence boundary between them, 4 heads in 2 groups, p = n = 2."""
    inputs = make_inputs(1, 2, 4, 2, 2, 2, seed=1, initial_state=True)
    x, dt, B, C = (inputs[name][0] for name in ("x", "dt", "B", "C"))  # drop the batch axis
    A, h0 = inputs["A"], inputs["initial_state"][0]
    expected = torch.zeros(2, 4, 2, dtype=torch.float64)
    final = torch.zeros(4, 2, 2, dtype=torch.float64)
    for head in range(4):
        group = head // 2  # heads 0, 1 -> group 0; heads 2, 3 -> group 1
        state = torch.zeros(2, 2, dtype=torch.float64)
        for t in range(2):
            for i in range(2):  # headdim
                for j in range(2):  # dstate
                    previous = h0[head, i, j] if t == 0 else 0.0  # the boundary resets the state
                    state[i, j] = (math.exp(dt[t, head] * A[head]) * previous
                                   + dt[t, head] * x[t, head, i] * B[t, group, j])
            for i in range(2):
                expected[t, head, i] = sum(state[i, j] * C[t, group, j] for j in range(2))
        final[head] = state
    y, final_state = call_scan(ssd_scan_naive, inputs, seq_idx=torch.tensor([[3, 4]]), return_final_state=True)
    assert rel_err(y[0], expected) < 1e-14
    assert rel_err(final_state[0], final) < 1e-14


# ---------------------------------------------------------------------------------------------
# Chunked torch implementation == reference, values and every gradient, in float64
# ---------------------------------------------------------------------------------------------

# (batch, seqlen, nheads, headdim, ngroups, dstate, chunk, input options, seq_idx boundaries, dt_limit)
CASES = {
    "len1": (2, 1, 3, 16, 1, 8, 64, dict(), None, None),
    "len63-Dhp-init": (2, 63, 5, 24, 1, 8, 64, dict(D="hp", initial_state=True), None, None),
    "len300-g2-seq-softplus-limit": (
        2, 300, 4, 16, 2, 8, 64,
        dict(D="h", dt_bias=True, softplus=True, initial_state=True),
        # row 0: boundaries at a chunk edge (64, 128), mid-chunk (100) and a length-1 sequence
        [[64, 100, 101, 128], [257]], (0.002, 0.05),
    ),
    "len300-chunk256-h3-seq": (
        2, 300, 3, 24, 1, 16, 256,
        dict(D="hp", dt_bias=True, softplus=True, initial_state=True), [[40, 256], [299]], None,
    ),
    "len300-h5-g5-bias": (1, 300, 5, 16, 5, 4, 64, dict(D="h", dt_bias=True, initial_state=True), [[150]], None),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_chunked_matches_naive_values_and_gradients_float64(case):
    batch, seqlen, nheads, headdim, ngroups, dstate, chunk, opts, boundaries, dt_limit = CASES[case]
    inputs = make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, seed=list(CASES).index(case), **opts)
    for tensor in inputs.values():
        tensor.requires_grad_(True)
    options = dict(dt_softplus=opts.get("softplus", False), return_final_state=True)
    if boundaries is not None:
        options["seq_idx"] = seq_idx_from_boundaries(seqlen, boundaries)
    if dt_limit is not None:
        options["dt_limit"] = dt_limit

    gen = torch.Generator().manual_seed(7)
    grad_y = torch.randn(batch, seqlen, nheads, headdim, generator=gen, dtype=torch.float64)
    grad_state = torch.randn(batch, nheads, headdim, dstate, generator=gen, dtype=torch.float64)
    results = {}
    for name, fn, extra in (("naive", ssd_scan_naive, {}), ("torch", ssd_scan_chunked, {"chunk_size": chunk})):
        y, final = call_scan(fn, inputs, **options, **extra)
        loss = (y * grad_y).sum() + (final * grad_state).sum()
        grads = torch.autograd.grad(loss, list(inputs.values()))
        results[name] = (y, final, dict(zip(inputs, grads, strict=True)))

    (y_ref, final_ref, grads_ref), (y, final, grads) = results["naive"], results["torch"]
    assert y.dtype == torch.float64 and final.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(final, final_ref) < 1e-10
    for name in inputs:
        assert rel_err(grads[name], grads_ref[name]) < 1e-10, f"gradient of {name}"
    assert set(grads) >= {"x", "dt", "A", "B", "C"}


def test_float32_chunked_close_to_float64_naive():
    inputs64 = make_inputs(2, 300, 4, 24, 2, 16, seed=3, D="h", dt_bias=True, softplus=True, initial_state=True)
    seq_idx = seq_idx_from_boundaries(300, [[64, 170], [20]])
    options = dict(dt_softplus=True, seq_idx=seq_idx, return_final_state=True)
    inputs32 = {k: v.float().requires_grad_(True) for k, v in inputs64.items()}
    for tensor in inputs64.values():
        tensor.requires_grad_(True)
    y_ref, final_ref = call_scan(ssd_scan_naive, inputs64, **options)
    y, final = call_scan(ssd_scan_chunked, inputs32, chunk_size=64, **options)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(final, final_ref) < 1e-4
    grad_y = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad((y_ref * grad_y).sum() + final_ref.sum(), list(inputs64.values()))
    grads = torch.autograd.grad((y * grad_y.float()).sum() + final.sum(), list(inputs32.values()))
    for name, g, g_ref in zip(inputs64, grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-4, f"gradient of {name}"


def test_low_precision_inputs_give_output_in_input_dtype():
    inputs64 = make_inputs(1, 80, 2, 16, 1, 8, seed=4, D="h")
    inputs16 = {k: v.to(torch.bfloat16) for k, v in inputs64.items()}
    y, final = call_scan(ssd_scan_chunked, inputs16, chunk_size=32, return_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    # Reference on the same (rounded) inputs, so only the compute precision is tested.
    y_ref = call_scan(ssd_scan_naive, {k: v.double() for k, v in inputs16.items()})
    assert rel_err(y, y_ref) < 1e-2


def test_extreme_decay_stays_finite():
    """Huge dt * |A| (decay underflows to 0) and tiny dt must not produce inf / NaN, also in backward."""
    inputs = make_inputs(1, 100, 2, 8, 1, 4, seed=5)
    inputs["dt"] = torch.where(torch.arange(100)[None, :, None] % 2 == 0, 500.0, 1e-6).double().expand(1, 100, 2)
    inputs["A"] = torch.tensor([-50.0, -1e-3], dtype=torch.float64)
    inputs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, final = call_scan(ssd_scan_chunked, inputs, chunk_size=32, return_final_state=True)
    y_ref = call_scan(ssd_scan_naive, inputs)
    grads = torch.autograd.grad(y.sum() + final.sum(), list(inputs.values()))
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert rel_err(y, y_ref) < 1e-10


def test_stable_segsum():
    log_decay = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=torch.float64)
    segsum = stable_segsum(log_decay)
    for i in range(4):
        for j in range(i + 1):
            assert segsum[i, j].item() == pytest.approx(log_decay[j + 1 : i + 1].sum().item())


# ---------------------------------------------------------------------------------------------
# Properties: state carrying, packed sequences, strided inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_split_sequence_carrying_final_state_equals_one_shot(impl):
    inputs = make_inputs(2, 150, 3, 16, 1, 8, seed=6, D="h", dt_bias=True, softplus=True, initial_state=True)
    options = dict(chunk_size=32, dt_softplus=True, return_final_state=True, impl=impl)
    y_full, final_full = call_scan(ssd_scan, inputs, **options)

    split = 70  # not a multiple of the chunk size
    first = {k: (v[:, :split] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
    second = {k: (v[:, split:] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
    y_first, state = call_scan(ssd_scan, first, **options)
    second["initial_state"] = state
    y_second, final = call_scan(ssd_scan, second, **options)
    assert rel_err(torch.cat([y_first, y_second], dim=1), y_full) < 1e-12
    assert rel_err(final, final_full) < 1e-12


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_packed_sequences_equal_separate_scans(impl):
    lengths = [64, 37, 99]  # boundaries at 64 (a chunk edge) and 101 (mid-chunk)
    total = sum(lengths)
    inputs = make_inputs(1, total, 3, 24, 1, 8, seed=8, D="hp", dt_bias=True, softplus=True, initial_state=True)
    seq_idx = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor(lengths))[None].to(torch.int64)
    options = dict(chunk_size=64, dt_softplus=True, return_final_state=True, impl=impl)
    y_packed, final_packed = call_scan(ssd_scan, inputs, seq_idx=seq_idx, **options)

    start = 0
    for index, length in enumerate(lengths):
        piece = {k: (v[:, start : start + length] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
        if index > 0:  # the initial state belongs to the first sequence only
            del piece["initial_state"]
        y_piece, final_piece = call_scan(ssd_scan, piece, **options)
        assert rel_err(y_packed[:, start : start + length], y_piece) < 1e-12, f"sequence {index}"
        start += length
    assert rel_err(final_packed, final_piece) < 1e-12  # the state of the last sequence


def test_seq_idx_values_only_matter_where_they_change():
    inputs = make_inputs(1, 90, 2, 16, 1, 8, seed=9)
    a = torch.tensor([[0] * 30 + [1] * 30 + [2] * 30])
    b = torch.tensor([[7] * 30 + [9] * 30 + [100] * 30], dtype=torch.int32)
    y_a = call_scan(ssd_scan_chunked, inputs, chunk_size=16, seq_idx=a)
    y_b = call_scan(ssd_scan_chunked, inputs, chunk_size=16, seq_idx=b)
    y_ref = call_scan(ssd_scan_naive, inputs, seq_idx=b)
    assert rel_err(y_a, y_b) < 1e-14 and rel_err(y_b, y_ref) < 1e-10


def test_strided_inputs_match_contiguous():
    """Inputs sliced out of one projection, as the block does, give the same result."""
    batch, seqlen, nheads, headdim, dstate = 2, 50, 3, 16, 8
    gen = torch.Generator().manual_seed(10)
    width = nheads * headdim + 2 * dstate + nheads
    projection = torch.randn(batch, seqlen, width + 5, generator=gen, dtype=torch.float64)
    x = projection[..., : nheads * headdim].unflatten(-1, (nheads, headdim))
    B = projection[..., nheads * headdim : nheads * headdim + dstate].unflatten(-1, (1, dstate))
    C = projection[..., nheads * headdim + dstate : nheads * headdim + 2 * dstate].unflatten(-1, (1, dstate))
    dt = projection[..., width - nheads : width]
    A = -torch.rand(nheads, generator=gen, dtype=torch.float64) - 0.5
    assert not x.is_contiguous() and not dt.is_contiguous()
    options = dict(chunk_size=16, dt_softplus=True)
    y = ssd_scan_chunked(x, dt, A, B, C, **options)
    y_contiguous = ssd_scan_chunked(x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), **options)
    assert rel_err(y, y_contiguous) < 1e-14
    assert rel_err(y, ssd_scan_naive(x, dt, A, B, C, **options)) < 1e-10


def test_return_final_state_false_returns_only_y():
    inputs = make_inputs(1, 10, 2, 4, 1, 4, seed=11)
    for fn in (ssd_scan_naive, ssd_scan_chunked):
        y = call_scan(fn, inputs, chunk_size=4)
        assert isinstance(y, torch.Tensor) and y.shape == (1, 10, 2, 4)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _good():
    return make_inputs(2, 10, 4, 8, 2, 4, seed=12)


BAD_INPUTS = {
    "x rank": (dict(x=torch.zeros(2, 10, 32)), "x must be"),
    "dt shape": (dict(dt=torch.zeros(2, 10, 3)), "dt must be"),
    "A shape": (dict(A=torch.zeros(4, 1)), "A must be"),
    "B rank": (dict(B=torch.zeros(2, 10, 8)), "B must be"),
    "C shape": (dict(C=torch.zeros(2, 10, 2, 5)), "C must have"),
    "groups": (dict(B=torch.zeros(2, 10, 3, 4), C=torch.zeros(2, 10, 3, 4)), "must divide nheads"),
    "D shape": (dict(D=torch.zeros(8)), "D must be"),
    "dt_bias shape": (dict(dt_bias=torch.zeros(2)), "dt_bias must be"),
    "initial_state shape": (dict(initial_state=torch.zeros(2, 4, 8, 5)), "initial_state must be"),
    "seq_idx shape": (dict(seq_idx=torch.zeros(2, 9, dtype=torch.int64)), "seq_idx must be"),
    "seq_idx dtype": (dict(seq_idx=torch.zeros(2, 10)), "integer"),
    "chunk_size": (dict(chunk_size=0), "chunk_size"),
    "dt_limit": (dict(dt_limit=(1.0, 0.5)), "dt_limit"),
}


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(case, impl):
    overrides, message = BAD_INPUTS[case]
    inputs = _good()
    inputs.update(overrides)
    with pytest.raises(ValueError, match=message):
        call_scan(ssd_scan, inputs, impl=impl)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def test_dispatch_rejects_unknown_impl():
    inputs = _good()
    with pytest.raises(ValueError, match="'auto', 'naive', 'torch', 'triton'"):
        call_scan(ssd_scan, inputs, impl="cuda")
    with pytest.raises(ValueError, match="use_impl"):
        with use_impl("fast"):
            pass


def test_dispatch_auto_override_and_env(monkeypatch):
    monkeypatch.delenv("MATMAMBA_IMPL", raising=False)
    cpu = [torch.zeros(1)]
    assert get_default_impl() == "auto"
    assert resolve_impl("ssd", "auto", cpu) == "torch"
    with use_impl("naive"):
        assert get_default_impl() == "naive"
        assert resolve_impl("ssd", "auto", cpu) == "naive"
        assert resolve_impl("ssd", "torch", cpu) == "torch"  # an explicit impl wins
        with use_impl("torch"):
            assert resolve_impl("ssd", "auto", cpu) == "torch"
        assert resolve_impl("ssd", "auto", cpu) == "naive"
    assert get_default_impl() == "auto"
    monkeypatch.setenv("MATMAMBA_IMPL", "naive")
    assert resolve_impl("ssd", "auto", cpu) == "naive"
    with use_impl("torch"):  # the context manager beats the environment
        assert resolve_impl("ssd", "auto", cpu) == "torch"
    monkeypatch.setenv("MATMAMBA_IMPL", "bogus")
    with pytest.raises(ValueError, match="MATMAMBA_IMPL"):
        resolve_impl("ssd", "auto", cpu)


def test_dispatch_forced_triton_without_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matmamba.ops.ssd.triton_impl", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="matmamba.ops.ssd.triton_impl could not be imported"):
        call_scan(ssd_scan, _good(), impl="triton")


def test_dispatch_auto_picks_triton_on_cuda_and_falls_back_when_missing(monkeypatch):
    """Simulated CUDA: "auto" calls the Triton module's function when it imports, torch otherwise."""
    import types

    from matmamba.ops import _dispatch

    monkeypatch.delenv("MATMAMBA_IMPL", raising=False)
    monkeypatch.setattr(_dispatch, "_all_on_cuda", lambda tensors: True)
    calls = []
    fake = types.ModuleType("matmamba.ops.ssd.triton_impl")
    fake.ssd_scan_triton = lambda *args, **kwargs: calls.append(sorted(kwargs)) or "from triton"
    monkeypatch.setitem(sys.modules, "matmamba.ops.ssd.triton_impl", fake)
    assert call_scan(ssd_scan, _good(), chunk_size=4) == "from triton"
    assert "impl" not in calls[0] and "chunk_size" in calls[0]  # same signature minus impl
    with use_impl("torch"):
        assert isinstance(call_scan(ssd_scan, _good(), chunk_size=4), torch.Tensor)
    monkeypatch.setitem(sys.modules, "matmamba.ops.ssd.triton_impl", None)  # module missing
    assert resolve_impl("ssd", "auto", [torch.zeros(1)]) == "torch"


def test_dispatch_naive_and_torch_agree_through_public_function():
    inputs = _good()
    y_naive = call_scan(ssd_scan, inputs, impl="naive", chunk_size=4)
    with use_impl("torch"):
        y_torch = call_scan(ssd_scan, inputs, chunk_size=4)
    assert rel_err(y_torch, y_naive) < 1e-10
