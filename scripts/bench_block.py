#!/usr/bin/env python
"""Benchmark of the Triton kernels and the MatMamba2 block against mamba_ssm's Triton path.

Timing: CUDA events around each call, warm-up first, the median of many runs (and the spread,
(max-min)/median of the middle half, printed beside it). Baseline in the same process and run:

- SSD alone: ``mamba_ssm``'s ``mamba_chunk_scan_combined`` (chunk 256) and
  flash-linear-attention's ``chunk_simple_gla`` on the same scan core (q = C, k = B,
  v = x dt', g = A dt', scale 1; its inputs prepared outside the timed region), forward and
  forward + backward (``fla_fwdbwd``: where fla refuses its backward on this Triton, timed with
  the refusal lifted, values untrusted).
- The block: the published MatMamba2 forward at each width (gather the width's rows of in_proj
  and conv with ``torch.cat``, PyTorch's conv1d + SiLU, ``mamba_chunk_scan_combined``,
  ``mamba_ssm``'s gated RMSNorm, out_proj), on the same weights as ours.
- Decoding: ``mamba_ssm``'s ``selective_state_update`` against ours for the state update op,
  and the full 24-layer step against its bytes-moved floor.

All block cases: bf16 autocast, fp32 weights, forward + backward of a random cotangent, input
gradient included. Peak memory is ``max_memory_allocated`` during one call minus what was
allocated before it. JSON goes to ``--json``; a table is printed last.

``profile`` (in the default list) takes the per-kernel CUDA time of the scan and of the block at
full width and D/8; with the block's graphed baseline in the same run, the target table then says
what a 4x block leaves and what the GEMMs, the scan's kernels and the rest take now. Cases beyond
the default list (``--cases``): ``variants`` (the scan's state forms x chunk lengths), ``pack``
(the scan with k rows packed into one, every k against the op's own choice, and the ViT block
with packing off and on; ours only).

mamba_ssm / fla-core are imported from wherever Python finds them (scripts/gpu_visit.sh installs
the wheels to /tmp/site). ``selective_scan_cuda`` is replaced by an empty module and the
``mamba_ssm`` package's __init__ is bypassed (it imports CUDA extensions the Mamba2 Triton path
does not need).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

RESULTS: list[dict] = []
META: dict = {}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def bench(fn, warmup=3, reps=20, min_ms=200.0):
    """Median ms of fn() over CUDA events (reps grows so the total is >= min_ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = max(reps, min(200, int(min_ms / once)))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    median = statistics.median(times)
    q1, q3 = times[len(times) // 4], times[(3 * len(times)) // 4]
    return dict(ms=median, spread=(q3 - q1) / median if median else 0.0, reps=reps)


def peak_mb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def save(path):
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta=META, results=RESULTS), f, indent=1, default=str)


def add(case, shape, ours=None, base=None, base_name="", note="", **extra):
    ratio = (base["ms"] / ours["ms"]) if (ours and base) else None
    row = dict(case=case, shape=shape, ours_ms=ours["ms"] if ours else None,
               ours_spread=ours["spread"] if ours else None,
               base_ms=base["ms"] if base else None, base_name=base_name,
               speedup=ratio, note=note, **extra)
    RESULTS.append(row)
    print(f"  {case:<34} {shape:<36} ours {fmt(row['ours_ms'])} ms  {base_name or 'base'} "
          f"{fmt(row['base_ms'])} ms  x{fmt(ratio, 2)}  {note}", flush=True)


def fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def import_baselines():
    """(mamba module dict or None, fla chunk_simple_gla or None, reasons)."""
    reasons = {}
    mamba = None
    try:
        from mamba_baseline import expose_mamba_ssm_package

        expose_mamba_ssm_package()
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        import importlib.metadata as md
        mamba = dict(scan=mamba_chunk_scan_combined, rmsnorm=rmsnorm_fn,
                     state_update=selective_state_update)
        try:
            META["mamba_ssm"] = md.version("mamba_ssm")
        except Exception:  # noqa: BLE001
            META["mamba_ssm"] = "unknown"
    except Exception as error:  # noqa: BLE001
        reasons["mamba_ssm"] = f"{type(error).__name__}: {error}"
    fla = None
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        fla = chunk_simple_gla
        import importlib.metadata as md
        try:
            META["fla_core"] = md.version("fla-core")
        except Exception:  # noqa: BLE001
            META["fla_core"] = "unknown"
    except Exception as error:  # noqa: BLE001
        reasons["fla"] = f"{type(error).__name__}: {error}"
    return mamba, fla, reasons


