#!/usr/bin/env python
"""The causal conv1d backward on the GPU: the one-pass kernel under candidate launch options
against the two-pass form, in the block's layout, checked and timed in one run; then the
MatMamba2 block's forward + backward under each form.

    python scripts/bench_conv.py --json /tmp/bench_conv.json
    python scripts/bench_conv.py --shapes block,vit --grid 32x64x8,16x64x4
    python scripts/bench_conv.py --cpu-dry-run          # the plumbing, on the CPU (interpreter)

Layout: as ``matmamba.ops.triton_common.mixer`` calls it, the conv reads its 2GN + HP channels
out of the in_proj output (B, C, then x of every head) through a column map, and writes dx into
the in_proj output's gradient through the same map. A candidate is BLOCK_LxBLOCK_Dxnum_warps
(``conv1d.triton_impl.ONE_PASS_OVERRIDES``); ``--programs-per-sm`` sets how many programs
along l the grid aims at per SM.

Checks before any timing, with NaN-poisoned allocations: every candidate at every shape
against the two-pass form on the same inputs (dx over the mapped columns, dweight, dbias), and at
two small awkward shapes (packed sequences, an initial state, widths 4 and 3, a strided input)
against the float64 reference in fp32 and bf16. A candidate over the tolerance is not timed.

Timing: GPU time per call (each round queued behind ``torch.cuda._sleep`` so the events bracket
GPU work only, not the host's launches), the median of the rounds, both forms in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

# (batch, seqlen, d_model): the block's shapes, expand 2, head dim 24, N 128, one group
SHAPES = {
    "block": (8, 2048, 768),       # the block case
    "lm_step": (32, 1024, 768),    # lm_130m's micro-batch
    "vit": (64, 197, 768),         # ViT-B/16 tokens
    "width96": (8, 2048, 96),      # the D/8 width of the block case (4 heads of 24)
}
DEFAULT_GRID = "32x64x8,16x64x4,32x32x4,16x128x4,64x64x8,32x64x4"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="block,lm_step,vit,width96",
                   help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--grid", default=DEFAULT_GRID,
                   help="one-pass candidates, BLOCK_LxBLOCK_Dxnum_warps, comma-separated")
    p.add_argument("--programs-per-sm", default="8", help="comma-separated values to try")
    p.add_argument("--reps", type=int, default=10, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--no-block", action="store_true", help="skip the block forward + backward")
    p.add_argument("--json", default=None)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny shapes on the CPU under the Triton interpreter: the checks and the "
                        "plumbing, no meaningful times")
    return p.parse_args(argv)


def parse_grid(text: str) -> list[dict]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            block_l, block_d, warps = (int(v) for v in item.split("x"))
        except ValueError:
            sys.exit(f"--grid: {item!r} is not BLOCK_LxBLOCK_Dxnum_warps (e.g. 32x64x8)")
        for name, v in (("BLOCK_L", block_l), ("BLOCK_D", block_d)):
            if v < 16 or v & (v - 1):
                sys.exit(f"--grid: {name} must be a power of two >= 16; got {v} in {item!r}")
        out.append(dict(BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps))
    return out


@contextlib.contextmanager
def poisoned_allocations(torch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        t.fill_(float("nan") if t.is_floating_point() else -7)
        return t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not bool(a.isfinite().all()):
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def conv_form(ci, form: str, overrides: dict | None = None):
    old_env = os.environ.get("MATMAMBA_CONV_BWD")
    os.environ["MATMAMBA_CONV_BWD"] = form
    ci.ONE_PASS_OVERRIDES.clear()
    ci.ONE_PASS_OVERRIDES.update(overrides or {})
    try:
        yield
    finally:
        ci.ONE_PASS_OVERRIDES.clear()
        if old_env is None:
            os.environ.pop("MATMAMBA_CONV_BWD", None)
        else:
            os.environ["MATMAMBA_CONV_BWD"] = old_env


def block_layout_problem(torch, shape, dev, dtype, dstate=128):
    """The conv backward's inputs as the fused mixer core passes them."""
    from matmamba.ops.triton_common import mixer
    batch, seqlen, d_model = shape
    headdim = 24
    nheads = 2 * d_model // headdim
    gn = dstate
    cols = 2 * gn + nheads + 2 * nheads * headdim
    dim = 2 * gn + nheads * headdim
    gen = torch.Generator(device="cpu").manual_seed(0)
    zxbcdt = torch.randn(batch, seqlen, cols, generator=gen).to(dev, dtype)
    dy = torch.randn(batch, seqlen, dim, generator=gen).to(dev, dtype)
    weight = (torch.randn(dim, 4, generator=gen) * 0.5).to(dev)
    bias = torch.randn(dim, generator=gen).to(dev)
    conv_cols, _ = mixer._column_maps(zxbcdt.device, gn, nheads, headdim, nheads)
    vec = mixer._map_vector_width(gn, nheads, headdim, cols)
    return dict(zxbcdt=zxbcdt, dy=dy, weight=weight, bias=bias, conv_cols=conv_cols, vec=vec)


