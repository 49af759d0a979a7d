"""Where the error of the fused mixer core's per-head gradients (dA, dD, d dt_bias) comes from.

Re-runs gpu_check's mixer stage with the same draws (``--draw N`` of a gpu_check run repeats its
cotangents exactly) under precision variants of the Triton path and prints, per variant and
16-bit row, the worst per-head gradient error next to mamba_ssm's and the fp32-inside torch
path's on the same inputs:

    python scripts/probe_precision.py --draws 14,15,16 --variants default,dy_fp32,states_fp32
    python scripts/probe_precision.py --cpu-dry-run --draws 0 --dtypes fp16   # interpreter

Variants (module switches, restored after each run):
  default       as shipped
  dy_fp32       the gated norm's backward hands the scan dy in fp32 (mixer.SCAN_DY_IN_FP32)
  states_fp32   the chunk states and their gradients stored in fp32 (ssd STATES_IN_INPUT_DTYPE)
  both          dy_fp32 + states_fp32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

PER_HEAD = ("dA", "dD", "ddt_bias")
MIXER_STAGE_INDEX = 4  # gpu_check reseeds stage i with draw + i; the mixer is its fifth stage


@contextlib.contextmanager
def variant(name: str):
    from matmamba.ops.ssd import triton_impl
    from matmamba.ops.triton_common import mixer
    saved = mixer.SCAN_DY_IN_FP32, triton_impl.STATES_IN_INPUT_DTYPE
    mixer.SCAN_DY_IN_FP32 = name in ("dy_fp32", "both")
    triton_impl.STATES_IN_INPUT_DTYPE = name not in ("states_fp32", "both")
    try:
        yield
    finally:
        mixer.SCAN_DY_IN_FP32, triton_impl.STATES_IN_INPUT_DTYPE = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", default="14", help="comma list of gpu_check draws")
    parser.add_argument("--variants", default="default,dy_fp32,states_fp32,both")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16",
                        help="as gpu_check's (the draws depend on it: keep gpu_check's default)")
    parser.add_argument("--quick", action="store_true", help="gpu_check's quick case list")
    parser.add_argument("--json", default=None)
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args()
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is decorated
    elif not torch.cuda.is_available():
        print("probe_precision.py needs a CUDA GPU (or --cpu-dry-run)", file=sys.stderr)
        return 2
    import gpu_check
    dev = torch.device("cpu" if args.cpu_dry_run else "cuda")
    by_name = {v: k for k, v in gpu_check.DTYPE_NAME.items()}
    dtypes = [by_name[d] for d in args.dtypes.split(",")]
    rows = []
    for draw in map(int, args.draws.split(",")):
        for name in args.variants.split(","):
            gpu_check.RESULTS.clear()
            torch.manual_seed(draw + MIXER_STAGE_INDEX)
            with variant(name):
                gpu_check.check_mixer(dtypes, dev, args.quick)
            for r in gpu_check.RESULTS:
                if r["dtype"] == "fp32" and name != "default":
                    continue
                errs = r["errors"]
                base = r.get("baseline_errors") or {}
                rows.append(dict(
                    draw=draw, variant=name, dtype=r["dtype"], case=r["case"], ok=r["ok"],
                    ours={k: errs.get(k) for k in PER_HEAD},
                    mamba_ssm={k: base.get("mamba_ssm", {}).get(k) for k in PER_HEAD},
                    torch={k: base.get("torch", {}).get(k) for k in PER_HEAD}))
                print(json.dumps(rows[-1]), flush=True)
    fmt = lambda v: "   -   " if v is None else f"{v:.1e}"  # noqa: E731
    print(f"\n{'draw':>5} {'variant':<12} {'dtype':<5} {'case':<36} {'ok':<4} "
          + " ".join(f"{k + ' ours/mamba/torch':<28}" for k in PER_HEAD))
    for r in rows:
        print(f"{r['draw']:>5} {r['variant']:<12} {r['dtype']:<5} {r['case'][:36]:<36} "
              f"{'ok' if r['ok'] else 'FAIL':<4} "
              + " ".join(f"{fmt(r['ours'][k])}/{fmt(r['mamba_ssm'][k])}/{fmt(r['torch'][k]):<10}"
                         for k in PER_HEAD))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
