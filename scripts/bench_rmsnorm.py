#!/usr/bin/env python
"""The gated RMSNorm's forward and backward on the GPU as the block calls them (z read out of the
in_proj output through its column map; D768 b8 l2048: 16384 rows of 1536), under launch variants
ROWSxnum_warpsxprograms_per_sm (a trailing "r": the backward's two-phase body, RECOMPUTE=1),
each checked against the default's outputs on NaN-poisoned buffers, then timed without the
poisoning (GPU time: rounds queued behind torch.cuda._sleep, medians).

    python scripts/bench_rmsnorm.py --variants 1x4x4,2x4x4,2x8x4,4x8x4,1x4x8 --json /tmp/rms.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from matmamba.ops.rmsnorm import triton_impl as ri  # noqa: E402
from matmamba.ops.triton_common import mixer  # noqa: E402


def gpu_ms(fn, reps=20, rounds=9):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(4e6))
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="1x4x4,2x4x4,2x8x4,4x8x4,1x4x8,2x4x8")
    p.add_argument("--shapes", default="8x2048,64x197")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_rmsnorm.py needs a CUDA GPU")
    nheads, headdim, gn = 64, 24, 128
    cols = 2 * gn + nheads + 2 * nheads * headdim
    dim = nheads * headdim
    _, z_cols = mixer._column_maps(torch.device("cuda"), gn, nheads, headdim, nheads)
    vec = mixer._map_vector_width(gn, nheads, headdim, cols)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shapes={})
    for shape in args.shapes.split(","):
        b, l = (int(v) for v in shape.split("x"))
        rows = b * l
        y = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)
        z = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        w = 1 + 0.1 * torch.randn(dim, device="cuda")
        dout = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)

        def fwd():
            return ri.rmsnorm_forward(y, z, w, 1e-5, False, dim, z_cols, zmap_vec=vec)

        dz = torch.empty_like(z)

        def bwd(rstd):
            dx, _, dw = ri.rmsnorm_backward(dout, y, z, w, rstd, False, dim, z_cols, dz_out=dz,
                                            zmap_vec=vec)
            return dx, dw

        def checked_bwd(rstd):  # dz poisoned first: a column the kernel misses stays NaN
            dz.fill_(float("nan"))
            dx, dw = bwd(rstd)
            return dx, dz[:, z_cols.long()], dw

        ri.LAUNCH_OVERRIDES.clear()
        ref_out, ref_rstd = fwd()
        ref_grads = checked_bwd(ref_rstd)
        rows_out = []
        for variant in args.variants.split(","):
            recompute = variant.endswith("r")
            r, warps, pps = (int(v) for v in variant.rstrip("r").split("x"))
            ri.LAUNCH_OVERRIDES.clear()
            tile = dict(ROWS=r, num_warps=warps, programs_per_sm=pps)
            ri.LAUNCH_OVERRIDES.update(fwd=tile, bwd=dict(tile, RECOMPUTE=int(recompute)))
            out, rstd = fwd()
            grads = checked_bwd(rstd)
            errs = [((a.double() - c.double()).norm() / c.double().norm()).item()
                    for a, c in zip((out, rstd, *grads), (ref_out, ref_rstd, *ref_grads))]
            ok = all(e < 1e-2 for e in errs) and all(bool(t.isfinite().all()) for t in grads)
            f_ms = gpu_ms(fwd)
            b_ms = gpu_ms(lambda: bwd(ref_rstd))
            rows_out.append(dict(variant=variant, fwd_ms=f_ms, bwd_ms=b_ms, errors=errs, ok=ok))
            print(f"{shape} rows {rows} x {dim}: {variant:8s} fwd {f_ms:.4f} ms  bwd {b_ms:.4f} ms"
                  f"  {'ok' if ok else 'MISMATCH ' + str(errs)}", flush=True)
        result["shapes"][shape] = rows_out
    ri.LAUNCH_OVERRIDES.clear()
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