class PublishedBlock:
    """The published MatMamba2 forward at a width, on mamba_ssm kernels, from a published-layout
    state dict: the width's rows are gathered (copies) every call, as the published code does."""

    def __init__(self, sd: dict, d_model, d_state, headdim, mamba, d_conv=4, expand=2, ngroups=1):
        self.sd = {k: v for k, v in sd.items()}
        self.D, self.N, self.P, self.mamba = d_model, d_state, headdim, mamba
        self.E = expand * d_model
        self.H = self.E // headdim
        self.GN = ngroups * d_state
        self.ngroups = ngroups
        self.d_conv = d_conv

    def params(self):
        return [v for v in self.sd.values() if v.requires_grad]

    def __call__(self, u, width):
        sd, E, GN, P = self.sd, self.E, self.GN, self.P
        k = 2 * width // P
        Ek = k * P
        W = sd["in_proj.weight"]
        w_rows = torch.cat([W[:Ek], W[E:E + Ek], W[2 * E:2 * E + 2 * GN], W[2 * E + 2 * GN:2 * E + 2 * GN + k]])
        zxbcdt = F.linear(u, w_rows)
        z, xBC, dt = torch.split(zxbcdt, [Ek, Ek + 2 * GN, k], dim=-1)
        cw = sd["conv1d.weight"]
        cb = sd["conv1d.bias"]
        conv_w = torch.cat([cw[:Ek], cw[E:]])
        conv_b = torch.cat([cb[:Ek], cb[E:]])
        l = u.shape[1]
        xBC = F.silu(F.conv1d(xBC.transpose(1, 2), conv_w[:, None, :], conv_b, padding=self.d_conv - 1,
                              groups=conv_w.shape[0])[..., :l].transpose(1, 2))
        x, B, C = torch.split(xBC, [Ek, GN, GN], dim=-1)
        b = u.shape[0]
        A = -torch.exp(sd["A_log"][:k].float())
        y = self.mamba["scan"](x.reshape(b, l, k, P), dt, A, B.reshape(b, l, self.ngroups, -1),
                               C.reshape(b, l, self.ngroups, -1), chunk_size=256, D=sd["D"][:k],
                               dt_bias=sd["dt_bias"][:k], dt_softplus=True)
        y = self.mamba["rmsnorm"](y.reshape(b, l, Ek), sd["norm.weight"][:Ek], None, z=z, eps=1e-5,
                                  norm_before_gate=False)
        return F.linear(y, sd["out_proj.weight"][:, :Ek])


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def measure_ceilings():
    n = 1 << 28  # 512 MiB of bf16 per buffer
    a = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), warmup=2, reps=10)
    META["copy_GBps"] = 2 * n * 2 / (t["ms"] * 1e-3) / 1e9
    del a, b
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: m @ m, warmup=2, reps=10)
    META["gemm_bf16_TFLOPs"] = 2 * 8192**3 / (t["ms"] * 1e-3) / 1e12
    del m
    torch.cuda.empty_cache()
    print(f"ceilings: copy {META['copy_GBps']:.0f} GB/s (read+write), bf16 GEMM "
          f"{META['gemm_bf16_TFLOPs']:.0f} TFLOP/s", flush=True)


def ssd_inputs(b, l, h, p, n, dev="cuda"):
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, l, h, p, device=dev, generator=gen).to(torch.bfloat16)
    dt = (torch.randn(b, l, h, device=dev, generator=gen) * 0.5).to(torch.bfloat16)
    A = -torch.rand(h, device=dev, generator=gen) * 15 - 1
    B = torch.randn(b, l, 1, n, device=dev, generator=gen).to(torch.bfloat16)
    C = torch.randn(b, l, 1, n, device=dev, generator=gen).to(torch.bfloat16)
    D = torch.randn(h, device=dev, generator=gen)
    dt0 = torch.exp(torch.rand(h, device=dev, generator=gen) * (math.log(0.1) - math.log(0.001))
                    + math.log(0.001))
    dt_bias = dt0 + torch.log(-torch.expm1(-dt0))
    return x, dt, A, B, C, D, dt_bias


def case_ssd(mamba, fla, shapes, chunks):
    from matmamba.ops.ssd.triton_impl import ssd_scan_triton
    print("SSD scan alone (bf16 inputs; A, D, dt_bias fp32; softplus; D skip)", flush=True)
    bw = META.get("copy_GBps", 4300) * 1e9
    for (b, l, h, p, n) in shapes:
        shape = f"b{b} l{l} h{h} p{p} n{n}"
        tensors = ssd_inputs(b, l, h, p, n)
        x, dt, A, B, C, D, dt_bias = tensors
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        dy = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16)
        # bytes floor: read x, dt, B, C, write y (forward); backward reads those plus dy, writes
        # dx, ddt, dB, dC
        fwd_bytes = 2 * (2 * x.numel() + dt.numel() + B.numel() + C.numel())
        bwd_bytes = fwd_bytes + 2 * (2 * x.numel() + dt.numel() + B.numel() + C.numel())
        floor = dict(fwd_floor_ms=fwd_bytes / bw * 1e3, fwdbwd_floor_ms=(fwd_bytes + bwd_bytes) / bw * 1e3)

        base_f = base_fb = None
        if mamba is not None:
            def mamba_fwd():
                return mamba["scan"](x, dt, A, B, C, chunk_size=256, D=D, dt_bias=dt_bias, dt_softplus=True)

            def mamba_fwdbwd():
                y = mamba["scan"](*leaves[:5], chunk_size=256, D=leaves[5], dt_bias=leaves[6],
                                  dt_softplus=True)
                y.backward(dy)
            t0 = time.time()
            mamba_fwdbwd()
            torch.cuda.synchronize()
            META.setdefault("mamba_first_call_s", {})[shape] = round(time.time() - t0, 1)
            base_f = bench(mamba_fwd)
            base_fb = bench(mamba_fwdbwd)
        for Q in chunks:
            os.environ["MATMAMBA_SSD_CHUNK"] = str(Q)

            def ours_fwd():
                return ssd_scan_triton(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True)

            def ours_fwdbwd():
                y = ssd_scan_triton(*leaves[:5], D=leaves[5], dt_bias=leaves[6], dt_softplus=True)
                y.backward(dy)
            if mamba is not None and Q == chunks[0]:
                with torch.no_grad():
                    err = ((ours_fwd().float() - mamba_fwd().float()).norm()
                           / mamba_fwd().float().norm()).item()
                note_err = f"|ours-mamba|/|mamba| fwd {err:.1e}"
            else:
                note_err = ""
            f_ = bench(ours_fwd)
            fb = bench(ours_fwdbwd)
            mem = peak_mb(ours_fwdbwd)
            add("ssd fwd", shape + f" Q{Q}", f_, base_f, "mamba", note_err, chunk=Q, **floor)
            add("ssd fwd+bwd", shape + f" Q{Q}", fb, base_fb, "mamba", f"peak {mem:.0f} MB",
                chunk=Q, peak_mb=mem, **floor)
            if Q == chunks[0]:
                # Eagerly the narrow shapes measure the host (Python and launches: 1.4-1.8 ms per
                # forward + backward, sessions 4 and 7); captured in CUDA graphs, both sides
                # replay their GPU work alone.
                try:
                    g_ours = bench(cuda_graphed(ours_fwdbwd))
                    g_base = bench(cuda_graphed(mamba_fwdbwd)) if mamba is not None else None
                    add("ssd fwd+bwd, CUDA graph", shape + f" Q{Q}", g_ours, g_base, "mamba",
                        "GPU work only", chunk=Q, **floor)
                except Exception as exc:  # noqa: BLE001 - a capture failing loses only this row
                    add("ssd fwd+bwd, CUDA graph", shape + f" Q{Q}",
                        note=f"capture failed: {type(exc).__name__}: {str(exc)[:160]}")
        os.environ.pop("MATMAMBA_SSD_CHUNK", None)
        if fla is not None:
            try:
                with torch.no_grad():
                    dtp = F.softplus(dt.float() + dt_bias)
                    q = C.expand(b, l, h, n).contiguous()
                    k_ = B.expand(b, l, h, n).contiguous()
                    v = (x.float() * dtp[..., None]).to(torch.bfloat16).contiguous()
                    g = (dtp * A).contiguous()
                t = bench(lambda: fla(q, k_, v, g=g, scale=1.0))
                ours_row = next(r for r in RESULTS if r["case"] == "ssd fwd" and r["shape"].startswith(shape))
                RESULTS.append(dict(case="fla chunk_simple_gla fwd", shape=shape, ours_ms=ours_row["ours_ms"],
                                    base_ms=t["ms"], base_name="fla", speedup=t["ms"] / ours_row["ours_ms"],
                                    note="scan core only, inputs prepared outside"))
                print(f"  fla chunk_simple_gla fwd {shape}: {t['ms']:.3f} ms (ours {ours_row['ours_ms']:.3f})",
                      flush=True)
                fla_fwdbwd(fla, shape, (q, k_, v, g))
            except Exception as error:  # noqa: BLE001
                print(f"  fla forward failed: {type(error).__name__}: {error}", flush=True)
        del tensors, leaves, x, dt, B, C
        torch.cuda.empty_cache()


