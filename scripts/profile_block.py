#!/usr/bin/env python
"""Where a MatMamba2 block's forward + backward spends its time on the GPU: wall clock, GPU
kernel time, host (CPU) time, and the CUDA runtime calls that can serialise host and device.

    python scripts/profile_block.py --json /tmp/profile.json                  # this checkout
    python scripts/profile_block.py --repo .ab_old --json /tmp/profile_old.json   # another tree
    ncu ... python scripts/profile_block.py --widths 768 --plain-run 4            # for ncu / nsys

For each width: the median wall time of a forward + backward (CUDA events, after warm-up), then
one profiled stretch of ``--reps`` calls under ``torch.profiler`` giving, per call,

    gpu_ms       summed kernel time (what the GPU must do)
    host_ms      time the host thread takes to enqueue one call (10 calls back to back, no
                 profiler, synchronised only at the end; loop_ms: the same with that sync)
    launches     kernel launches (cudaLaunchKernel + cuLaunchKernel[Ex])
    syncs        cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize and
                 blocking cudaMemcpy (pageable host memory: these wait for the stream)
    mallocs      cudaMalloc / cudaFree (the caching allocator growing or emptying)

and the top kernels and top host ops. If wall ~ host_ms > gpu_ms the call is bound by the host
(Python, dispatch, launches); if wall ~ gpu_ms it is bound by the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=os.path.join(HERE, ".."), help="tree whose matmamba package is profiled")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--widths", default=None, help="comma-separated (default: D, D/2, D/4, D/8)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--variant", default=None,
                   choices=["core_dy_fp32", "norm_bwd_1x4x4", "conv_du16", "no_launch_cache"],
                   help="core_dy_fp32: the fused core's backward hands the scan dy in fp32; "
                        "norm_bwd_1x4x4: the gated norm's backward at its pre-session-11 launch, "
                        "1 row a program, 4 warps, 4 programs an SM (ROWSxwarpsxprograms, as in "
                        "bench_rmsnorm.py; the default is 2x4x8); conv_du16: the conv's "
                        "backward stores du in 16 bits (conv1d.triton_impl.DU_IN_INPUT_DTYPE); "
                        "no_launch_cache: every Triton launch through Triton's own path")
    p.add_argument("--plain-run", type=int, default=0, metavar="N",
                   help="only run N forward + backward calls at each width and exit: for an outside "
                        "profiler (ncu, nsys), which torch.profiler's own CUPTI use would disturb")
    p.add_argument("--json", default=None)
    return p.parse_args()


RUNTIME_GROUPS = {
    "launches": ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"),
    "syncs": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"),
    "mallocs": ("cudaMalloc", "cudaFree"),
}


def main():
    args = parse_args()
    sys.path.insert(0, os.path.abspath(args.repo))
    from matmamba import MatMamba2  # noqa: E402  (the chosen tree's package)
    import matmamba
    if args.variant == "core_dy_fp32":
        from matmamba.ops.triton_common import mixer
        mixer.SCAN_DY_IN_FP32 = True
    if args.variant == "norm_bwd_1x4x4":
        from matmamba.ops.rmsnorm import triton_impl as rmsnorm_triton
        rmsnorm_triton.LAUNCH_OVERRIDES["bwd"] = dict(ROWS=1, num_warps=4, programs_per_sm=4)
    if args.variant == "conv_du16":
        from matmamba.ops.conv1d import triton_impl as conv_triton
        conv_triton.DU_IN_INPUT_DTYPE = True
    if args.variant == "no_launch_cache":
        from matmamba.ops.triton_common import launch
        launch.ENABLED = False
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    D = args.d_model
    block = MatMamba2(d_model=D, d_state=128, layer_idx=0).cuda()
    widths = [int(w) for w in args.widths.split(",")] if args.widths else [D, D // 2, D // 4, D // 8]
    u = torch.randn(args.batch, args.seqlen, D, device="cuda")
    grad = torch.randn_like(u)

    def step(width):
        x = u.detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x, width=width)
        out.backward(grad)

    results = {"package": os.path.dirname(matmamba.__file__), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(), "variant": args.variant, "shape": [args.batch, args.seqlen, D], "widths": {}}
    if args.plain_run:
        for width in widths:
            for _ in range(args.plain_run):
                step(width)
            torch.cuda.synchronize()
            print(f"width {width}: ran {args.plain_run} forward + backward calls", flush=True)
        return
    for width in widths:
        for _ in range(5):
            step(width)
        torch.cuda.synchronize()
        times = []
        for _ in range(max(args.reps, 20)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(width)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        wall = statistics.median(times)
        # Host time without the profiler: the loop returns once everything is enqueued; if the
        # host is slower than the GPU, that is also about the end-to-end time.
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            step(width)
        host_plain = (time.perf_counter() - t0) * 1e3 / 10
        torch.cuda.synchronize()
        loop_ms = (time.perf_counter() - t0) * 1e3 / 10

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.reps):
                step(width)
            host_ms = (time.perf_counter() - t0) * 1e3 / args.reps   # before the final sync
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_us = sum(e.self_device_time_total for e in kernels) / args.reps
        counts = {group: sum(e.count for e in events if e.key in names) / args.reps
                  for group, names in RUNTIME_GROUPS.items()}
        top_kernels = sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]
        host_ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU
                    and not e.key.startswith("cuda") and not e.key.startswith("cu")]
        top_host = sorted(host_ops, key=lambda e: -e.self_cpu_time_total)[: args.top]
        row = {
            "wall_ms": wall, "gpu_ms": gpu_us / 1e3, "host_ms": host_plain, "loop_ms": loop_ms,
            "host_ms_profiled": host_ms,
            **{k: v for k, v in counts.items()},
            "top_kernels": [(e.key[:70], e.self_device_time_total / args.reps / 1e3, e.count / args.reps)
                            for e in top_kernels],
            "top_host_ops": [(e.key[:70], e.self_cpu_time_total / args.reps / 1e3, e.count / args.reps)
                             for e in top_host],
        }
        results["widths"][width] = row
        print(f"width {width:>5}: wall {wall:.3f} ms  loop {loop_ms:.3f} ms  gpu {row['gpu_ms']:.3f} ms  "
              f"host {host_plain:.3f} ms (profiled {host_ms:.3f})  launches {counts['launches']:.0f}  syncs {counts['syncs']:.1f}  "
              f"mallocs {counts['mallocs']:.1f}", flush=True)
        for name, ms, n in row["top_kernels"]:
            print(f"    gpu  {ms:7.3f} ms  x{n:<4.0f} {name}")
        for name, ms, n in row["top_host_ops"][:8]:
            print(f"    host {ms:7.3f} ms  x{n:<4.0f} {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
