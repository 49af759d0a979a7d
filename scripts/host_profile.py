#!/usr/bin/env python
"""Where the host's time goes in an eager SSD forward + backward (GPU machine).

An eager call is timed from an idle GPU (as bench_block does): when enqueueing the work takes
the host longer than the GPU takes to run it, the wall clock measures the host. This script
separates the two and says what the host spends its time on:

1. per-launch host cost (µs) of: an empty Triton kernel, one of the scan's kernels through
   ``JITFunction.__getitem__`` (Triton's binder and cache lookup, then the launch), the same
   compiled kernel launched directly (``CompiledKernel.run``), the same through our launch
   cache (``matmamba.ops.triton_common.launch``, a hit), ``torch.empty`` and a small torch
   reduction on CUDA;
2. per shape, for ours and mamba_ssm: the wall time from idle, the host time to enqueue one
   forward + backward (the GPU kept busy behind ``torch.cuda._sleep`` so the host never waits),
   the GPU time alone (the call captured in a CUDA graph and replayed), and the launches per call;
   for ours also the wall and host times with the launch cache off (``*_cache_off``);
3. a cProfile of our calls (top functions by own time) in the JSON and the log.

    python scripts/host_profile.py --json /tmp/host.json
    python scripts/host_profile.py --shapes 8,2048,64,24,128 --no-mamba
    python scripts/host_profile.py --shapes 8,2048,8,24,128 --blocks "768,8,2048,96;768,8,2048,768"
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_block import bench, cuda_graphed, import_baselines, ssd_inputs  # noqa: E402

SLEEP_CYCLES = int(2e8)  # ~100 ms of GPU time at H200 clocks: longer than any enqueue measured


@triton.jit
def _empty_kernel(ptr):
    pass


def host_us(fn, calls: int) -> float:
    """Median over 3 rounds of the host's µs per ``fn()``, the GPU kept busy so it never blocks.
    Keep calls x launches per call under the launch queue's depth (about 1000 pending launches):
    past it the host waits for the sleeping GPU (session 8's first run timed 2000 small launches
    and read ~55 µs each, the sleep divided by the calls)."""
    rounds = []
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(rounds)


def wall_ms(fn) -> float:
    """Median ms per call from an idle GPU: bench_block's timing (CUDA events, synchronised)."""
    return bench(fn, reps=30)["ms"]


def without_launch_cache(measure):
    """measure() with the launch cache off (every launch through Triton's own path)."""
    from matmamba.ops.triton_common import launch as launch_mod
    launch_mod.ENABLED = False
    try:
        return measure()
    finally:
        launch_mod.ENABLED = True


def cache_off_times(fn) -> dict:
    return dict(wall_ms_cache_off=without_launch_cache(lambda: wall_ms(fn)),
                host_ms_cache_off=without_launch_cache(lambda: host_us(fn, 10) / 1e3))


def launches_per_call(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    counts = {"kernels": 0, "triton": 0}
    names: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            counts["kernels"] += 1
            names[event.name[:90]] = names.get(event.name[:90], 0) + 1
        elif event.name in ("cuLaunchKernel", "cuLaunchKernelEx"):
            counts["triton"] += 1
    counts["kernel_names"] = dict(sorted(names.items(), key=lambda kv: -kv[1]))
    return counts


def launch_costs(shape) -> dict:
    from matmamba.ops.ssd import triton_impl as ti
    b, l, h, p, n = shape
    x, dt, A, B, C, D, dt_bias = ssd_inputs(b, l, h, p, n)
    buf = torch.empty(1, device="cuda")
    out = {}
    _empty_kernel[(1,)](buf)
    out["empty_triton_kernel"] = host_us(lambda: _empty_kernel[(1,)](buf), 500)

    Q = 64
    nchunks = triton.cdiv(l, Q)
    CB = torch.empty(b, nchunks, 1, Q, Q, device="cuda")
    dot_dtype, dot_prec = ti._dot_config(x.dtype)
    grid = (b, nchunks)
    args = (C, B, C, CB, l, 1, n, *C.stride(), *B.stride(), 0, 0)  # (no seq_idx: C stands in)
    consts = dict(Q=Q, HAS_SEQ=False, DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec, BLOCK_N=128, num_warps=4)
    compiled = ti._cb_kernel[grid](*args, **consts)
    out["cb_kernel_jit_launch"] = host_us(lambda: ti._cb_kernel[grid](*args, **consts), 500)
    # the same compiled kernel, skipping Triton's binder and cache lookup: the launcher takes
    # every parameter in order, constexprs included
    stream = torch.cuda.current_stream().cuda_stream
    by_name = dict(zip((param.name for param in ti._cb_kernel.params), args), Q=Q, BLOCK_N=128,
                   HAS_SEQ=False, DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec)
    kernel_args = [by_name[param.name] for param in ti._cb_kernel.params]
    run, function, meta = compiled.run, compiled.function, compiled.packed_metadata

    def direct():
        run(grid[0], grid[1], 1, stream, function, meta, None, None, None, *kernel_args)
    try:
        direct()
        torch.cuda.synchronize()
        out["cb_kernel_direct_run"] = host_us(direct, 500)
    except Exception as error:  # noqa: BLE001 - the launcher's calling convention differs
        out["cb_kernel_direct_run"] = f"failed: {type(error).__name__}: {error}"[:200]
    from matmamba.ops.triton_common.launch import launch
    launch(ti._cb_kernel, grid, *args, **consts)
    out["cb_kernel_launch_cache"] = host_us(lambda: launch(ti._cb_kernel, grid, *args, **consts), 500)
    out["torch_empty_cuda"] = host_us(lambda: torch.empty(b, l, h, p, device="cuda"), 2000)
    small = torch.randn(b, h, nchunks, device="cuda")
    out["torch_sum_small"] = host_us(lambda: small.sum((0, 2)), 500)
    out["torch_to_dtype_small"] = host_us(lambda: small.to(torch.bfloat16), 500)
    return out


def profile_top(fn, calls: int = 20, top: int = 30) -> str:
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def shape_report(shape, mamba, results: dict, want_profile: bool):
    from matmamba.ops.ssd.triton_impl import ssd_scan_triton
    b, l, h, p, n = shape
    tensors = ssd_inputs(b, l, h, p, n)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    dy = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16)

    def ours():
        y = ssd_scan_triton(*leaves[:5], D=leaves[5], dt_bias=leaves[6], dt_softplus=True)
        y.backward(dy)

    def theirs():
        y = mamba["scan"](*leaves[:5], chunk_size=256, D=leaves[5], dt_bias=leaves[6],
                          dt_softplus=True)
        y.backward(dy)

    sides = [("ours", ours)] + ([("mamba", theirs)] if mamba is not None else [])
    label = f"b{b} l{l} h{h} p{p} n{n}"
    row = {}
    for name, fn in sides:
        fn()
        torch.cuda.synchronize()
        entry = dict(wall_ms=wall_ms(fn), host_ms=host_us(fn, 10) / 1e3)
        try:
            entry["gpu_ms"] = wall_ms(cuda_graphed(fn))
        except Exception as error:  # noqa: BLE001
            entry["gpu_ms"] = None
            entry["graph_error"] = f"{type(error).__name__}: {error}"[:200]
        entry.update(launches_per_call(fn))
        if name == "ours":
            entry.update(cache_off_times(fn))
        row[name] = entry
        print(f"  {label:<28} {name:<6} wall {entry['wall_ms']:.3f} ms  host {entry['host_ms']:.3f} ms  "
              f"gpu {entry['gpu_ms'] if entry['gpu_ms'] is None else round(entry['gpu_ms'], 3)} ms  "
              f"kernels {entry['kernels']} (triton {entry['triton']})"
              + (f"  | launch cache off: wall {entry['wall_ms_cache_off']:.3f} host "
                 f"{entry['host_ms_cache_off']:.3f}" if name == "ours" else ""), flush=True)
    if want_profile:
        row["ours_profile"] = profile_top(ours)
        print(row["ours_profile"], flush=True)
    results[label] = row


