"""scripts/gpu_check.py's baselines for 16-bit rows, on the CPU.

- The criterion (compare_op with stand-in baselines of known error): a 16-bit output or gradient
  passes at max(tol, 2 x the first usable baseline's error), mamba_ssm before torch; a baseline
  whose forward is off, or that raises, gives no allowance; fp32 rows never run a baseline
  (unless run over several draws, below).
- The mapping of our ssd_scan / fused mixer contracts onto mamba_ssm's kernels, where mamba_ssm
  is importable: in float32 under the Triton interpreter it must reproduce the float64 reference
  (forward and every gradient) like a correct implementation does.
- Rows run over several cotangent draws (the one-head fused core) are judged on the geometric
  mean of each error over the draws, ours and the baselines' alike, in fp32 too.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from interpreter_groups import group_main, run_group

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gpu_check  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The criterion, with stand-in implementations of y = x * w whose dw is off by a known factor
# ---------------------------------------------------------------------------------------------


def product(x, w):
    return x * w


def product_with_dw_error(rel):
    """y = x * w exactly; dw scaled by (1 + rel), i.e. a relative error ``rel`` on dw only."""
    def fn(x, w):
        w_eff = w + rel * (w - w.detach())  # value w, gradient (1 + rel) x the true one
        return (x.float() * w_eff.float()).to(x.dtype)
    return fn


def raising(x, w):
    raise RuntimeError("no kernel for this case")


def run_row(dtype, ours_rel, baselines):
    gpu_check.RESULTS.clear()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(4, 64, dtype=torch.float64, generator=gen).requires_grad_(),
                  w=torch.randn(64, dtype=torch.float64, generator=gen).requires_grad_(), _fp32=("w",))
    gpu_check.compare_op("toy", dtype, "case", product_with_dw_error(ours_rel), product, inputs,
                         lambda outs: [torch.ones_like(o) for o in outs], baselines=baselines)
    (row,) = gpu_check.RESULTS
    assert row["worst_name"] != "exception", row["note"]
    return row


def stand_in(rel=None, fn=None):
    return gpu_check.Baseline(fn or product_with_dw_error(rel))


def test_the_mamba_ssm_baseline_sets_the_allowance_when_it_ran():
    row = run_row(torch.float16, 0.2, {"mamba_ssm": stand_in(0.15), "torch": stand_in(0.001)})
    assert row["ok"] and row["allowance_from"] == "mamba_ssm"
    assert row["worst_name"] == "dw" and row["tol"] == pytest.approx(0.3, rel=0.02)
    assert set(row["baseline_errors"]) == {"mamba_ssm", "torch"}
    assert row["baseline_errors"]["mamba_ssm"]["dw"] == pytest.approx(0.15, rel=0.02)
    assert row["baseline_errors"]["torch"]["dw"] < 0.01
    assert "dw 2.0e-01 vs mamba_ssm 1.5e-01 / torch" in row["note"]


def test_mamba_ssm_takes_precedence_over_a_looser_torch_path():
    row = run_row(torch.bfloat16, 0.2, {"mamba_ssm": stand_in(0.05), "torch": stand_in(0.15)})
    assert not row["ok"] and row["allowance_from"] == "mamba_ssm"
    assert row["tol"] == pytest.approx(0.1, rel=0.05)


def test_without_mamba_ssm_the_torch_path_sets_the_allowance():
    row = run_row(torch.float16, 0.2, {"mamba_ssm": None, "torch": stand_in(0.15)})
    assert row["ok"] and row["allowance_from"] == "torch"
    assert set(row["baseline_errors"]) == {"torch"}
    assert "dw 2.0e-01 vs mamba_ssm n/a / torch 1.5e-01 (allowed: 2x torch)" in row["note"]


def test_a_failing_or_miswired_baseline_gives_no_allowance():
    row = run_row(torch.float16, 0.2, {"mamba_ssm": stand_in(fn=raising), "torch": stand_in(0.15)})
    assert row["ok"] and row["allowance_from"] == "torch"
    assert "vs mamba_ssm failed / torch 1.5e-01" in row["note"]
    assert "mamba_ssm baseline failed: RuntimeError: no kernel" in row["note"]
    assert "no kernel" in row["baseline_failures"]["mamba_ssm"]

    def off(x, w):  # a wrong function: its forward is 50% off
        return 1.5 * x * w
    row = run_row(torch.float16, 0.2, {"mamba_ssm": stand_in(fn=off), "torch": stand_in(0.15)})
    assert row["ok"] and row["allowance_from"] == "torch"
    assert "mamba_ssm baseline not used: its outputs are off (out 5.0e-01)" in row["note"]

    row = run_row(torch.float16, 0.2, {"mamba_ssm": stand_in(fn=off)})
    assert not row["ok"] and row["allowance_from"] is None and row["tol"] == 1e-2


def test_within_the_plain_tolerance_there_is_no_note_but_the_baselines_are_kept():
    row = run_row(torch.float16, 0.0, {"mamba_ssm": stand_in(0.15), "torch": stand_in(0.0)})
    assert row["ok"] and row["note"] == ""
    assert row["baseline_errors"]["mamba_ssm"]["dw"] == pytest.approx(0.15, rel=0.02)


def test_fp32_rows_stay_strict_and_run_no_baseline():
    calls = []

    def counted(x, w):
        calls.append(1)
        return product_with_dw_error(0.5)(x, w)
    row = run_row(torch.float32, 2e-4, {"mamba_ssm": stand_in(fn=counted), "torch": stand_in(fn=counted)})
    assert not row["ok"] and row["tol"] == 1e-4 and not calls and "baseline_errors" not in row


def product_with_dw_errors_by_draw(rels):
    """As product_with_dw_error, with the relative error of dw taken from ``rels`` in turn, one
    value per call (per cotangent draw)."""
    calls = []

    def fn(x, w):
        rel = rels[len(calls) % len(rels)]
        calls.append(rel)
        return product_with_dw_error(rel)(x, w)
    return fn


def run_drawn_row(dtype, ours_rels, baseline_rels, draws=5):
    gpu_check.RESULTS.clear()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(4, 64, dtype=torch.float64, generator=gen).requires_grad_(),
                  w=torch.randn(64, dtype=torch.float64, generator=gen).requires_grad_(), _fp32=("w",))
    gpu_check.compare_op("toy", dtype, "case", product_with_dw_errors_by_draw(ours_rels), product,
                         inputs, lambda outs: [torch.randn_like(o) for o in outs],
                         baselines={"mamba_ssm": stand_in(fn=product_with_dw_errors_by_draw(baseline_rels))},
                         draws=draws)
    (row,) = gpu_check.RESULTS
    assert row["worst_name"] != "exception", row["note"]
    return row


def test_drawn_rows_judge_the_geometric_mean_over_the_draws():
    # one unlucky draw (8x the baseline's) among five: the means are close, the row passes
    row = run_drawn_row(torch.bfloat16, [0.02, 0.02, 0.16, 0.02, 0.02], [0.02] * 5)
    assert row["ok"] and row["draws"] == 5 and len(row["errors_per_draw"]) == 5
    assert row["errors"]["dw"] == pytest.approx(0.02 * 8 ** 0.2, rel=0.05)
    assert row["baseline_errors"]["mamba_ssm"]["dw"] == pytest.approx(0.02, rel=0.05)
    assert "geometric means over 5 cotangent draws" in row["note"]
    # consistently 3x the baseline's error: fails, whatever the luck of single draws
    row = run_drawn_row(torch.bfloat16, [0.06, 0.03, 0.09, 0.06, 0.06], [0.02, 0.03, 0.01, 0.02, 0.02])
    assert not row["ok"] and row["worst_name"] == "dw"


def test_drawn_fp32_rows_take_the_baseline_allowance():
    row = run_drawn_row(torch.float32, [2e-4] * 3, [1.5e-4] * 3, draws=3)
    assert row["ok"] and row["tol"] == pytest.approx(3e-4, rel=0.05)
    row = run_drawn_row(torch.float32, [2e-4] * 3, [1e-6] * 3, draws=3)
    assert not row["ok"] and row["tol"] == 1e-4


def counting(fn, calls):
    def counted(x, w):
        calls.append(1)
        return fn(x, w)
    return counted


@pytest.mark.parametrize("agrees", [True, False])
def test_drawn_rows_take_the_second_reference_after_the_first_draw_only_if_it_agrees(agrees):
    """The sequential reference runs on the first draw beside the fast one; the later draws use
    the fast one only if it gave the same outputs and gradients there."""
    naive_calls, fast_calls = [], []
    def off_by_1e6(x, w):  # dw off by 1e-6 relative: far beyond float64 rounding
        return x * (w + 1e-6 * (w - w.detach()))
    fast = product if agrees else off_by_1e6
    gpu_check.RESULTS.clear()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(4, 64, dtype=torch.float64, generator=gen).requires_grad_(),
                  w=torch.randn(64, dtype=torch.float64, generator=gen).requires_grad_(), _fp32=("w",))
    gpu_check.compare_op("toy", torch.bfloat16, "case", product_with_dw_error(0.01),
                         counting(product, naive_calls), inputs,
                         lambda outs: [torch.randn_like(o) for o in outs],
                         baselines={"mamba_ssm": stand_in(0.01)}, draws=4,
                         fast_reference=counting(fast, fast_calls))
    (row,) = gpu_check.RESULTS
    assert row["ok"], row["note"]
    # naive: once for the cotangents' shape, then per draw that uses it
    assert (len(naive_calls), len(fast_calls)) == ((2, 4) if agrees else (5, 1))
    if agrees:
        assert row["fast_reference_agreement"] == 0.0 and "it agreed to 0e+00" in row["note"]
    else:
        assert row["fast_reference_agreement"] == pytest.approx(1e-6, rel=0.01)
        assert "disagreed" in row["note"]
    assert row["errors"]["dw"] == pytest.approx(0.01, rel=0.05)  # (bf16 rounding around it)


def test_geometric_mean_errors_keeps_a_nan_or_inf_draw():
    means = gpu_check.geometric_mean_errors([{"a": 1e-2, "b": 1e-3}, {"a": float("inf"), "b": 1e-1}])
    assert means["a"] == float("inf") and means["b"] == pytest.approx(1e-2)
    assert math.isnan(gpu_check.geometric_mean_errors([{"a": float("nan")}, {"a": 1.0}])["a"])


def test_mamba_ssm_autotuners_take_one_config_and_everything_is_undone():
    triton = pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner
    configs = [triton.Config({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64}, num_stages=3),
               triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32}, num_stages=2),
               triton.Config({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256}, num_stages=3)]
    tuner = SimpleNamespace(configs=configs, early_config_prune=None, perf_model=None)
    before = (torch.cuda.device, torch.cuda.get_device_properties, Autotuner.prune_configs)
    with gpu_check.mamba_ssm_one_config(torch.device("cpu")):
        assert Autotuner.prune_configs(tuner, {}) == [configs[2]]  # fewest programs to interpret
        assert torch.cuda.get_device_properties(None).multi_processor_count == 132
        with torch.cuda.device(None):
            pass
    assert (torch.cuda.device, torch.cuda.get_device_properties, Autotuner.prune_configs) == before
    with gpu_check.mamba_ssm_one_config(torch.device("cuda")):
        assert Autotuner.prune_configs(tuner, {}) == [configs[1]]  # the cheapest, as mamba_ssm's
        assert torch.cuda.get_device_properties is before[1]       # deterministic mode picks
    assert Autotuner.prune_configs is before[2]


# ---------------------------------------------------------------------------------------------
# The mapping onto mamba_ssm's kernels (float32, Triton interpreter, subprocess)
# ---------------------------------------------------------------------------------------------

HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None


@pytest.mark.skipif(not HAS_MAMBA_SSM, reason="mamba_ssm is not installed (pip install --no-deps "
                                              ".whl/mamba_ssm-*.whl --target DIR; PYTHONPATH=DIR)")
@pytest.mark.parametrize("group", ["ssd", "mixer"])
def test_mamba_ssm_mapping_reproduces_the_reference_in_fp32(group):
    pytest.importorskip("triton")
    run_group(__file__, group, timeout=900)


def _errors_of(fn, reference, inputs, context):
    """Errors of fn against reference (float64), both given the same float32 values."""
    low = {k: (v.float().detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
               and v.is_floating_point() else v) for k, v in inputs.items()}
    ref = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
               and v.is_floating_point() else v) for k, v in low.items()}
    outs_r = reference(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in ref.items()})
    outs_r = outs_r if isinstance(outs_r, tuple) else (outs_r,)
    gen = torch.Generator().manual_seed(1)
    out_grads = [torch.randn(o.shape, dtype=torch.float64, generator=gen) for o in outs_r]
    with context():
        outs, grads = gpu_check.grads_of(fn, low, out_grads)
    outs_r, grads_r = gpu_check.grads_of(reference, ref, out_grads)
    return gpu_check.errors_against(outs, grads, outs_r, grads_r)


def _check(name, errors, failures, expected_keys):
    print(name, " ".join(f"{k}={v:.1e}" for k, v in errors.items()), flush=True)
    if set(errors) != expected_keys or not all(e <= 1e-4 for e in errors.values()):
        failures.append((name, errors))


def _ssd_group(failures):
    from matmamba.ops.ssd.naive import ssd_scan_naive
    cpu = torch.device("cpu")
    baseline = gpu_check.mamba_ssm_baseline(gpu_check.ssd_scan_on_mamba_ssm, cpu)
    assert baseline is not None, gpu_check.mamba_ssm_kernels()[1]
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    for b, l, h, p, g, n, softplus, packed in [(2, 300, 4, 16, 2, 16, True, True),
                                               (1, 77, 3, 8, 1, 16, False, False)]:
        inputs = dict(
            x=rnd(b, l, h, p).requires_grad_(),
            dt=(rnd(b, l, h) * 0.5 if softplus else rnd(b, l, h).abs() * 0.05).requires_grad_(),
            A=(-torch.rand(h, dtype=torch.float64, generator=gen) * 5 - 1).requires_grad_(),
            B=rnd(b, l, g, n).requires_grad_(), C=rnd(b, l, g, n).requires_grad_(),
            D=rnd(h, p).requires_grad_() if packed else rnd(h).requires_grad_(),
            dt_bias=(gpu_check.dt_bias_init(h, cpu).requires_grad_() if softplus else None),
            initial_state=rnd(b, h, p, n).requires_grad_() if packed else None,
            seq_idx=None, dt_softplus=softplus,
            dt_limit=(0.0, 0.08) if packed else (0.0, math.inf), return_final_state=True)
        keys = {"out0", "out1", "dx", "ddt", "dA", "dB", "dC", "dD"}
        if packed:
            # labels that do not start at 0 and come back to an earlier value: mamba_ssm only
            # follows them once they are turned into segment ids
            seq = torch.full((b, l), 5, dtype=torch.int32)
            seq[:, l // 3:] = 2
            seq[:, l // 2 + 7:] = 5
            seq[0, l - 3:] = 9
            inputs["seq_idx"] = seq
            keys |= {"ddt_bias", "dinitial_state"}
        elif softplus:
            keys.add("ddt_bias")
        _check(f"ssd b{b} l{l} h{h} p{p} g{g} packed={packed}",
               _errors_of(baseline.fn, ssd_scan_naive, inputs, baseline.context), failures, keys)


def _mixer_group(failures):
    from matmamba.ops.triton_common.mixer import mamba2_mixer_core_reference
    cpu = torch.device("cpu")
    baseline = gpu_check.mamba_ssm_baseline(gpu_check.mixer_core_on_mamba_ssm, cpu)
    assert baseline is not None, gpu_check.mamba_ssm_kernels()[1]
    G, N, P, H, W, k, b, l = 1, 16, 8, 4, 4, 3, 2, 120
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    seq = torch.zeros(b, l, dtype=torch.int32)
    seq[:, 40:] = 1
    seq[1, 90:] = 2
    inputs = dict(
        zxbcdt=rnd(b, l, 2 * G * N + H + 2 * k * P).requires_grad_(),
        conv_weight=(rnd(2 * G * N + k * P, W) * 0.5).requires_grad_(),
        conv_bias=rnd(2 * G * N + k * P).requires_grad_(),
        dt_bias=gpu_check.dt_bias_init(k, cpu).requires_grad_(),
        A=(-torch.rand(k, dtype=torch.float64, generator=gen) * 5 - 1).requires_grad_(),
        D=rnd(k).requires_grad_(), norm_weight=(1 + 0.1 * rnd(k * P)).requires_grad_(),
        ngroups=G, dstate=N, headdim=P, nheads_total=H, seq_idx=seq)
    keys = {"out", "dzxbcdt", "dconv_weight", "dconv_bias", "ddt_bias", "dA", "dD", "dnorm_weight"}
    _check(f"mixer b{b} l{l} k{k}/{H} P{P} N{N} seq", _errors_of(
        baseline.fn, mamba2_mixer_core_reference, inputs, baseline.context), failures, keys)


if __name__ == "__main__":
    sys.exit(group_main({"ssd": _ssd_group, "mixer": _mixer_group}, sys.argv[1]))