def fla_fwdbwd(fla, shape, inputs):
    """fla's chunk_simple_gla forward + backward on the scan core's inputs, against our eager
    "ssd fwd+bwd" row. fla-core refuses its gated backward on Hopper with Triton 3.4 - 3.7.0 (a
    miscompile it reports in chunk_bwd_dqkwg, whose results may then be wrong); there the refusal
    is lifted for timing alone (the row's note says so): the kernels and their work are the same,
    only the values are not to be trusted."""
    ours_row = next(r for r in RESULTS if r["case"] == "ssd fwd+bwd" and r["shape"].startswith(shape))
    qg, kg, vg, gg = (t_.detach().clone().requires_grad_() for t_ in inputs)
    do = torch.randn_like(vg)

    def step():
        fla(qg, kg, vg, g=gg, scale=1.0)[0].backward(do)
    note = "scan core only, inputs prepared outside"
    try:
        try:
            step()
        except RuntimeError as error:
            if "3.7.1" not in str(error):
                raise
            import unittest.mock

            import fla.ops.common.chunk_o as chunk_o
            with unittest.mock.patch.object(chunk_o, "TRITON_ABOVE_3_7_1", True):
                t = bench(step)
            note += "; fla's Triton-version refusal lifted: timed only, its gradients not trusted"
            META.setdefault("fla_fwdbwd_guard_lifted", {})[shape] = str(error)[:200]
        else:
            t = bench(step)
    except Exception as error:  # noqa: BLE001 - the fla rows are context, not a target
        META.setdefault("fla_fwdbwd_refused", {})[shape] = f"{type(error).__name__}: {error}"[:300]
        print(f"  fla fwd+bwd failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        return
    ours = dict(ms=ours_row["ours_ms"], spread=ours_row["ours_spread"])
    add("fla chunk_simple_gla fwd+bwd", shape, ours, t, "fla", note)


def make_blocks(D, mamba):
    from matmamba import MatMamba2
    torch.manual_seed(0)
    block = MatMamba2(d_model=D, d_state=128, layer_idx=0).cuda()
    base = None
    if mamba is not None:
        sd = {k: v.detach().clone().requires_grad_() for k, v in block.published_state_dict().items()}
        sd["conv1d.weight"] = sd["conv1d.weight"].detach()[:, 0, :].contiguous().requires_grad_()
        base = PublishedBlock(sd, D, 128, block.headdim, mamba)
    return block, base


def fused_block_forward(block, u, width):
    """The block's forward with its middle (conv, scan, gated norm) as the one fused Triton node
    ``mamba2_mixer_core_triton``: in_proj GEMM on the width's prefix rows -> fused core ->
    out_proj on the width's prefix columns. Same weights and function as ``block(u, width)``."""
    from matmamba.ops.triton_common.mixer import mamba2_mixer_core_triton
    k = block.heads_for_width(width)
    P = block.headdim
    rows = block._in_proj_rows(k)
    channels = block._conv_channels(k)
    bias = block.in_proj.bias[:rows] if block.in_proj.bias is not None else None
    zxbcdt = F.linear(u, block.in_proj.weight[:rows], bias)
    A = -torch.exp(block.A_log[:k].float())
    y = mamba2_mixer_core_triton(
        zxbcdt, block.conv_weight[:channels],
        block.conv_bias[:channels] if block.conv_bias is not None else None,
        block.dt_bias[:k], A, block._D(k), block.norm.weight[:k * P],
        ngroups=block.ngroups, dstate=block.d_state, headdim=P, nheads_total=block.nheads,
        eps=block.norm.eps, norm_before_gate=block.norm_before_gate, dt_limit=block.dt_limit)
    return F.linear(y, block.out_proj.weight[:, :k * P], block.out_proj.bias)


def cuda_graphed(step):
    """``step`` (a forward + backward whose gradients accumulate into existing .grad tensors)
    captured once in a CUDA graph; returns the replay. The same GPU work without the host: what
    a graph-captured training step (e.g. torch.compile mode="reduce-overhead") pays per block."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, autotune and create every .grad before capturing
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def block_step_fns(block, base, b, l, D, width, fused=False, graphed=False):
    u = torch.randn(b, l, D, device="cuda", requires_grad=True)
    g = torch.randn(b, l, D, device="cuda", dtype=torch.bfloat16)
    # autocast's weight-cast cache must be off while capturing (torch.cuda.graph's advice)
    autocast = dict(device_type="cuda", dtype=torch.bfloat16, cache_enabled=not graphed)

    def ours():
        with torch.autocast(**autocast):
            out = fused_block_forward(block, u, width) if fused else block(u, width=width)
        out.backward(g)

    def baseline():
        with torch.autocast(**autocast):
            out = base(u, width)
        out.backward(g)

    def check():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            a = (fused_block_forward(block, u, width) if fused else block(u, width=width)).float()
            r = base(u, width).float()
        return ((a - r).norm() / r.norm()).item()
    if graphed:
        ours = cuda_graphed(ours)
        if base is not None:
            try:
                baseline = cuda_graphed(baseline)
            except Exception as error:  # noqa: BLE001 - report, time ours anyway
                print(f"  baseline could not be captured: {type(error).__name__}: {error}", flush=True)
                base = None
    return ours, (baseline if base is not None else None), (check if base is not None else None)


def case_block(mamba, configs, label, variants=("fused", "block", "graph")):
    """variants: "block" = the model's MatMamba2.forward (ops composed, as matmamba.models has
    it); "fused" = the same weights through ``fused_block_forward``; "graph" = the model's
    forward + backward captured in a CUDA graph and replayed, the baseline likewise (GPU time
    without host overhead on both sides)."""
    print(f"Block forward+backward ({label}; bf16 autocast, fp32 weights)", flush=True)
    for (D, b, l, widths) in configs:
        block, base = make_blocks(D, mamba)
        for width in widths:
            shape = f"D{D} b{b} l{l} width {width}"
            t_base = mem_base = None
            for variant in variants:
                graphed = variant == "graph"
                try:
                    ours, baseline, check = block_step_fns(block, base, b, l, D, width,
                                                           fused=variant == "fused", graphed=graphed)
                except Exception as error:  # noqa: BLE001 - e.g. a capture failure: next variant
                    print(f"  {variant} width {width}: {type(error).__name__}: {error}", flush=True)
                    continue
                t_ours = bench(ours)
                mem_ours = peak_mb(ours) if not graphed else None
                note = ""
                if graphed:
                    t_graph_base = bench(baseline) if baseline is not None else None
                    add(f"block {label} [{variant}]", shape, t_ours, t_graph_base, "published+mamba, graphed",
                        "both captured in CUDA graphs", D=D, b=b, l=l, width=width, variant=variant,
                        us_per_ktoken=t_ours["ms"] * 1e3 / (b * l / 1e3))
                    continue
                if baseline is not None:
                    if t_base is None:
                        t_base = bench(baseline)
                        mem_base = peak_mb(baseline)
                    note = f"|ours-base|/|base| {check():.1e}"
                tokens = b * l
                add(f"block {label} [{variant}]", shape, t_ours, t_base, "published+mamba", note,
                    D=D, b=b, l=l, width=width, variant=variant, peak_mb=mem_ours,
                    base_peak_mb=mem_base, us_per_ktoken=t_ours["ms"] * 1e3 / (tokens / 1e3))
        del block, base
        torch.cuda.empty_cache()


def case_lengths(mamba, lengths=(1024, 4096, 16384, 65536), tokens=65536):
    """The block at equal tokens per step, rows from 1K to 64K long; then each length's time per
    token against the shortest (issue 3 asks for at most 1.15x)."""
    first = len(RESULTS)
    case_block(mamba, [(768, tokens // l, l, (768,)) for l in lengths], "64K tokens",
               variants=("fused",))
    rows = [r for r in RESULTS[first:] if r["ours_ms"] is not None]
    if rows:
        shortest = rows[0]
        worst = max(r["ours_ms"] for r in rows) / shortest["ours_ms"]
        per = ", ".join(f"l={r['l']}: {r['ours_ms'] / shortest['ours_ms']:.3f}x" for r in rows)
        add("lengths: time per token vs the shortest", f"{tokens} tokens a step", note=(
            f"{per}; worst {worst:.3f}x (target <= 1.15x)"), worst_ratio=worst)


def case_cold_start(D=768, b=8, l=2048, fused=True):
    """First forward+backward of a new shape in a fresh process with an empty Triton cache."""
    code = f"""