def block_report(config, results: dict):
    """The nested block's eager forward + backward (bf16 autocast, through MatMamba2.forward) at
    one width: wall, host, GPU (graphed), launches, and a cProfile of the host's part."""
    from bench_block import block_step_fns, make_blocks
    D, b, l, width = config
    block, _ = make_blocks(D, None)
    ours, _, _ = block_step_fns(block, None, b, l, D, width)
    graphed, _, _ = block_step_fns(block, None, b, l, D, width, graphed=True)
    ours()
    torch.cuda.synchronize()
    entry = dict(wall_ms=wall_ms(ours), host_ms=host_us(ours, 10) / 1e3, gpu_ms=wall_ms(graphed))
    entry.update(launches_per_call(ours))
    entry.update(cache_off_times(ours))
    label = f"block D{D} b{b} l{l} width {width}"
    print(f"  {label:<28} wall {entry['wall_ms']:.3f} ms  host {entry['host_ms']:.3f} ms  "
          f"gpu {entry['gpu_ms']:.3f} ms  kernels {entry['kernels']} (triton {entry['triton']})  "
          f"| launch cache off: wall {entry['wall_ms_cache_off']:.3f} host "
          f"{entry['host_ms_cache_off']:.3f}", flush=True)
    for name, count in entry["kernel_names"].items():
        print(f"    {count:>3} x {name}", flush=True)
    # stay under the launch queue's depth (~1000 pending launches), or the host blocks in
    # whichever call finds it full and the profile blames that call
    entry["profile"] = profile_top(ours, calls=max(1, 800 // max(entry["kernels"], 1)), top=45)
    print(entry["profile"], flush=True)
    results[label] = entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8,2048,64,24,128;8,2048,8,24,128",
                        help="';'-separated b,l,h,p,n")
    parser.add_argument("--blocks", default="",
                        help="';'-separated D,b,l,width: the block's eager step profiled as well")
    parser.add_argument("--no-mamba", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_profile.py needs a CUDA GPU")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    for s in shapes:
        if len(s) != 5:
            sys.exit(f"--shapes: each shape is b,l,h,p,n; got {s}")
    mamba = None if args.no_mamba else import_baselines()[0]
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, cpu=os.cpu_count())
    print("per-launch host cost (µs)", flush=True)
    report["launch_us"] = launch_costs(shapes[0])
    for key, value in report["launch_us"].items():
        print(f"  {key:<26} {value if isinstance(value, str) else round(value, 1)}", flush=True)
    print("eager SSD forward + backward", flush=True)
    report["shapes"] = {}
    for shape in shapes:
        shape_report(shape, mamba, report["shapes"], want_profile=True)
    blocks = [tuple(int(v) for v in s.split(",")) for s in args.blocks.split(";") if s]
    if blocks:
        print("eager block forward + backward (bf16 autocast)", flush=True)
        report["blocks"] = {}
        for config in blocks:
            block_report(config, report["blocks"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
