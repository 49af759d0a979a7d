#!/usr/bin/env python
"""The causal conv1d + SiLU's four launches (forward, backward pass 1 "bwd_du", pass 2
"bwd_dx", the sums of pass 1's weight-gradient partials "wgrad") on the GPU as the block calls
them (channels read out of the in_proj output through the column map, the input gradient written
back into its columns; D768: 1792 channels of 3392 columns), under launch variants
BLOCK_LxBLOCK_Dxnum_warps (for "wgrad" BLOCK_L is its rows of partials a step, BLOCK_R). Each
variant of each launch is checked against the defaults' outputs (y, dx, dweight, dbias) on
NaN-poisoned buffers, then timed alone (GPU time: rounds queued behind torch.cuda._sleep,
medians; the other launches of the backward at their defaults, so a pass's row is the whole
backward with that pass varied; the "default" row is the backward at the defaults).

    python scripts/bench_conv.py --variants 64x128x4,64x128x8,32x128x4 --json /tmp/conv.json
    python scripts/bench_conv.py --variants 32x128x4x2,32x128x4x4     # pass 2 walking 2 / 4 tiles
    python scripts/bench_conv.py --variants "" --du-dtype both     # du in fp32 vs 16 bits, defaults
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rmsnorm import gpu_ms  # noqa: E402
from matmamba.ops.conv1d import triton_impl as ci  # noqa: E402
from matmamba.ops.triton_common import mixer  # noqa: E402

KINDS = ("fwd", "bwd_du", "bwd_dx", "wgrad")


def launch_options(kind: str, tile: dict) -> dict | None:
    """A variant's options for one launch kind ("wgrad" names its row step BLOCK_R); None where
    the variant does not apply (STEPS, tiles a program, is pass 2's alone)."""
    if "STEPS" in tile and kind != "bwd_dx":
        return None
    if kind != "wgrad":
        return tile
    return dict(BLOCK_R=tile["BLOCK_L"], BLOCK_D=tile["BLOCK_D"], num_warps=tile["num_warps"])


def parse_variant(text: str) -> dict:
    try:
        values = [int(v) for v in text.split("x")]
        if len(values) not in (3, 4):
            raise ValueError
    except ValueError:
        raise SystemExit("--variants: expected BLOCK_LxBLOCK_Dxnum_warps like 64x128x8, or with "
                         f"pass 2's STEPS (tiles a program) appended like 32x128x4x2, got {text!r}")
    tile = dict(BLOCK_L=values[0], BLOCK_D=values[1], num_warps=values[2])
    if len(values) == 4:
        tile["STEPS"] = values[3]
    return tile


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="64x128x4,64x128x8,32x128x4,32x128x8,64x64x4,128x128x8")
    p.add_argument("--shapes", default="8x2048,64x197", help="batch x length, comma-separated")
    p.add_argument("--du-dtype", default="fp32", choices=("fp32", "input", "both"),
                   help="how pass 1 stores du (triton_impl.DU_IN_INPUT_DTYPE); both: every "
                        "variant timed both ways, checked against the fp32 defaults")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_conv.py needs a CUDA GPU")
    variants = [(v, parse_variant(v)) for v in args.variants.split(",") if v]
    du_settings = {"fp32": [False], "input": [True], "both": [False, True]}[args.du_dtype]
    nheads, headdim, gn, width = 64, 24, 128, 4
    cols = 2 * gn + nheads + 2 * nheads * headdim
    dim = 2 * gn + nheads * headdim
    conv_cols, _ = mixer._column_maps(torch.device("cuda"), gn, nheads, headdim, nheads)
    vec = mixer._map_vector_width(gn, nheads, headdim, cols)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  defaults=ci.LAUNCH_DEFAULTS, shapes={})
    for shape in args.shapes.split(","):
        b, l = (int(v) for v in shape.split("x"))
        zx = torch.randn(b, l, cols, device="cuda", dtype=torch.bfloat16)
        weight = 0.3 * torch.randn(dim, width, device="cuda")
        bias = 0.1 * torch.randn(dim, device="cuda")
        dy = torch.randn(b, l, dim, device="cuda", dtype=torch.bfloat16)
        dx_out = torch.empty_like(zx)

        def fwd():
            return ci.conv_forward(zx, weight, bias, None, None, True, conv_cols, colmap_vec=vec)

        def bwd():
            _, dw, db, _ = ci.conv_backward(dy, zx, weight, bias, None, None, True, conv_cols,
                                            dx_out=dx_out, colmap_vec=vec)
            return dw, db

        def checked():  # every output of a variant, its buffers poisoned first
            dx_out.fill_(float("nan"))
            y = fwd()
            dw, db = bwd()
            return y, dx_out[..., conv_cols.long()].clone(), dw, db

        ci.LAUNCH_OVERRIDES.clear()
        ci.DU_IN_INPUT_DTYPE = False
        reference = checked()
        rows = []
        for du16 in du_settings:
            ci.DU_IN_INPUT_DTYPE = du16
            suffix = "/du16" if du16 else ""
            # the defaults first (with du16: what storing du in 16 bits alone changes)
            for name, kind, tile in ([("default", "bwd", None)]
                                     + [(n, k, t) for n, t in variants for k in KINDS
                                        if launch_options(k, t) is not None]):
                ci.LAUNCH_OVERRIDES.clear()
                if tile is not None:
                    ci.LAUNCH_OVERRIDES[kind] = launch_options(kind, tile)
                got = checked()
                errs = [((a.double() - r.double()).norm() / r.double().norm()).item()
                        for a, r in zip(got, reference)]
                ok = all(e < 1e-2 for e in errs) and all(bool(t.isfinite().all()) for t in got)
                ms = gpu_ms(fwd if kind == "fwd" else bwd)
                rows.append(dict(kind=kind, variant=name + suffix, ms=ms, errors=errs, ok=ok))
                print(f"{shape:>8s} {kind:6s} {name + suffix:15s} {ms:.4f} ms  "
                      f"{'ok' if ok else 'MISMATCH'} errors y/dx/dw/db "
                      + " ".join(f"{e:.1e}" for e in errs), flush=True)
        ci.LAUNCH_OVERRIDES.clear()
        ci.DU_IN_INPUT_DTYPE = False
        best = {}
        for kind in ("bwd",) + KINDS:
            good = [r for r in rows if r["kind"] == kind and r["ok"]]
            if good:
                best[kind] = min(good, key=lambda r: r["ms"])
                row = best[kind]
                print(f"{shape:>8s} {kind:6s} best {row['variant']} {row['ms']:.4f} ms", flush=True)
        result["shapes"][shape] = dict(rows=rows, best=best)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