import time, torch, sys
t0 = time.time()
sys.path.insert(0, {REPO!r})
sys.path.insert(0, {os.path.join(REPO, "scripts")!r})
from matmamba import MatMamba2
from bench_block import fused_block_forward
block = MatMamba2(d_model={D}, d_state=128).cuda()
run = (lambda u: fused_block_forward(block, u, {D})) if {fused!r} else block
u = torch.randn({b}, {l}, {D}, device='cuda', requires_grad=True)
torch.cuda.synchronize()
t1 = time.time()
with torch.autocast('cuda', dtype=torch.bfloat16):
    out = run(u)
out.float().sum().backward()
torch.cuda.synchronize()
t2 = time.time()
with torch.autocast('cuda', dtype=torch.bfloat16):
    out = run(u)
out.float().sum().backward()
torch.cuda.synchronize()
t3 = time.time()
print('COLD', t1 - t0, t2 - t1, t3 - t2)
"""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        start = time.time()
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=300)
        wall = time.time() - start
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("COLD")]
    if not line:
        print("cold start failed:", proc.stderr[-2000:], flush=True)
        RESULTS.append(dict(case="cold start", shape=f"D{D} b{b} l{l}", note="failed: " + proc.stderr[-300:]))
        return
    setup, first, second = (float(v) for v in line[0].split()[1:])
    RESULTS.append(dict(case="cold start", shape=f"D{D} b{b} l{l}", ours_ms=first * 1e3,
                        note=f"first fwd+bwd {first:.1f} s (compile incl.), second {second * 1e3:.1f} ms, "
                             f"process wall {wall:.1f} s, import+setup {setup:.1f} s",
                        first_s=first, second_ms=second * 1e3, process_wall_s=wall))
    print(f"  cold start D{D} b{b} l{l}: first fwd+bwd {first:.1f} s, second {second * 1e3:.1f} ms, "
          f"process wall {wall:.1f} s", flush=True)


def _eager_and_graphed_ms(step):
    """(eager ms, CUDA-graph ms or None) of ``step()`` (captured by ``cuda_graphed``)."""
    eager = bench(step, reps=20)["ms"]
    try:
        return eager, bench(cuda_graphed(step), reps=50)["ms"]
    except Exception as error:  # noqa: BLE001
        print(f"  CUDA graph capture failed: {type(error).__name__}: {error}", flush=True)
        return eager, None


def case_decode(mamba, batches=(1, 64), n_layer=24, D=768):
    """One token through an LM-130M-sized stack of blocks (bf16 weights), and through the
    lm_130m model (embedding, residual stream and its norms, LM head), eager and CUDA graph: the
    decoding paths of session 22 (the block's fused decode core, the residual norms' Triton kernel)
    and the public ops composed (what ran before), in the same process."""
    import contextlib

    import matmamba
    from matmamba import MatMamba2, ops
    from matmamba.models import InferenceParams
    print("Decode step (24 x MatMamba2 D768, bf16 weights; lm_130m)", flush=True)
    torch.manual_seed(0)
    blocks = [MatMamba2(d_model=D, d_state=128, layer_idx=i).cuda().to(torch.bfloat16).eval()
              for i in range(n_layer)]
    lm = matmamba.create_model("lm_130m").cuda().to(torch.bfloat16).eval()
    bw = META.get("copy_GBps", 4300) * 1e9
    weight_bytes = sum(p.numel() * p.element_size() for blk in blocks for p in blk.parameters())

    paths = {"fused core": contextlib.nullcontext, "ops composed": lambda: ops.use_fused_inference(False)}
    for batch in batches:
        caches = [blk.allocate_inference_cache(batch, 1, dtype=torch.bfloat16) for blk in blocks]
        state_bytes = sum(c.numel() * c.element_size() for pair in caches for c in pair)
        u = torch.randn(batch, 1, D, device="cuda", dtype=torch.bfloat16)

        def step():
            h = u
            for blk, (conv_state, ssm_state) in zip(blocks, caches):
                h = blk.step(h, conv_state, ssm_state)
            return h
        params = InferenceParams(max_seqlen=2, max_batch_size=batch)
        params.key_value_memory_dict = lm.allocate_inference_cache(batch, 2)
        params.seqlen_offset = 1  # past the prompt: one token a call, the states updated in place
        tokens = torch.randint(0, lm.config.vocab_size, (batch, 1), device="cuda")

        def lm_step():
            return lm(tokens, inference_params=params, num_last_tokens=1).logits
        floor_ms = (weight_bytes + 2 * state_bytes) / bw * 1e3
        for path, context in paths.items():
            with torch.no_grad(), context():
                eager_ms, graph_ms = _eager_and_graphed_ms(step)
                lm_eager_ms, lm_graph_ms = _eager_and_graphed_ms(lm_step)
            RESULTS.append(dict(case="decode step 24 layers", shape=f"b{batch} D{D} {path}",
                                ours_ms=eager_ms, graph_ms=graph_ms, floor_ms=floor_ms,
                                weight_MB=weight_bytes / 2**20, state_MB=state_bytes / 2**20, path=path,
                                note=f"eager {eager_ms:.3f} ms, graph {fmt(graph_ms)} ms, "
                                     f"bytes floor {floor_ms:.3f} ms"))
            RESULTS.append(dict(case="decode step lm_130m", shape=f"b{batch} {path}", ours_ms=lm_eager_ms,
                                graph_ms=lm_graph_ms, path=path,
                                note=f"eager {lm_eager_ms:.3f} ms, graph {fmt(lm_graph_ms)} ms"))
            print(f"  b{batch} {path}: 24 blocks eager {eager_ms:.3f} ms  graph {fmt(graph_ms)} ms  "
                  f"floor {floor_ms:.3f} ms (weights {weight_bytes / 2**20:.0f} MB, states "
                  f"{state_bytes / 2**20:.1f} MB r+w); lm_130m eager {lm_eager_ms:.3f} ms  "
                  f"graph {fmt(lm_graph_ms)} ms", flush=True)
        # the state-update op alone against mamba_ssm's
        from matmamba.ops.state_update.triton_impl import ssd_state_update_triton
        h, p, n = 64, 24, 128
        state = torch.randn(batch, h, p, n, device="cuda")
        x = torch.randn(batch, h, p, device="cuda", dtype=torch.bfloat16)
        dt = torch.randn(batch, h, device="cuda", dtype=torch.bfloat16)
        A = -torch.rand(h, device="cuda")
        B = torch.randn(batch, 1, n, device="cuda", dtype=torch.bfloat16)
        C = torch.randn(batch, 1, n, device="cuda", dtype=torch.bfloat16)
        Dk = torch.randn(h, device="cuda")
        bias = torch.randn(h, device="cuda")
        with torch.no_grad():
            ours = bench(lambda: ssd_state_update_triton(state, x, dt, A, B, C, D=Dk, dt_bias=bias,
                                                         dt_softplus=True), reps=50)
            base = None
            if mamba is not None:
                A_m = A[:, None, None].expand(h, p, n)
                dt_m = dt[:, :, None].expand(batch, h, p)
                D_m = Dk[:, None].expand(h, p)
                bias_m = bias[:, None].expand(h, p)
                base = bench(lambda: mamba["state_update"](state, x, dt_m, A_m, B, C, D=D_m,
                                                           dt_bias=bias_m, dt_softplus=True), reps=50)
        op_floor = 2 * state.numel() * 4 / bw * 1e3
        add("state_update op", f"b{batch} h{h} p{p} n{n}", ours, base, "mamba",
            f"state bytes floor {op_floor * 1e3:.1f} us", floor_ms=op_floor)
        del caches
        torch.cuda.empty_cache()


def case_ssd_variants(shapes):
    """Ours only: both state forms x chunk lengths, forward and forward+backward."""
    from matmamba.ops.ssd.triton_impl import ssd_scan_triton
    print("SSD variants (ours): state form x chunk", flush=True)
    for (b, l, h, p, n) in shapes:
        tensors = ssd_inputs(b, l, h, p, n)
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        dy = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16)
        for form in ("sequential", "parallel"):
            for Q in (64, 128):
                os.environ["MATMAMBA_SSD_STATE"] = form
                os.environ["MATMAMBA_SSD_CHUNK"] = str(Q)

                def fwd():
                    return ssd_scan_triton(*tensors[:5], D=tensors[5], dt_bias=tensors[6], dt_softplus=True)

                def fwdbwd():
                    ssd_scan_triton(*leaves[:5], D=leaves[5], dt_bias=leaves[6], dt_softplus=True).backward(dy)
                f_, fb = bench(fwd), bench(fwdbwd)
                add("ssd variant", f"b{b} l{l} h{h} p{p} n{n} {form[:3]} Q{Q}", fb, None, "",
                    f"fwd {f_['ms']:.3f} ms", form=form, chunk=Q, fwd_ms=f_["ms"])
        os.environ.pop("MATMAMBA_SSD_STATE", None)
        os.environ.pop("MATMAMBA_SSD_CHUNK", None)
        del tensors, leaves
        torch.cuda.empty_cache()


def case_pack(shapes, factors=(2, 4, 8, 16)):
    """Ours only: the SSD at short lengths with k batch rows packed into one row.

    A row of l tokens costs ceil(l/Q) full chunks (l=197: 4 chunks of 64, 23% of them padding).
    Packed, k rows of one batch are one row of k*l tokens (a free view of contiguous inputs)
    with segment ids that reset the state at each original row's start; the padding is then per
    k rows. Rows: k=1 as is; k=1 with all-zero ids (what the ids themselves cost); each k; and
    "auto" (the op's own choice, ``matmamba.ops.ssd.triton_impl.pack_factor``, where present;
    MATMAMBA_SSD_PACK=0 turns it off). Eager and CUDA-graphed forward + backward."""
    from matmamba.ops.ssd import triton_impl
    from matmamba.ops.ssd.triton_impl import ssd_scan_triton
    print("SSD packed rows (ours): k rows of one batch as one row, segment ids between", flush=True)
    for (b, l, h, p, n) in shapes:
        tensors = ssd_inputs(b, l, h, p, n)
        dy = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16)
        variants = [("k1", 1, None), ("k1 zero ids", 1, "zeros")]
        variants += [(f"k{k}", k, "pack") for k in factors if k > 1 and b % k == 0]
        Q = triton_impl._chunk_length()
        if hasattr(triton_impl, "pack_factor"):
            variants.append((f"auto (k{triton_impl.pack_factor(b, l, Q, h)})", 1, "auto"))
        base_ms = None
        for label, k, ids in variants:
            os.environ["MATMAMBA_SSD_PACK"] = "auto" if ids == "auto" else "0"
            rows, length = b // k, k * l
            leaves = [t.detach().clone().requires_grad_() for t in tensors]
            seq = None
            if ids == "zeros":
                seq = torch.zeros(rows, length, device="cuda", dtype=torch.int32)
            elif ids == "pack":
                seq = (torch.arange(length, device="cuda", dtype=torch.int32) // l).expand(rows, length)
            dy_k = dy.view(rows, length, h, p)

            def fwdbwd():  # (the views inside: every op of a captured step on its stream)
                views = [t.view(rows, length, *t.shape[2:]) if t.dim() >= 3 else t for t in leaves]
                ssd_scan_triton(*views[:5], D=views[5], dt_bias=views[6], dt_softplus=True,
                                seq_idx=seq).backward(dy_k)
            try:
                eager = bench(fwdbwd)
                graphed = bench(cuda_graphed(fwdbwd))
            except Exception as error:  # noqa: BLE001 - one variant failing loses its row only
                import traceback
                traceback.print_exc()
                add("ssd packed", f"b{b} l{l} h{h} {label}", note=f"failed: {type(error).__name__}: {error}"[:200])
                continue
            base_ms = base_ms or graphed["ms"]
            padded = rows * -(-length // Q) * Q
            add("ssd packed fwd+bwd, graphed", f"b{b} l{l} h{h} p{p} n{n} {label}", graphed,
                dict(ms=base_ms), "k1 graphed",
                f"eager {eager['ms']:.3f} ms; padded tokens {padded / (b * l) - 1:+.1%}",
                k=k, ids=ids, eager_ms=eager["ms"])
            del leaves
        os.environ.pop("MATMAMBA_SSD_PACK", None)
        del tensors
        torch.cuda.empty_cache()
    if not hasattr(triton_impl, "pack_factor"):
        return
    # the ViT block (fused path, in a CUDA graph) at each width: the scan's packing off, forced to
    # 8 and 16 rows a row, and the rule's choice
    block, _ = make_blocks(768, None)
    for width in (768, 384, 192, 96):
        times = {}
        for setting in ("0", "8", "16", "auto"):
            os.environ["MATMAMBA_SSD_PACK"] = setting
            ours, _, _ = block_step_fns(block, None, 64, 197, 768, width, fused=True, graphed=True)
            times[setting] = bench(ours)
        heads = block.expand * width // block.headdim
        add("block ViT, packing on vs off, graphed", f"D768 b64 l197 width {width}", times["auto"],
            times["0"], "packing off",
            f"rule k{triton_impl.pack_factor(64, 197, triton_impl._chunk_length(), heads)}; "
            f"k8 {times['8']['ms']:.3f} ms, k16 {times['16']['ms']:.3f} ms", width=width)
    os.environ.pop("MATMAMBA_SSD_PACK", None)
    del block
    torch.cuda.empty_cache()


def case_profile():
    """Per-kernel CUDA time of the SSD fwd+bwd and of the block fwd+bwd (ours)."""
    from bench_train import classify_kernel  # (scripts/: GEMM, ssd_scan, conv1d, ... by name)
    from torch.profiler import ProfilerActivity, profile

    from matmamba.ops.ssd.triton_impl import ssd_scan_triton
    tensors = ssd_inputs(8, 2048, 64, 24, 128)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    dy = torch.randn(8, 2048, 64, 24, device="cuda", dtype=torch.bfloat16)

    def ssd():
        ssd_scan_triton(*leaves[:5], D=leaves[5], dt_bias=leaves[6], dt_softplus=True).backward(dy)
    block, _ = make_blocks(768, None)
    ours, _, _ = block_step_fns(block, None, 8, 2048, 768, 768, fused=True)
    ours_small, _, _ = block_step_fns(block, None, 8, 2048, 768, 96, fused=True)
    ours_vit, _, _ = block_step_fns(block, None, 64, 197, 768, 768, fused=True)
    for name, fn in (("ssd b8 l2048 h64 p24 n128 fwd+bwd", ssd), ("fused block D768 b8 l2048 w768", ours),
                     ("fused block D768 b8 l2048 w96", ours_small), ("fused block ViT D768 b64 l197 w768", ours_vit)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        rows = []
        for evt in prof.key_averages():
            t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
            if t > 0:
                rows.append((t / 5 / 1e3, evt.count // 5, evt.key))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        print(f"  profile {name}: {total:.3f} ms of kernels per call", flush=True)
        for ms, count, key in rows[:22]:
            print(f"    {ms:8.3f} ms  x{count:<3} {key[:90]}", flush=True)
        META.setdefault("profiles", {})[name] = [(round(ms, 4), c, k[:120]) for ms, c, k in rows[:40]]
        kinds: dict[str, float] = {}
        for ms, _, key in rows:
            kind = classify_kernel(key)
            kinds[kind] = kinds.get(kind, 0.0) + ms
        kinds = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
        RESULTS.append(dict(case="profile", shape=name, ours_ms=total,
                            kinds={k: round(v, 4) for k, v in kinds.items()},
                            top=[(round(ms, 4), key[:90]) for ms, _, key in rows[:8]],
                            note="kernel ms per call by kind: " + ", ".join(
                                f"{k} {v:.3f}" for k, v in kinds.items())))


# ---------------------------------------------------------------------------------------------


def print_table():
    print("\n" + "=" * 132)
    print(f"{'case':<34} {'shape':<38} {'ours ms':>9} {'base ms':>9} {'speedup':>8} {'peak MB':>8}  note")
    print("-" * 132)
    for r in RESULTS:
        print(f"{r['case']:<34} {r.get('shape', ''):<38} {fmt(r.get('ours_ms')):>9} {fmt(r.get('base_ms')):>9} "
              f"{fmt(r.get('speedup'), 2):>8} {fmt(r.get('peak_mb'), 0):>8}  {r.get('note', '')[:60]}")
    print("-" * 132)
    print("meta:", json.dumps({k: v for k, v in META.items() if not isinstance(v, (dict, list))}, default=str))


# Issue 3's targets, read off this run's rows: (what, the rows' case, shape prefix, how to measure).
def _row(results, case, shape):
    return next((r for r in results if r.get("case") == case and r.get("shape", "").startswith(shape)
                 and r.get("ours_ms") is not None), None)


def targets(results) -> list[dict]:
    """Each of issue 3's targets that this run's rows can speak to: the target, what was measured,
    and "met" / "missed" / "not run" (its case absent, or no baseline in the run). Speed-ups are
    the baseline's time over ours, eager and CUDA-graphed where both ran."""
    out = []

    def speedup(what, floor, rows):
        got = [(label, r["speedup"]) for label, r in rows if r is not None and r.get("speedup")]
        if not got:
            out.append(dict(target=what, measured="-", status="not run"))
            return
        out.append(dict(target=what, measured=" / ".join(f"{v:.2f}x {label}" for label, v in got),
                        status="met" if all(v >= floor for _, v in got) else "missed"))

    ssd = "b8 l2048 h64 p24 n128"
    speedup("SSD fwd+bwd >= 4x mamba_ssm (b8 l2048 h64 p24 n128)", 4.0,
            [("eager", _row(results, "ssd fwd+bwd", ssd)),
             ("graphed", _row(results, "ssd fwd+bwd, CUDA graph", ssd))])
    out += _bound(results, "ssd fwd+bwd, CUDA graph", ssd, "ssd b8 l2048 h64 p24 n128 fwd+bwd", 4.0, "scan")
    speedup("SSD fwd faster than fla chunk_simple_gla", 1.0,
            [("faster", _row(results, "fla chunk_simple_gla fwd", ssd))])
    block = "D768 b8 l2048 width 768"
    speedup("block fwd+bwd >= 4x (D768 b8 l2048)", 4.0,
            [("eager", _row(results, "block D768 b8 l2048 [fused]", block)),
             ("graphed", _row(results, "block D768 b8 l2048 [graph]", block))])
    out += _bound(results, "block D768 b8 l2048 [graph]", block, "fused block D768 b8 l2048 w768", 4.0, "block")
    shares = []
    for variant in ("fused", "graph"):
        full = _row(results, f"block D768 b8 l2048 [{variant}]", "D768 b8 l2048 width 768")
        eighth = _row(results, f"block D768 b8 l2048 [{variant}]", "D768 b8 l2048 width 96")
        if full and eighth:
            shares.append((variant, eighth["ours_ms"] / full["ours_ms"]))
    # eagerly the narrow widths measure the host, so the GPU work (graphed) decides where it ran
    decisive = dict(shares).get("graph", dict(shares).get("fused"))
    out.append(dict(target="D/8 costs <= 35% of full width (D768 b8 l2048)",
                    measured=" / ".join(f"{v:.0%} {'graphed' if k == 'graph' else 'eager'}"
                                        for k, v in shares) or "-",
                    status="not run" if decisive is None else "met" if decisive <= 0.35 else "missed"))
    vit = "D768 b64 l197 width 768"
    speedup("ViT tokens >= 3x (D768 b64 l197)", 3.0,
            [("eager", _row(results, "block ViT tokens [fused]", vit)),
             ("graphed", _row(results, "block ViT tokens [graph]", vit))])
    out += _bound(results, "block ViT tokens [graph]", vit, "fused block ViT D768 b64 l197 w768", 3.0, "ViT block")
    lengths = next((r for r in results if r.get("worst_ratio") is not None), None)
    out.append(dict(target="time per token within 15% from l=1K to 64K",
                    measured=f"worst {lengths['worst_ratio']:.3f}x" if lengths else "-",
                    status="not run" if lengths is None
                    else "met" if lengths["worst_ratio"] <= 1.15 else "missed"))
    cold = next((r for r in results if r.get("case") == "cold start" and r.get("first_s")), None)
    out.append(dict(target="cold start < 20 s", measured=f"{cold['first_s']:.1f} s" if cold else "-",
                    status="not run" if cold is None else "met" if cold["first_s"] < 20 else "missed"))
    return out


