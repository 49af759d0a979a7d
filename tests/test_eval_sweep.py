"""The pieces of eval.py that need no trained model: sweeps, Pareto frontier, budgets, latency."""

import math

import pytest

from matmamba import create_model
from matmamba.evaluation import BudgetError, SweepError, build_sweep, pareto_front, parse_budget, select_under_budget
from matmamba.evaluation import latency as latency_mod
from matmamba.evaluation.submodels import Submodel, published_mixes, random_mixes, uniform_widths

SWEEP = dict(trained=True, uniform=False, step=1, mixes=False, mix_layers=None, random=0, seed=0, choices="trained",
             configs=[])


@pytest.fixture(scope="module")
def model():
    # d_model 64, headdim 8: valid widths are the multiples of 4 up to 64; trained 64, 32, 16, 8
    return create_model("vision_tiny", n_layer=3)


def test_trained_sweep_is_the_trained_widths(model):
    subs = build_sweep(model, SWEEP)
    assert [s.widths for s in subs] == [(w,) * 3 for w in (64, 32, 16, 8)]
    assert all(s.trained and s.kind == "trained" for s in subs)
    assert [s.name for s in subs] == ["64", "32", "16", "8"]


def test_uniform_sweep_counts_down_from_full_width(model):
    assert uniform_widths(model) == list(range(64, 0, -4))
    assert uniform_widths(model, step=3) == [64, 52, 40, 28, 16, 4]
    subs = build_sweep(model, {**SWEEP, "uniform": True, "step": 3})
    # trained widths first, then the uniform widths not already there
    assert [s.uniform_width for s in subs] == [64, 32, 16, 8, 52, 40, 28, 4]
    assert [s.kind for s in subs] == ["trained"] * 4 + ["uniform"] * 4
    with pytest.raises(SweepError, match="step"):
        build_sweep(model, {**SWEEP, "uniform": True, "step": 0})


def test_published_mixes_are_first_k_at_one_width_rest_at_another(model):
    mixes = published_mixes([64, 16], 3)
    assert mixes == [[64, 16, 16], [64, 64, 16], [16, 64, 64], [16, 16, 64]]
    subs = build_sweep(model, {**SWEEP, "trained": False, "mixes": True})
    assert len(subs) == 4 * 3 * 2  # ordered pairs of 4 trained widths x k in {1, 2}
    assert all(s.kind == "mix" and not s.trained for s in subs)
    assert subs[0].name == "64x1+32x2"
    assert build_sweep(model, {**SWEEP, "trained": False, "mixes": True, "mix_layers": [2]})[0].widths == (64, 64, 32)
    with pytest.raises(SweepError, match="mix_layers"):
        build_sweep(model, {**SWEEP, "mixes": True, "mix_layers": [3]})


def test_random_mixes_are_seeded_distinct_and_new(model):
    a = build_sweep(model, {**SWEEP, "random": 20, "seed": 1})
    b = build_sweep(model, {**SWEEP, "random": 20, "seed": 1})
    c = build_sweep(model, {**SWEEP, "random": 20, "seed": 2})
    assert [s.widths for s in a] == [s.widths for s in b] != [s.widths for s in c]
    random = [s for s in a if s.kind == "random"]
    assert len(random) == 20 and len({s.widths for s in a}) == len(a) == 24
    assert all(set(s.widths) <= {64, 32, 16, 8} for s in random)
    assert not any(len(set(s.widths)) == 1 for s in random)  # the uniform ones were already in the sweep
    # 4 choices ^ 3 layers = 64 mixes, 4 of them trained: at most 60 new ones exist
    assert len(random_mixes([64, 32, 16, 8], 3, 100, 0, exclude=[(w,) * 3 for w in (64, 32, 16, 8)])) == 60
    valid = build_sweep(model, {**SWEEP, "trained": False, "random": 30, "choices": "valid"})
    assert {w for s in valid for w in s.widths} - {64, 32, 16, 8}  # draws beyond the trained widths


def test_explicit_configurations_and_single_width(model):
    subs = build_sweep(model, {**SWEEP, "trained": False, "configs": [12, [64, 32, 8], "20"]})
    assert [s.widths for s in subs] == [(12, 12, 12), (64, 32, 8), (20, 20, 20)]
    assert [s.spec for s in subs] == [12, [64, 32, 8], 20]
    only = build_sweep(model, {**SWEEP, "uniform": True, "random": 5}, width=32)
    assert [(s.widths, s.trained) for s in only] == [((32, 32, 32), True)]


@pytest.mark.parametrize("bad, message", [
    (6, "invalid width 6.*Valid widths: multiples of 4"),
    (68, "invalid width 68"),
    ([64, 32], "needs 3 integer widths"),
    ([64, 30, 8], "64x1\\+30x1\\+8x1.*invalid width 30"),
    ("wide", "a width must be an int"),
])
def test_invalid_configurations_fail_before_evaluation(model, bad, message):
    with pytest.raises(SweepError, match=message):
        build_sweep(model, SWEEP, width=bad)