def run_backward(ci, torch, prob):
    d_zxbcdt = torch.empty_like(prob["zxbcdt"])
    _, dw, db, _ = ci.conv_backward(prob["dy"], prob["zxbcdt"], prob["weight"], prob["bias"], None,
                                    None, True, prob["conv_cols"], dx_out=d_zxbcdt,
                                    colmap_vec=prob["vec"])
    return d_zxbcdt[..., prob["conv_cols"].long()], dw, db


def small_checks(ci, torch, dev, dtypes, shapes=((2, 77, 37, 4), (3, 50, 20, 3))) -> float:
    """Worst relative error of the public op's gradients against float64 (small awkward shapes),
    in units of the tolerance (1e-4 fp32, 1e-2 16-bit): <= 1 passes."""
    from matmamba.ops.conv1d.naive import causal_conv1d_naive
    worst = 0.0
    for dtype in dtypes:
        for b, l, d, w in shapes:
            gen = torch.Generator(device="cpu").manual_seed(l)
            x = torch.randn(b, l, d + 5, generator=gen)[..., 2:2 + d]
            weight = torch.randn(d, w, generator=gen) * 0.5
            bias = torch.randn(d, generator=gen)
            init = torch.randn(b, d, w - 1, generator=gen)
            seq = torch.zeros(b, l, dtype=torch.int64)
            seq[:, l // 3:] = 1
            seq[:, l // 2:] = 4
            cot = torch.randn(b, l, d, generator=gen)
            low = [t.to(dev, dtype if i in (0, 3) else torch.float32).requires_grad_()
                   for i, t in enumerate((x, weight, bias, init))]
            ref = [t.double().requires_grad_() for t in (x, weight, bias, init)]
            from matmamba.ops.conv1d.triton_impl import causal_conv1d_triton
            with poisoned_allocations(torch):
                y = causal_conv1d_triton(low[0], low[1], low[2], seq_idx=seq.to(dev),
                                         initial_state=low[3])
                grads = torch.autograd.grad((y.double() * cot.to(dev).double()).sum(), low)
            y_ref = causal_conv1d_naive(ref[0], ref[1], ref[2], seq_idx=seq, initial_state=ref[3])
            grads_ref = torch.autograd.grad((y_ref * cot.double()).sum(), ref)
            for g, r in zip(grads, grads_ref):
                err = rel_err(g.cpu(), r)
                tol = 1e-4 if dtype == torch.float32 else 1e-2
                worst = max(worst, err / tol)
    return worst


def gpu_ms(torch, fn, reps: int, rounds: int, on_cuda: bool) -> float:
    fn()
    if not on_cuda:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    torch.cuda.synchronize()
    # the host's enqueue time for one round, so the sleep in front of a round can outlast it
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    host_s = time.perf_counter() - t0
    cycles = int(max(2e-3, 2 * host_s) * torch.cuda.get_device_properties(0).clock_rate * 1e3)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from matmamba.ops.conv1d import triton_impl as ci

    on_cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not on_cuda and not args.cpu_dry_run:
        sys.exit("bench_conv.py needs a CUDA GPU (or --cpu-dry-run for the plumbing)")
    dev = torch.device("cuda" if on_cuda else "cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    shapes = {}
    for name in filter(None, args.shapes.split(",")):
        if name not in SHAPES:
            sys.exit(f"--shapes: unknown {name!r}; valid: {', '.join(SHAPES)}")
        shapes[name] = SHAPES[name] if on_cuda else (2, 40, 24)
    grid = parse_grid(args.grid)
    pps = [int(v) for v in args.programs_per_sm.split(",")]
    candidates = [dict(c, programs_per_sm=p) for c in grid for p in pps]
    result = dict(device=torch.cuda.get_device_name() if on_cuda else "cpu (interpreter)",
                  torch=torch.__version__, triton=__import__("triton").__version__,
                  dtype=str(dtype), default=ci._one_pass_options(1792), shapes={}, block={})
    print(f"{result['device']}, torch {result['torch']}, Triton {result['triton']}, {dtype}")

    # checks: the default and every candidate against float64 at small shapes
    check_dtypes = (torch.float32, torch.bfloat16) if on_cuda else (torch.float32,)
    check_shapes = ((2, 77, 37, 4), (3, 50, 20, 3)) if on_cuda else ((2, 37, 19, 4), (1, 21, 12, 3))
    vetted = []
    for cand in [{}] + candidates:
        with conv_form(ci, "one_pass", cand):
            try:
                worst = small_checks(ci, torch, dev, check_dtypes, check_shapes)
            except Exception as error:  # noqa: BLE001 - a candidate that fails to compile/launch
                worst = math.inf
                print(f"  candidate {cand}: {type(error).__name__}: {str(error)[:200]}")
        print(f"check vs float64  {cand or 'default'}: worst {worst:.2f} of the tolerance "
              f"{'ok' if worst <= 1 else 'REJECTED'}")
        if worst <= 1 and cand:
            vetted.append(cand)
    with conv_form(ci, "two_pass"):
        result["two_pass_small_check"] = small_checks(ci, torch, dev, check_dtypes,
                                                      check_shapes)

    for name, shape in shapes.items():
        prob = block_layout_problem(torch, shape, dev, dtype, 128 if on_cuda else 16)
        with conv_form(ci, "two_pass"), poisoned_allocations(torch):
            ref = run_backward(ci, torch, prob)
        with conv_form(ci, "two_pass"):
            base = gpu_ms(torch, lambda: run_backward(ci, torch, prob), args.reps, args.rounds,
                          on_cuda)
        rows = [dict(form="two_pass", ms=base, ratio=1.0)]
        for cand in [{}] + vetted:
            with conv_form(ci, "one_pass", cand):
                with poisoned_allocations(torch):
                    got = run_backward(ci, torch, prob)
                errors = [rel_err(g, r) for g, r in zip(got, ref)]
                if max(errors) > 1e-2:
                    rows.append(dict(form="one_pass", options=cand, errors=errors, rejected=True))
                    print(f"{name}: {cand or 'default'} REJECTED against two_pass: {errors}")
                    continue
                ms = gpu_ms(torch, lambda: run_backward(ci, torch, prob), args.reps,
                            args.rounds, on_cuda)
            rows.append(dict(form="one_pass", options=cand or "default", ms=ms, ratio=base / ms,
                             errors=errors))
        result["shapes"][name] = dict(shape=shape, rows=rows)
        print(f"\n{name} {shape} (conv dim {prob['dy'].shape[-1]}): GPU ms per backward")
        for row in rows:
            if row.get("rejected"):
                continue
            label = row["form"] if row["form"] == "two_pass" else f"one_pass {row['options']}"
            print(f"  {label:70s} {row['ms']:8.4f}  {row['ratio']:5.2f}x")

    if not args.no_block:
        from matmamba import MatMamba2
        for name, (batch, seqlen, d_model), widths in [("block", SHAPES["block"], (768, 96)),
                                                       ("vit", SHAPES["vit"], (768,))]:
            if not on_cuda:
                batch, seqlen, d_model, widths = 2, 70, 96, (96, 48)
            torch.manual_seed(0)
            block = MatMamba2(d_model=d_model, d_state=128 if on_cuda else 16, layer_idx=0).to(dev)
            u = torch.randn(batch, seqlen, d_model, device=dev)
            grad = torch.randn_like(u)
            for width in widths:
                def step():
                    x = u.detach().requires_grad_()
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_cuda):
                        out = block(x, width=width)
                    out.backward(grad)
                row = {}
                for form in ("two_pass", "one_pass"):
                    with conv_form(ci, form):
                        row[form] = gpu_ms(torch, step, 3 if on_cuda else 1, args.rounds, on_cuda)
                row["ratio"] = row["two_pass"] / row["one_pass"]
                result["block"][f"{name} D{d_model} b{batch} l{seqlen} width {width}"] = row
                print(f"block fwd+bwd {name} D{d_model} b{batch} l{seqlen} width {width}: GPU "
                      f"two_pass {row['two_pass']:.3f} ms, one_pass {row['one_pass']:.3f} ms "
                      f"({row['ratio']:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