def _bound(results, graphed_case, graphed_shape, profile_shape, factor, what) -> list[dict]:
    """Where a missed speed-up target stands against its parts: from this run's kernel profile
    (``--cases profile``) and the baseline's graphed time, the GPU time the target leaves and what
    takes it now. For a block: the GEMMs, the scan's kernels and the rest; for the scan alone: its
    two largest kernels and the rest. Nothing (an empty list) without both rows."""
    graphed = _row(results, graphed_case, graphed_shape)
    profile = next((r for r in results if r.get("case") == "profile"
                    and r.get("shape", "").startswith(profile_shape)), None)
    if not graphed or not graphed.get("base_ms") or not profile:
        return []
    budget = graphed["base_ms"] / factor
    total = sum(profile["kinds"].values())
    if what == "scan":
        (ms_a, name_a), (ms_b, name_b) = profile["top"][:2]
        named = {_kernel_name(name_a): ms_a, _kernel_name(name_b): ms_b}
        label = "its two largest kernels"
    else:
        named = {"GEMMs": profile["kinds"].get("gemm", 0.0), "scan": profile["kinds"].get("ssd_scan", 0.0)}
        label = "GEMMs + scan"
    parts = " + ".join(f"{name} {ms:.2f}" for name, ms in named.items())
    return [dict(target=f"  what a {factor:g}x {what} leaves (kernels of one call)",
                 measured=f"{budget:.2f} ms; now {parts} + rest {total - sum(named.values()):.2f}",
                 status=f"{label} alone {sum(named.values()) / budget:.0%} of it")]