def test_empty_or_unknown_sweeps_fail(model):
    with pytest.raises(SweepError, match="empty"):
        build_sweep(model, {**SWEEP, "trained": False})
    with pytest.raises(SweepError, match="unknown sweep keys"):
        build_sweep(model, {**SWEEP, "widths": [1]})


def test_submodel_names_are_run_length_labels():
    assert Submodel((64, 64, 32, 64), "list").name == "64x2+32x1+64x1"
    assert Submodel((16,) * 4, "uniform").name == "16"


def test_pareto_front():
    costs = [1, 2, 2, 3, 4, 5, float("nan")]
    values = [0.5, 0.4, 0.7, 0.7, 0.9, 0.8, 1.0]
    assert pareto_front(costs, values, maximize=True) == [0, 2, 4]
    losses = [3.0, 2.5, 2.9, 2.0, 2.1, 1.0, 0.1]
    assert pareto_front(costs, losses, maximize=False) == [0, 1, 3, 5]
    assert pareto_front([None, 1.0], [1.0, 0.2]) == [1]


def rows():
    return [
        dict(name="64", params=1000, flops=10, latency_ms=4.0, top1=0.90),
        dict(name="48", params=700, flops=7, latency_ms=3.0, top1=0.88),
        dict(name="32", params=500, flops=5, latency_ms=2.5, top1=0.80),
        dict(name="mix", params=480, flops=5, latency_ms=2.6, top1=0.80),
        dict(name="16", params=300, flops=3, latency_ms=2.0, top1=0.60),
    ]


def test_budget_picks_the_best_configuration_that_fits():
    assert select_under_budget(rows(), {"params": 800}, "top1", True)["name"] == "48"
    assert select_under_budget(rows(), {"params": 600}, "top1", True)["name"] == "mix"  # tie: fewer params
    assert select_under_budget(rows(), {"params": 800, "latency_ms": 2.55}, "top1", True)["name"] == "32"
    assert select_under_budget(rows(), {"flops": 3}, "top1", True)["name"] == "16"
    losses = [dict(r, loss=1 - r["top1"]) for r in rows()]
    assert select_under_budget(losses, {"params": 1000}, "loss", False)["name"] == "64"


def test_impossible_budget_names_the_smallest_configuration():
    with pytest.raises(BudgetError, match=r"params <= 100 .*smallest configuration found is 16 with params = 300"):
        select_under_budget(rows(), {"params": 100}, "top1", True)
    with pytest.raises(BudgetError, match="latency_ms"):
        select_under_budget([dict(r, latency_ms=None) for r in rows()], {"latency_ms": 3}, "top1", True)


def test_parse_budget():
    assert parse_budget({"params": "40e6", "flops": None, "latency_ms": 2}) == {"params": 4e7, "latency_ms": 2.0}
    for bad in ({"params": -1}, {"params": "many"}, {"memory": 1}, {"flops": math.inf}):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_latency_is_the_median_after_warmup(monkeypatch):
    import torch

    ticks = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003, 3.0, 3.100, 4.0, 4.002])  # 5, 1, 3, 100, 2 ms
    monkeypatch.setattr(latency_mod.time, "perf_counter", lambda: next(ticks))
    calls = []
    ms = latency_mod.measure_latency(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=5)
    assert len(calls) == 7
    assert ms == pytest.approx(3.0)
    x = torch.arange(6.0).reshape(3, 2)
    assert latency_mod.latency_batch(x, 7).tolist() == [[0, 1], [2, 3], [4, 5]] * 2 + [[0, 1]]


def test_compare_averages_uniform_widths_over_seeds(tmp_path, capsys):
    import json

    from matmamba.evaluation import compare

    def sweep(path, accs):
        configs = [dict(name=str(w), width=w, trained=w in (64, 16), params=w * 1000, top1=a) for w, a in accs.items()]
        configs.append(dict(name="64x1+16x1", width=None, trained=False, params=400, top1=0.99))  # a mix: ignored
        path.write_text(json.dumps({"metric": "top1", "configurations": configs}))
        return str(path)

    joint = [sweep(tmp_path / "j1.json", {64: 0.9, 32: 0.8, 16: 0.7}),
             sweep(tmp_path / "j2.json", {64: 0.8, 32: 0.6, 16: 0.7})]
    full = [sweep(tmp_path / "f1.json", {64: 0.95, 32: 0.3, 16: 0.1})]
    points = compare.uniform_points([compare.load_sweep(p) for p in joint], "top1")
    assert [(p["x"], p["n"], p["trained"]) for p in points] == [(16, 2, True), (32, 2, False), (64, 2, True)]
    assert points[1]["mean"] == pytest.approx(0.7) and points[1]["std"] == pytest.approx(0.1414, abs=1e-4)
    table = compare.main([f"joint={','.join(joint)}", f"full={full[0]}", "--out", str(tmp_path / "c.png")])
    lines = table.splitlines()
    assert lines[0] == "| width | params | joint top1 % | full top1 % |"
    assert lines[2] == "| 64 | 64K | 85.0 ± 7.1 ★ | 95.0 ★ |"
    assert lines[4] == "| 16 | 16K | 70.0 ± 0.0 ★ | 10.0 ★ |"
    assert (tmp_path / "c.png").stat().st_size > 10_000
