#!/usr/bin/env python
"""All-reduce bandwidth between the GPUs of this host, and the transport NCCL picked.

    python -m torch.distributed.run --nproc_per_node 2 scripts/allreduce_probe.py --json /tmp/ar.json
    python scripts/bench_multigpu.py --cases allreduce ...     # the same, as a bench_multigpu case

What a DDP step pays for its gradients: one all-reduce of every gradient per optimizer step
(fp32, 4 bytes per parameter; lm_130m's ~130M parameters make about 0.5 GB). Each size is timed
with CUDA events (median of ``--iters`` after warm-up), and reported as

    algbw = bytes / time          busbw = algbw * 2 (n - 1) / n   (nccl-tests' convention: the
                                                                   link rate a ring achieves)

NCCL_DEBUG=INFO is set so rank 0's log names the transport of each channel ("via P2P/CUMEM",
"via P2P/IPC", "via SHM/direct/direct", "via NET/Socket"); ``--nccl-log`` is where the launcher
wrote stderr, and the lines that name a transport are copied into the JSON. On the CPU (gloo) the
same code runs with wall-clock timing, for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import torch
import torch.distributed as dist

# How NCCL names a channel's transport in its INFO log, e.g. "Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM"
TRANSPORT = re.compile(r"via (P2P/\S+|SHM/\S+|NET/\S+|CollNet\S*|NVLS\S*)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", default="1,16,128,512", help="message sizes in MiB, comma-separated")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", default=None, help="rank 0 writes the results here")
    p.add_argument("--nccl-log", default=None, help="file holding rank 0's stderr (NCCL's INFO lines)")
    return p.parse_args(argv)


def transports(log_path: str | None) -> dict[str, int]:
    """Count of channels per transport named in an NCCL INFO log."""
    counts: dict[str, int] = {}
    if not log_path or not os.path.exists(log_path):
        return counts
    with open(log_path, errors="replace") as f:
        for line in f:
            m = TRANSPORT.search(line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def time_all_reduce(tensor: torch.Tensor, iters: int, warmup: int) -> float:
    """Median seconds of one all-reduce of ``tensor``."""
    cuda = tensor.is_cuda
    for _ in range(warmup):
        dist.all_reduce(tensor)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_reduce(tensor)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device("cuda") if cuda else torch.device("cpu")
    rows = []
    for mb in (float(s) for s in args.sizes_mb.split(",")):
        numel = int(mb * 2**20) // torch.tensor([], dtype=dtype).element_size()
        tensor = torch.ones(numel, dtype=dtype, device=device)
        seconds = time_all_reduce(tensor, args.iters, args.warmup)
        ok = bool((tensor[:16].float() == float(world ** (args.warmup + args.iters))).all()) \
            if dtype == torch.float32 and world ** (args.warmup + args.iters) < 2**24 else None
        nbytes = numel * tensor.element_size()
        algbw = nbytes / seconds / 1e9
        rows.append(dict(size_mb=mb, bytes=nbytes, ms=seconds * 1e3, algbw_gbs=algbw,
                         busbw_gbs=algbw * 2 * (world - 1) / world, sum_ok=ok))
        if rank == 0:
            print(f"all_reduce {mb:8.1f} MiB {args.dtype}: {seconds * 1e3:8.3f} ms  algbw "
                  f"{algbw:7.1f} GB/s  busbw {rows[-1]['busbw_gbs']:7.1f} GB/s", flush=True)
        del tensor
    dist.barrier()
    report = dict(world_size=world, backend=dist.get_backend(), dtype=args.dtype, rows=rows,
                  device=torch.cuda.get_device_name() if cuda else "cpu",
                  nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None)
    if rank == 0:
        report["transports"] = transports(args.nccl_log)
        if report["transports"]:
            print("NCCL transports (channels):", report["transports"], flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    dist.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
