#!/usr/bin/env python
"""Registers, spills and shared memory of the SSD scan's Triton kernels, compiled for Hopper
(sm_90a) on any machine, no GPU needed: Triton compiles to a cubin with its bundled ptxas and
cuobjdump reads the resource use. Occupancy follows from the registers: an H100/H200 SM has
65,536 of them, so a 4-warp program at 255 registers a thread leaves room for 2 programs an SM,
at 168 for 3, at 128 for 4.

    python scripts/kernel_regs.py                                  # the backward kernels, p = 24 and 64
    python scripts/kernel_regs.py --kernels bwd_dx --headdims 24 --warps 4,8
    python scripts/kernel_regs.py --kernels rmsnorm_bwd,conv_bwd_du --const ROWS=2   # the conv / norm
    PYTHONPATH=/tmp/triton36 python scripts/kernel_regs.py         # another Triton, e.g. the GPU machine's

The compiled options are the scan's own defaults (``triton_impl._bwd_dx_options`` and its
neighbours, the register cap of B3 and B4 included), unless --warps / --stages / --block-n /
--maxnreg say otherwise. bf16 operands, as under autocast.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from matmamba.ops.ssd import triton_impl as ti  # noqa: E402

# Pointer arguments that hold the input dtype (bf16 here); every other pointer is fp32. The
# stored states (H0, G) take the input dtype, as _ssd_forward allocates them.
LOW_PRECISION_PTRS = {"x_ptr", "dt_ptr", "B_ptr", "C_ptr", "dy_ptr", "H0_ptr", "G_ptr", "dx_ptr",
                      "ddt_ptr", "V_ptr", "states_ptr",
                      # the conv's and the gated norm's activations and their gradients
                      "z_ptr", "dout_ptr", "dz_ptr", "out_ptr", "y_ptr", "du_ptr"}
INT32_PTRS = {"seq_ptr", "colmap_ptr", "zmap_ptr", "seg_ptr"}  # segment ids, column maps
FLOAT_SCALARS = {"dt_lo", "dt_hi"}
# The integer arguments' values in the D=768 block's layout at b8 l2048 (64 heads of 24, N 128, one
# group; x, B, C are column views of the conv output (1792 columns), dt of the in_proj output
# (3392), dy contiguous from the norm). Triton's launcher specializes on them: a 1 becomes a
# constant and a multiple of 16 is marked divisible by 16 (pointers are 16-byte aligned), which is
# what lets loads and stores vectorize; compiling without that (every int a plain i32) gives
# scalar 16-bit loads and stores the real launch does not have. Names not listed: divisible by 16.
_L, _CONV, _ZX, _Y = 2048, 1792, 3392, 1536
BLOCK_CASE_INTS = {
    "seqlen": _L, "nheads": 64, "heads_per_group": 64, "ngroups": 1, "headdim": 24, "dstate": 128,
    "padded_len": _L, "heads_per_split": 22,
    **{f"s_{t}b": _L * _CONV for t in ("x", "dx", "b", "c", "v")},
    **{f"s_{t}l": _CONV for t in ("x", "dx", "b", "c", "v")},
    "s_xh": 24, "s_dxh": 24, "s_bg": 128, "s_cg": 128, "s_vg": 128,
    "s_dtb": _L * _ZX, "s_dtl": _ZX, "s_ddtb": _L * _ZX, "s_ddtl": _ZX, "s_dth": 1, "s_ddth": 1,
    "s_dyb": _L * _Y, "s_dyl": _Y, "s_dyh": 24, "s_yb": _L * _Y, "s_yl": _Y, "s_yh": 24,
    **{f"s_{t}": 1 for t in ("xp", "dxp", "dyp", "yp", "bn", "cn", "vn")},
    # segment ids (--const HAS_SEQ=1) as the packed scan passes them: one row shared by stride 0
    "s_seqb": 0, "s_seql": 1,
    # the conv (channels by stride 1, weight (d, w)) and the norm (rows of 1536, z in rows of 3392)
    "s_xd": 1, "s_dyd": 1, "s_yd": 1, "s_dxd": 1, "s_wk": 1, "s_wd": 4,
    "s_dub": _L * _CONV, "s_dul": _CONV, "s_dud": 1,  # the conv's du (pass 1 -> pass 2)
    "s_xr": _Y, "s_dor": _Y, "s_dxr": _Y, "s_or": _Y, "s_zr": _ZX, "s_dzr": _ZX,
}


def row_kernel_table():
    """name -> (kernel, constexprs, launch options) for the conv's and the gated norm's kernels as
    the block launches them at D768 (1792 conv channels and 1536 norm channels read through the
    column maps, 16-byte runs): their tiles are independent of the head dim."""
    from matmamba.ops.conv1d import triton_impl as conv
    from matmamba.ops.rmsnorm import triton_impl as norm

    conv_flags = dict(WIDTH=4, HAS_BIAS=True, HAS_INIT=False, HAS_SEQ=False, SILU=True,
                      HAS_COLMAP=True, VEC=8)
    table = {}
    for kind, fn in (("fwd", conv._conv_fwd_kernel), ("bwd_du", conv._conv_bwd_du_kernel),
                     ("bwd_dx", conv._conv_bwd_dx_kernel)):
        opts = dict(conv._options(kind, 1792))
        warps = opts.pop("num_warps")  # the rest are the tile's constexprs (BLOCK_L, BLOCK_D, ...)
        flags = {k: v for k, v in conv_flags.items() if k in {p.name for p in fn.params}}
        table[f"conv_{kind}"] = (fn, dict(flags, **opts), dict(num_warps=warps))
    for kind, fn in (("fwd", norm._rmsnorm_fwd_kernel), ("bwd", norm._rmsnorm_bwd_kernel)):
        opts = norm._tile(2048, kind)
        flags = dict(BLOCK=2048, HAS_Z=True, NORM_BEFORE_GATE=False, HAS_ZMAP=True, VEC=8,
                     ROWS=opts["ROWS"])
        if kind == "bwd":
            flags["RECOMPUTE"] = bool(opts["RECOMPUTE"])
        table[f"rmsnorm_{kind}"] = (fn, flags, dict(num_warps=opts["num_warps"]))
    return table


def kernel_table(Q: int, block_p: int, block_n_full: int):
    """name -> (kernel, constexprs, default launch options), as the scan launches them (bf16;
    B4 with several heads a program, as at the models' head counts)."""
    common = dict(Q=Q, BLOCK_P=block_p, HAS_SEQ=False, DOT_DTYPE=tl.bfloat16, DOT_PREC="tf32")
    bf16 = tl.bfloat16
    return {
        "bwd_dx": (ti._chunk_bwd_dx_kernel,
                   dict(common, HAS_BIAS=True, SOFTPLUS=True, HAS_D=True, D_PER_CHANNEL=False),
                   ti._bwd_dx_options(Q, block_p, block_n_full, bf16)),
        "bwd_dbdc_flat": (ti._chunk_bwd_dbdc_flat_kernel,
                          dict(common, SPAN_LIMIT=ti._FLAT_SPAN_LIMIT, EMULATE_BF16=False),
                          ti._bwd_dbdc_flat_options(Q, block_p, block_n_full, bf16, 64)),
        "bwd_dbdc": (ti._chunk_bwd_dbdc_kernel, common,
                     ti._bwd_dbdc_options(Q, block_p, ti._bwd_dbdc_block_n(Q, block_n_full), bf16,
                                          several=True)),
        # K1 (B1 is the same kernel with TO_END=0) and the sequential form's walk, at the
        # block's 64 heads of the head dim (BLOCK_M rows of the flat (head, p) index)
        "chunk_states": (ti._chunk_states_kernel,
                         dict(common, TO_END=True, HEADS_PACKED=True),
                         ti._chunk_states_options(64 * block_p, block_n_full)),
        "state_walk": (ti._state_walk_kernel,
                       dict(common, REVERSE=False, HAS_START=False, HEADS_PACKED=True, SUMMARY=False),
                       ti._state_walk_options(64 * block_p, block_n_full)),
        "chunk_out_fwd": (ti._chunk_out_fwd_kernel, dict(common, HAS_D=True, D_PER_CHANNEL=False),
                          ti._chunk_out_fwd_options(Q, block_p, block_n_full, bf16)),
    }


def compile_for_hopper(fn, constexprs: dict, num_warps: int, num_stages: int,
                       maxnreg: int | None = None):
    signature, fixed, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            fixed[(i,)] = constexprs[name] if name in constexprs or not param.has_default else param.default
        elif name.endswith("_ptr"):
            signature[name] = ("*bf16" if name in LOW_PRECISION_PTRS
                               else "*i32" if name in INT32_PTRS else "*fp32")
            attrs[(i,)] = divisible
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            value = BLOCK_CASE_INTS.get(name, 16)
            if value == 1:
                signature[name] = "constexpr"
                fixed[(i,)] = 1
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = divisible
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(ASTSource(fn, signature, fixed, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def _cuobjdump(compiled, flag: str) -> str:
    """Triton's bundled cuobjdump run with ``flag`` on the compiled kernel's cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([cuobjdump, flag, path], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(compiled) -> dict:
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump(compiled, "-res-usage")))
    use = {k.lower(): int(v) for k, v in fields.items()}
    # Triton's shared memory is dynamic (sized at launch): cuobjdump's SHARED is only the static part
    use["shared"] = max(use.get("shared", 0), int(compiled.metadata.shared))
    return use


# SASS opcode families that say where a latency-bound kernel's instructions go (static counts:
# a loop body counts once).
SASS_CLASSES = {
    "mma": ("HMMA", "HGMMA", "IMMA"), "mufu (exp, rcp)": ("MUFU",),
    "global ld": ("LDG", "LDGSTS"), "global st": ("STG",), "local ld/st (spills)": ("LDL", "STL"),
    "shared ld/st": ("LDS", "STS", "LDSM"), "barrier": ("BAR",), "shuffle": ("SHFL",),
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP"), "convert": ("F2F", "F2FP", "I2F", "F2I"),
}


def sass_counts(compiled) -> dict:
    """Static instruction counts by family, from cuobjdump -sass of the cubin."""
    text = _cuobjdump(compiled, "-sass")
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text)
    counts = {"all": len(opcodes)}
    for family, prefixes in SASS_CLASSES.items():
        counts[family] = sum(1 for op in opcodes if op.startswith(prefixes))
    return counts


def programs_per_sm(regs: int, warps: int, shared: int) -> int:
    by_regs = 65536 // max(1, regs * 32 * warps)
    by_shared = (227 * 1024) // shared if shared else 32
    return max(0, min(by_regs, by_shared, 64 // warps))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="bwd_dx,bwd_dbdc_flat,bwd_dbdc")
    p.add_argument("--headdims", default="24,64")
    p.add_argument("--dstate", type=int, default=128)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--warps", default=None, help="comma-separated num_warps to compile (default: the launch default)")
    p.add_argument("--stages", default=None, help="comma-separated num_stages")
    p.add_argument("--block-n", default=None, help="comma-separated BLOCK_N")
    p.add_argument("--maxnreg", type=int, default=None,
                   help="cap on registers a thread (ptxas spills beyond); 0: no cap (ptxas's choice)")
    p.add_argument("--const", action="append", default=[], metavar="NAME=VALUE",
                   help="a constexpr of the kernel set (an int), e.g. DLAM_Z=1, or a default tile, e.g. BLOCK_M=32; repeatable")
    p.add_argument("--sass", action="store_true",
                   help="also count the SASS instructions by family (static counts)")
    args = p.parse_args(argv)

    def opt_list(text):
        return [int(v) for v in text.split(",")] if text else [None]

    print(f"Triton {triton.__version__}, sm_90a; bf16 operands; chunk {args.chunk}, N = {args.dstate}")
    print(f"{'kernel':18s} {'p':>3s} {'warps':>5s} {'stages':>6s} {'BLOCK_N':>7s} "
          f"{'regs':>5s} {'spill B':>7s} {'shared':>7s} {'progs/SM':>8s}")
    extra = {k: int(v) for k, v in (c.split("=", 1) for c in args.const)}

    def report(name, p, nw, ns, bn, compiled):
        use = resource_usage(compiled)
        spill = use.get("local", 0) + use.get("stack", 0)
        print(f"{name:18s} {p:>3} {nw:5d} {ns:6d} {bn:>7} {use['reg']:5d} {spill:7d} "
              f"{use['shared']:7d} {programs_per_sm(use['reg'], nw, use['shared']):8d}")
        if args.sass:
            print("    SASS: " + ", ".join(f"{k} {v}" for k, v in sass_counts(compiled).items()))

    rows = row_kernel_table()
    names = args.kernels.split(",")
    for name in (n for n in names if n in rows):  # conv / norm: no head dim, N or stages
        fn, constexprs, defaults = rows[name]
        for warps in opt_list(args.warps):
            nw = warps or defaults["num_warps"]
            report(name, "-", nw, 1, "-", compile_for_hopper(fn, {**constexprs, **extra}, nw, 1,
                                                             maxnreg=args.maxnreg or None))
    names = [n for n in names if n not in rows]
    for headdim in (int(v) for v in args.headdims.split(",")) if names else ():
        table = kernel_table(args.chunk, ti._pow2(headdim), ti._pow2(args.dstate))
        for name in names:
            if name not in table:
                sys.exit(f"--kernels: unknown {name!r}; valid: {', '.join([*table, *rows])}")
            fn, constexprs, defaults = table[name]
            tiles = {k: v for k, v in defaults.items() if k.startswith("BLOCK_") and k != "BLOCK_N"}
            for warps in opt_list(args.warps):
                for stages in opt_list(args.stages):
                    for block_n in opt_list(args.block_n):
                        nw = warps or defaults["num_warps"]
                        ns = stages or defaults.get("num_stages", 3)  # 3: Triton's default
                        bn = block_n or defaults["BLOCK_N"]
                        reg_cap = defaults.get("maxnreg") if args.maxnreg is None else args.maxnreg or None
                        report(name, headdim, nw, ns, bn,
                               compile_for_hopper(fn, {**constexprs, **tiles, "BLOCK_N": bn, **extra},
                                                  nw, ns, maxnreg=reg_cap))


if __name__ == "__main__":
    main()