def _kernel_name(key: str) -> str:
    """A profiler key's short name: ``_chunk_bwd_dx_kernel`` -> ``bwd_dx``."""
    return re.sub(r"^_?(chunk_)?|(_kernel)?$", "", key.split("(")[0].strip())


def print_targets(rows):
    print(f"\n{'issue 3 target':<56} {'measured':<34} status")
    for t in rows:
        print(f"{t['target']:<56} {t['measured']:<34} {t['status']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--cases", default="ceilings,ssd,block,profile,vit,cold,lengths,decode,ssd32,block1024",
                        help="comma list; also: variants, pack")
    parser.add_argument("--budget-s", type=float, default=1e9,
                        help="skip the remaining cases once this many seconds have passed")
    parser.add_argument("--chunks", default="64", help="SSD chunk lengths to time")
    parser.add_argument("--no-baseline", action="store_true", help="time ours only")
    args = parser.parse_args()
    import triton
    META.update(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    mamba, fla, reasons = (None, None, {"all": "--no-baseline"}) if args.no_baseline else import_baselines()
    META["baseline_import_errors"] = reasons
    print("meta:", META, flush=True)
    chunks = [int(c) for c in args.chunks.split(",")]
    cases = {
        "ceilings": measure_ceilings,
        "cold": case_cold_start,
        "ssd": lambda: case_ssd(mamba, fla, [(8, 2048, 64, 24, 128), (8, 2048, 8, 24, 128)], chunks),
        "ssd32": lambda: case_ssd(mamba, fla, [(8, 2048, 64, 32, 128)], chunks),
        "block": lambda: case_block(mamba, [(768, 8, 2048, (768, 384, 192, 96))], "D768 b8 l2048"),
        "vit": lambda: case_block(mamba, [(768, 64, 197, (768, 384, 192, 96))], "ViT tokens"),
        "block1024": lambda: case_block(mamba, [(1024, 8, 2048, (1024, 512, 256, 128))], "D1024 b8 l2048"),
        "lengths": lambda: case_lengths(mamba),
        "decode": lambda: case_decode(mamba),
        "variants": lambda: case_ssd_variants([(8, 2048, 64, 24, 128), (8, 2048, 8, 24, 128),
                                               (1, 65536, 64, 24, 128), (1, 65536, 8, 24, 128)]),
        "profile": case_profile,
        "pack": lambda: case_pack([(64, 197, 64, 24, 128), (16, 577, 64, 24, 128), (8, 2048, 64, 24, 128)],
                                  factors=(2, 4, 8, 16, 32, 64)),
    }
    t0 = time.time()
    for name in args.cases.split(","):
        if time.time() - t0 > args.budget_s:
            print(f"skipping {name}: time budget of {args.budget_s:.0f} s spent", flush=True)
            RESULTS.append(dict(case=name, note="skipped: time budget spent"))
            continue
        start = time.time()
        try:
            cases[name]()
        except Exception as error:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            RESULTS.append(dict(case=name, note=f"failed: {type(error).__name__}: {error}"[:300]))
        META.setdefault("case_seconds", {})[name] = round(time.time() - start, 1)
        save(args.json)
    META["total_s"] = round(time.time() - t0, 1)
    META["targets"] = targets(RESULTS)
    save(args.json)
    print_table()
    print_targets(META["targets"])


if __name__ == "__main__":
    main()
