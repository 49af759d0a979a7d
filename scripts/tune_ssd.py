#!/usr/bin/env python
"""Time each SSD kernel under alternative launch options (num_warps, num_stages, tile sizes) on
the GPU, check every alternative's outputs, and print which options are fastest.

    python scripts/tune_ssd.py --json /tmp/tune_ssd.json                 # all kernels, 3 shapes
    python scripts/tune_ssd.py --kernels bwd_dx,bwd_dbdc --shapes block
    python scripts/tune_ssd.py --shapes lm_step --layout block           # as the block calls it
    python scripts/tune_ssd.py --kernels bwd_dx --grid "bwd_dx:num_warps=4;maxnreg=128,96,none"
        # some options' values replaced (--grid once per kernel; the others keep KERNELS' values)
    python scripts/tune_ssd.py --cpu-dry-run                             # the plumbing, on the CPU
    ncu ... python scripts/tune_ssd.py --profile-run 10 --shapes lm_step --layout block
        # no tuning: the defaults' forward + backward 10 times per shape, for an outside profiler

How: every launch of the SSD kernels goes through ``triton_impl._launch(name, **defaults)``, which
applies ``triton_impl.LAUNCH_OVERRIDES[name]``. For each kernel and each candidate option set
this script sets that override, runs the scan's forward + backward, and times that one kernel's
launch with CUDA events (each kernel object is wrapped so its launches are bracketed by events;
median over ``--reps`` calls after warm-up). Each timed call is queued behind a few milliseconds
of ``torch.cuda._sleep``, so the GPU never waits for the host between launches and an event pair
brackets the kernel's GPU time only (without that the scan is host-bound at these shapes, the
events also caught the host's launch latency, and a first visit measured swings of up to 7x).
The default options are timed in the same process. Each kernel is varied alone (the others at
their defaults), then the best of every kernel are combined and the whole forward + backward is
timed against all-defaults.

Every candidate is vetted first, in child processes (``--workers`` of them, which also compiles
the variants in parallel into Triton's shared on-disk cache): its outputs and gradients on two
small check problems (lengths not a multiple of the chunk, odd head counts, p = 24 and 32, n = 128
and 16, packed sequences, an initial state), with freshly NaN-poisoned buffers, against the
float64 reference, and one run at each timing shape. A candidate whose error exceeds
``max(2 x the defaults' error, 1e-2)`` (bf16), that fails to compile or launch, or whose kernel
faults (which kills its child; the child is restarted for the rest) is rejected, and only vetted
candidates ever run in the timing process. Launch options change pipelining and register
allocation, and Triton does miscompile some of them on Hopper: in session 4, num_stages=1 with 4
warps in ``bwd_dbdc`` made an illegal address at n = 16 (docs/performance.md).

Layouts (``--layout``): ``contiguous`` times the public scan on contiguous inputs. ``block`` times
the scan as the MatMamba2 block's fused core calls it (``matmamba.ops.triton_common.mixer``): x, B
and C are views into the conv output, dt a column slice of the in_proj output, and dx, dB, dC,
d dt are written into strided views of those tensors' gradients. Every shape's all-default
forward + backward is also timed in the other layout, in the same process, so the table shows
what the block's layout costs. (Inside lm_130m's training step the scan's backward kernels ran
2.2x slower per token than this script measured on contiguous inputs: docs/performance.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

# Scan shapes (b, l, h, p, g, n), as the models call the scan: the published head dim is D / 32,
# so a D=768 block at full width has 64 heads of 24 and its width-96 slice 8 of them. Until
# session 6 "block", "vit", "lm_width96" and "lm_step" had 64-wide heads (24 of them): their
# tuning rows in docs/bench before 2026-12-02 are at that shape, which "p64" keeps.
SHAPES = {
    "block": (8, 2048, 64, 24, 1, 128),     # the D=768 block at full width (issue 3's SSD case)
    "ssd": (8, 2048, 64, 24, 1, 128),       # issue 3's name for the same shape
    "vit": (64, 197, 64, 24, 1, 128),       # ViT-B/16 (197 tokens)
    "lm_width96": (8, 2048, 8, 24, 1, 128),  # the D=768 block's narrowest recipe width
    "lm_step": (32, 1024, 64, 24, 1, 128),  # lm_130m's full width in its training micro-batch
    "p64": (8, 2048, 24, 64, 1, 128),       # the same inner width in Mamba2's usual 64-wide heads
    "lm_width192": (8, 2048, 16, 24, 1, 128),
    "lm_width384": (8, 2048, 32, 24, 1, 128),
    "l16k": (4, 16384, 64, 24, 1, 128),      # 64K tokens in long rows (the state forms' trade)
    "l64k": (1, 65536, 64, 24, 1, 128),
}
LAYOUTS = ("contiguous", "block")
# Check problems ((b, l, h, p, g, n), awkward): awkward adds packed sequences and an initial
# state. The second is where num_stages=1 faulted in bwd_dbdc on the H200 (n = 16, one head per
# program), found by gpu_check after a first tuning run that checked only the first.
CHECKS = [((2, 300, 5, 24, 1, 128), True), ((1, 77, 3, 32, 1, 16), False)]
DRY_SHAPE = (1, 70, 3, 24, 1, 16)
DRY_CHECKS = [(DRY_SHAPE, True)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUEUE_CYCLES = 12_000_000  # ~6 ms at 1.98 GHz: longer than the host needs to queue one call

# name -> (kernel attribute in triton_impl, candidate grid). Kernels without an inner loop get no
# num_stages axis (it changes nothing there).
_DOT_GRID = dict(num_warps=(4, 8), num_stages=(1, 2, 3), BLOCK_N=(32, 64, 128))
_ROWS_GRID = dict(num_warps=(4, 8), BLOCK_M=(32, 64, 128), BLOCK_N=(64, 128))  # K1 / B1's flat rows
_WALK_GRID = dict(num_warps=(4, 8), BLOCK_M=(32, 64), BLOCK_N=(32, 64, 128))
KERNELS = {
    "cb": ("_cb_kernel", _DOT_GRID),
    "chunk_state_fwd": ("_chunk_states_kernel", _ROWS_GRID),
    "state_pass_fwd": ("_state_pass_kernel", dict(num_warps=(2, 4, 8), BLOCK=(256, 512, 1024, 2048))),
    "chunk_out_fwd": ("_chunk_out_fwd_kernel", _DOT_GRID),
    "chunk_dstate_bwd": ("_chunk_states_kernel", _ROWS_GRID),
    # the sequential form's walks (where _state_form picks it, or under MATMAMBA_SSD_STATE)
    "state_fwd_fused": ("_state_walk_kernel", _WALK_GRID),
    "state_bwd_fused": ("_state_walk_kernel", _WALK_GRID),
    "state_pass_bwd": ("_state_pass_kernel", dict(num_warps=(2, 4, 8), BLOCK=(256, 512, 1024, 2048))),
    # The two heavy backward kernels take 255 registers a thread at p = 24 (2 programs an SM at
    # 4 warps) and are latency-bound (ncu, session 6): maxnreg caps the registers (ptxas spills
    # the rest to L1-cached local memory) for 3 (168) or 4 (128) programs an SM. num_stages=1 is
    # left out: it never won here, and Triton 3.6 miscompiled it in bwd_dbdc (session 4).
    "bwd_dx": ("_chunk_bwd_dx_kernel", dict(num_warps=(4, 8), num_stages=(2, 3), BLOCK_N=(32, 64),
                                            maxnreg=(None, 168, 128))),
    "bwd_dbdc": ("_chunk_bwd_dbdc_kernel", dict(num_warps=(4, 8), num_stages=(2, 3), BLOCK_N=(64, 128),
                                                maxnreg=(None, 168, 128))),
    # B4's flat form (the default for 16-bit inputs; tuned and timed with MATMAMBA_SSD_BWD_DBDC=flat
    # forced, FORM_OF below): BLOCK_H heads a tile
    "bwd_dbdc_flat": ("_chunk_bwd_dbdc_flat_kernel", dict(num_warps=(4, 8), num_stages=(1, 2),
                                                          BLOCK_H=(2, 4), BLOCK_N=(64, 128))),
    "finalize": ("_finalize_grads_kernel", dict(num_warps=(2, 4, 8), BLOCK=(512, 1024, 2048))),
}
# Kernels of forms the scan runs only when asked to, or not for this script's 16-bit inputs (the
# per-head B4 serves fp32 inputs): tuned when named in --kernels
OPT_IN = ("bwd_dbdc",)
# Kernels that serve both directions: a flag of the launch tells them apart.
_KERNEL_OF_LAUNCH = {("_state_pass_kernel", "REVERSE", False): "state_pass_fwd",
                     ("_state_pass_kernel", "REVERSE", True): "state_pass_bwd",
                     ("_chunk_states_kernel", "TO_END", True): "chunk_state_fwd",
                     ("_chunk_states_kernel", "TO_END", False): "chunk_dstate_bwd",
                     ("_state_walk_kernel", "REVERSE", False): "state_fwd_fused",
                     ("_state_walk_kernel", "REVERSE", True): "state_bwd_fused"}


# Kernels that run in one form only (the state form, triton_impl._state_form; B4's forms,
# triton_impl._bwd_dbdc_form): their candidates are vetted and timed with
# that form forced, whatever the shape's own choice.
FORM_OF = {"chunk_state_fwd": ("MATMAMBA_SSD_STATE", "parallel"),
           "chunk_dstate_bwd": ("MATMAMBA_SSD_STATE", "parallel"),
           "state_pass_fwd": ("MATMAMBA_SSD_STATE", "parallel"),
           "state_pass_bwd": ("MATMAMBA_SSD_STATE", "parallel"),
           "state_fwd_fused": ("MATMAMBA_SSD_STATE", "sequential"),
           "state_bwd_fused": ("MATMAMBA_SSD_STATE", "sequential"),
           "bwd_dbdc": ("MATMAMBA_SSD_BWD_DBDC", "head"),
           "bwd_dbdc_flat": ("MATMAMBA_SSD_BWD_DBDC", "flat")}


# Settings whose all-default forward + backward each shape also times, for comparison with this
# run's (--other-chunks etc.): JSON key and flag -> (environment variable, default, what it varies)
OTHER_SETTINGS = {
    "other_chunks": ("MATMAMBA_SSD_CHUNK", "128", "chunk lengths"),
    "other_forms": ("MATMAMBA_SSD_STATE", "", "state forms, parallel or sequential"),
    "other_bwd_dbdc": ("MATMAMBA_SSD_BWD_DBDC", "", "B4 forms, head or flat"),
}


def form_of(kernel):
    """A context in which ``kernel`` runs: its form forced (if it has one)."""
    if kernel in FORM_OF:
        return _environment(*FORM_OF[kernel])
    return contextlib.nullcontext()


def launch_name(attr: str, kwargs: dict) -> str:
    """The KERNELS name of one launch of the kernel ``attr`` of triton_impl."""
    for (kernel, flag, value), name in _KERNEL_OF_LAUNCH.items():
        if kernel == attr and kwargs.get(flag) == value:
            return name
    return next(k for k, (a, _) in KERNELS.items() if a == attr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="block,vit,lm_width96", help=f"comma-separated of {list(SHAPES)}")
    p.add_argument("--kernels", default=",".join(k for k in KERNELS if k not in OPT_IN),
                   help=f"comma-separated of {list(KERNELS)} (default: all but the opt-in {OPT_IN})")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1),
                   help="processes that compile the variants in parallel before timing (0: none)")
    for key, (variable, default, what) in OTHER_SETTINGS.items():
        p.add_argument("--" + key.replace("_", "-"), default=default,
                       help=f"{what} ({variable}) whose all-default forward + backward is also "
                            "timed, in this process ('' for none)")
    p.add_argument("--layout", default="contiguous", choices=LAYOUTS,
                   help="contiguous inputs, or the views and strided gradient outputs the block's "
                        "fused core passes (the other layout's all-default time is printed too)")
    p.add_argument("--profile-run", type=int, default=0, metavar="N",
                   help="no vetting or tuning: run the all-default forward + backward N times per "
                        "shape in --layout and exit (for ncu and other outside profilers)")
    p.add_argument("--grid", action="append", default=[], metavar="KERNEL:OPTION=V1,V2;...",
                   help="replace some options' candidate values of one kernel, e.g. "
                        "\"bwd_dx:maxnreg=128,96,none;num_warps=4\" ('none': the compiler's choice); "
                        "once per kernel")
    p.add_argument("--json", default=None)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny shapes, 2 candidates per kernel, Triton interpreter on the CPU")
    p.add_argument("--candidate-timeout", type=float, default=300.0,
                   help="seconds one candidate may take in a vetting child before it is killed and rejected")
    p.add_argument("--vet-worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds; kernels not reached by then are reported as skipped")
    return p.parse_args(argv)


def parse_grid(items: list[str]) -> dict[str, dict]:
    """--grid "bwd_dx:num_warps=4;maxnreg=128,96,none" --grid "bwd_dbdc:num_stages=2" -> per-kernel
    grids that replace the named options' values in KERNELS (the others keep theirs)."""
    grids = {}
    for item in items:
        kernel, _, spec = item.partition(":")
        if kernel not in KERNELS or not spec:
            raise SystemExit(f"--grid: expected KERNEL:OPTION=V1,V2;... with KERNEL one of {list(KERNELS)}; "
                             f"got {item!r}")
        grid = dict(KERNELS[kernel][1])
        for part in spec.split(";"):
            name, _, values = part.partition("=")
            try:
                grid[name] = tuple(None if v.lower() == "none" else int(v) for v in values.split(","))
            except ValueError:
                raise SystemExit(f"--grid: {kernel}'s {name!r} takes integers or 'none'; got {values!r}")
        grids[kernel] = grid
    return grids


def candidates(kernel: str, limit: int | None = None, grids: dict | None = None) -> list[dict]:
    grid = (grids or {}).get(kernel) or KERNELS[kernel][1]
    names = list(grid)
    out = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    return out[:limit] if limit else out


def make_inputs(shape, dtype, dev, seed=0, awkward=False):
    b, l, h, p, g, n = shape
    gen = torch.Generator(device=dev).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.float64, generator=gen)  # noqa: E731
    dt0 = torch.exp(torch.rand(h, device=dev, generator=gen, dtype=torch.float64)
                    * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    leaves = dict(
        x=rnd(b, l, h, p), dt=rnd(b, l, h) * 0.5, A=-torch.rand(h, device=dev, dtype=torch.float64, generator=gen) * 15 - 1,
        B=rnd(b, l, g, n), C=rnd(b, l, g, n), D=rnd(h), dt_bias=dt0 + torch.log(-torch.expm1(-dt0)))
    if awkward:
        leaves["initial_state"] = rnd(b, h, p, n)
    low = {k: (v.to(dtype) if k in ("x", "dt", "B", "C") else v.float()).requires_grad_()
           for k, v in leaves.items()}
    ref = {k: v.detach().double().requires_grad_() for k, v in low.items()}  # the same values
    seq = None
    if awkward:
        seq = torch.zeros(b, l, dtype=torch.int32, device=dev)
        for cut in (l // 5, l // 2, l // 2 + 3, l - 2):
            seq[:, cut:] += 1
    return low, ref, seq


def scan_fwd_bwd(fn, inputs, seq, dy, d_final):
    """Forward + backward of the scan ``fn`` -> [y, final state, the gradient of every input]."""
    y, final = fn(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"],
                  dt_bias=inputs["dt_bias"], dt_softplus=True,
                  initial_state=inputs.get("initial_state"), seq_idx=seq, return_final_state=True)
    total = (y.double() * dy).sum() + (final.double() * d_final).sum()
    grads = torch.autograd.grad(total, list(inputs.values()))
    return [y, final, *grads]


class TimedKernel:
    """Stands in for a Triton kernel object in triton_impl: ``kernel[grid](...)`` launches the
    real kernel between two CUDA events when timing is on."""

    def __init__(self, real, attr):
        self.real, self.attr, self.events, self.timing = real, attr, {}, False

    def __getitem__(self, grid):
        launcher = self.real[grid]

        def launch(*args, **kwargs):
            name = launch_name(self.attr, kwargs)
            if not self.timing:
                return launcher(*args, **kwargs)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = launcher(*args, **kwargs)
            end.record()
            self.events.setdefault(name, []).append((start, end))
            return result

        return launch


def install_timers(triton_impl) -> dict[str, TimedKernel]:
    timers = {}
    for attr in {a for a, _ in KERNELS.values()}:
        timers[attr] = TimedKernel(getattr(triton_impl, attr), attr)
        setattr(triton_impl, attr, timers[attr])
    return timers


def timing_problem(triton_impl, shape, dtype, dev, layout):
    """-> a function running one forward + backward of the scan at ``shape`` in ``layout``
    (fresh random inputs, made once)."""
    if layout == "contiguous":
        low, _, seq = make_inputs(shape, dtype, dev)
        b, l, h, p, g, n = shape
        dy = torch.randn(b, l, h, p, device=dev, dtype=torch.float64)
        d_final = torch.randn(b, h, p, n, device=dev, dtype=torch.float64)
        return lambda: scan_fwd_bwd(triton_impl.ssd_scan_triton, low, seq, dy, d_final)
    return block_layout_problem(triton_impl, shape, dtype, dev)


def block_layout_problem(triton_impl, shape, dtype, dev):
    """The scan as ``mixer._core_fwd_impl`` / ``_core_bwd_impl`` call it: B, C, x are column views
    of the conv output ``[B | C | x]``, dt a column view of ``zxbcdt`` (the interleaved in_proj
    output ``[B | C | dt | z_0 x_0 | ...]``), and the backward writes dx, dB, dC into views of the
    conv output's gradient and d dt into ``d zxbcdt``'s columns. dy is contiguous (the norm's
    backward writes it so)."""
    from matmamba.ops.triton_common.mixer import _views

    b, l, h, p, g, n = shape
    gn = g * n
    make = dict(device=dev, dtype=dtype)
    conv_out = torch.randn(b, l, 2 * gn + h * p, **make)
    zxbcdt = torch.randn(b, l, 2 * gn + h + 2 * h * p, **make)
    zxbcdt[..., 2 * gn:2 * gn + h] = torch.rand(b, l, h, **make) * 2 - 4   # dt before softplus
    B, C, x, dt = _views(conv_out, zxbcdt, g, n, p, h)
    d_conv_out, d_zxbcdt = torch.empty_like(conv_out), torch.empty_like(zxbcdt)
    dB, dC, dx, ddt = _views(d_conv_out, d_zxbcdt, g, n, p, h)
    outs = {"dx": dx, "ddt": ddt, "dB": dB, "dC": dC}
    A = -torch.rand(h, device=dev) * 15 - 1
    D, dt_bias = torch.randn(h, device=dev), torch.randn(h, device=dev) * 0.1
    dy = torch.randn(b, l, h, p, **make)
    needs = {"A": True, "D": True, "dt_bias": True}

    def run():
        Q = triton_impl._chunk_length()  # per call: --other-chunks changes it
        y, _, (dtp, lam, CB, entering) = triton_impl._ssd_forward(
            x, dt, A, B, C, D, dt_bias, None, None, True, 0.0, float("inf"), Q)
        saved = (x, dt, A, B, C, D, dt_bias, None, None, dtp, lam, CB, entering)
        return y, triton_impl._ssd_backward(dy, None, saved, True, 0.0, float("inf"), Q, needs,
                                            out=outs)

    run.inputs = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias)  # for tests
    run.dy = dy
    return run


@contextlib.contextmanager
def _environment(name: str, value: str):
    """``name`` set to ``value`` inside, back to this run's own setting after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def time_config(triton_impl, timers, run, overrides, reps, warmup):
    """-> (median ms per kernel name, median ms of the whole forward + backward ``run()``)."""
    triton_impl.LAUNCH_OVERRIDES.clear()
    triton_impl.LAUNCH_OVERRIDES.update(overrides)
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    for t in timers.values():
        t.events, t.timing = {}, True
    whole = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(QUEUE_CYCLES)  # the GPU waits here while the host queues the call
        start.record()
        run()
        end.record()
        whole.append((start, end))
    torch.cuda.synchronize()
    per_kernel = {}
    for t in timers.values():
        t.timing = False
        for name, pairs in t.events.items():
            per_launch = [s.elapsed_time(e) for s, e in pairs]
            calls = len(per_launch) // reps
            per_call = [sum(per_launch[i * calls:(i + 1) * calls]) for i in range(reps)]
            per_kernel[name] = statistics.median(per_call)
    triton_impl.LAUNCH_OVERRIDES.clear()
    return per_kernel, statistics.median(s.elapsed_time(e) for s, e in whole)


def check_errors(triton_impl, problem, overrides) -> list[float]:
    """Relative errors (outputs, then gradients) of the scan under ``overrides`` against float64,
    with NaN-poisoned fresh buffers."""
    from gpu_check import poisoned_allocations, rel_err

    low, seq, dy, d_final, ref_outs = problem
    triton_impl.LAUNCH_OVERRIDES.clear()
    triton_impl.LAUNCH_OVERRIDES.update(overrides)
    try:
        with poisoned_allocations():
            outs = scan_fwd_bwd(triton_impl.ssd_scan_triton, low, seq, dy, d_final)
        if low["x"].is_cuda:
            torch.cuda.synchronize()  # a faulting kernel raises here, inside its candidate
    finally:
        triton_impl.LAUNCH_OVERRIDES.clear()
    return [rel_err(o, r) for o, r in zip(outs, ref_outs)]


def check_problem(shape, awkward, dtype, dev):
    """Inputs, cotangents and the float64 reference outputs and gradients of one check problem."""
    from matmamba.ops.ssd.naive import ssd_scan_naive

    low, ref, seq = make_inputs(shape, dtype, dev, seed=7, awkward=awkward)
    b, l, h, p, g, n = shape
    gen = torch.Generator(device=dev).manual_seed(11)
    dy = torch.randn(b, l, h, p, device=dev, dtype=torch.float64, generator=gen)
    d_final = torch.randn(b, h, p, n, device=dev, dtype=torch.float64, generator=gen)
    ref_outs = [t.detach() for t in scan_fwd_bwd(ssd_scan_naive, ref, seq, dy, d_final)]
    return low, seq, dy, d_final, ref_outs


def vet_worker(job_path: str, out_path: str) -> int:
    """Child process: for each candidate of the job file, a line ``start`` then a line with its
    errors on every check problem and whether it ran on every timing shape (which also compiles
    it into Triton's on-disk cache for the timing process). A kernel that faults leaves the CUDA
    context unusable, so the process stops there; its parent marks that candidate as crashed and
    starts a new process for the rest."""
    job = json.load(open(job_path))
    dev = torch.device(job["device"])
    if dev.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton decorates the kernels
    from matmamba.ops.ssd import triton_impl

    dtype = DTYPES[job["dtype"]]
    checks = [check_problem(tuple(shape), awkward, dtype, dev) for shape, awkward in job["checks"]]
    timing = [timing_problem(triton_impl, tuple(shape), dtype, dev, job["layout"])
              for shape in job["timing_shapes"]]
    with open(out_path, "a") as out:
        for index, (kernel, options) in job["items"]:
            out.write(json.dumps(dict(start=index)) + "\n")
            out.flush()
            if os.environ.get("TUNE_SSD_FAULT_AT") == str(index):  # tests: die as a faulting kernel does
                os._exit(139)
            if os.environ.get("TUNE_SSD_HANG_AT") == str(index):  # tests: hang as a stuck kernel does
                time.sleep(3600)
            overrides = {kernel: options} if kernel else {}
            try:
                with form_of(kernel):
                    errors = [check_errors(triton_impl, problem, overrides) for problem in checks]
                    triton_impl.LAUNCH_OVERRIDES.update(overrides)
                    for run in timing:
                        run()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                record = dict(done=index, errors=errors)
            except Exception as exc:  # compile errors (resources), launch failures, faults
                record = dict(done=index, error=f"{type(exc).__name__}: {exc}"[:300])
            finally:
                triton_impl.LAUNCH_OVERRIDES.clear()
            out.write(json.dumps(record) + "\n")
            out.flush()
            if "error" in record and dev.type == "cuda":
                return 3  # the context may be broken: let the parent start a fresh process
    return 0


def read_progress(out_path):
    """-> (index of the last candidate started, {index: record of each finished one})."""
    started, done = None, {}
    if os.path.exists(out_path):
        for line in open(out_path):
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            else:
                done[rec["done"]] = rec
    return started, done


def watch_child(proc, out_path, candidate_timeout) -> bool:
    """Wait for a vetting child; kill it when one candidate has run longer than
    ``candidate_timeout`` seconds (a hung compile or kernel). -> whether it was killed."""
    last, since = None, time.monotonic()
    while True:
        try:
            proc.wait(timeout=1.0)
            return False
        except subprocess.TimeoutExpired:
            pass
        progress = os.path.getsize(out_path) if os.path.exists(out_path) else 0
        if progress != last:
            last, since = progress, time.monotonic()
        elif time.monotonic() - since > candidate_timeout:
            proc.kill()
            proc.wait()
            return True


def vet_candidates(items, checks, timing_shapes, dtype_name, device, workers, workdir,
                   candidate_timeout=300.0, layout="contiguous"):
    """Run ``vet_worker`` over (kernel, options) items in ``workers`` parallel child processes,
    restarting a child after each crash. -> {index: record}; a crashed candidate's record says so."""
    import threading

    indexed = list(enumerate(items))
    results: dict[int, dict] = {}
    lock = threading.Lock()

    def run_share(share, slot):
        pending = list(share)
        attempt = 0
        while pending:
            attempt += 1
            job_path = os.path.join(workdir, f"vet_{slot}_{attempt}.json")
            out_path = os.path.join(workdir, f"vet_{slot}_{attempt}.jsonl")
            with open(job_path, "w") as f:
                json.dump(dict(items=pending, checks=checks, timing_shapes=timing_shapes,
                               dtype=dtype_name, device=device, layout=layout), f)
            err_path = out_path + ".stderr"
            with open(err_path, "w") as err:
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--vet-worker",
                                         job_path, out_path], stdout=subprocess.DEVNULL, stderr=err)
                hung = watch_child(proc, out_path, candidate_timeout)
            stderr = open(err_path, errors="replace").read().strip()[-300:]
            started, done = read_progress(out_path)
            if started is not None and started not in done:  # the process died inside it
                why = (f"no result after {candidate_timeout:.0f} s (killed)" if hung
                       else f"process died (rc {proc.returncode})")
                done[started] = dict(done=started, error=f"{why}: {stderr}")
            if not done:  # died before its first candidate: nothing to learn by retrying
                for index, _ in pending:
                    done[index] = dict(done=index, error=f"worker failed (rc {proc.returncode}): {stderr}")
            with lock:
                results.update(done)
            pending = [(i, item) for i, item in pending if i not in done]

    shares = [indexed[i::workers] for i in range(max(1, workers))]
    threads = [threading.Thread(target=run_share, args=(share, slot))
               for slot, share in enumerate(shares) if share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.vet_worker:
        return vet_worker(*args.vet_worker)
    dry = args.cpu_dry_run
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
    from matmamba.ops.ssd import triton_impl

    if not dry and not torch.cuda.is_available():
        sys.exit("tune_ssd.py times CUDA kernels: run it on a GPU machine (or --cpu-dry-run)")
    dev = torch.device("cpu" if dry else "cuda")
    dtype_name = "fp32" if dry else args.dtype  # the interpreter cannot read bf16
    dtype = DTYPES[dtype_name]
    shape_names = args.shapes.split(",")
    kernel_names = args.kernels.split(",")
    for s in shape_names:
        if s not in SHAPES:
            sys.exit(f"--shapes: unknown shape {s!r}; valid: {', '.join(SHAPES)}")
    for k in kernel_names:
        if k not in KERNELS:
            sys.exit(f"--kernels: unknown kernel {k!r}; valid: {', '.join(KERNELS)}")
    shapes = {s: (DRY_SHAPE if dry else SHAPES[s]) for s in shape_names}
    if args.profile_run:
        for shape_name, shape in shapes.items():
            run = timing_problem(triton_impl, shape, dtype, dev, args.layout)
            for _ in range(args.profile_run):
                run()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"{shape_name} {shape}, {args.layout} layout: ran {args.profile_run} times",
                  flush=True)
        return None
    checks = DRY_CHECKS if dry else CHECKS
    grids = parse_grid(args.grid)
    cands = {k: candidates(k, 2 if dry else None, grids) for k in kernel_names}
    t_start = time.perf_counter()

    # Vet every candidate (and the defaults, item 0) in child processes: errors on the check
    # problems, and one run at each timing shape, which compiles it for the timing below.
    items = [(None, None)] + [(k, c) for k in kernel_names for c in cands[k]]
    with tempfile.TemporaryDirectory(prefix="tune_ssd_") as workdir:
        vetted = vet_candidates(items, checks, sorted(set(shapes.values())), dtype_name, dev.type,
                                max(1, args.workers), workdir, args.candidate_timeout, args.layout)
    vet_s = time.perf_counter() - t_start
    defaults = vetted[0]
    if "error" in defaults:
        sys.exit(f"the default launch options fail: {defaults['error']}")
    floor = 1e-4 if dtype == torch.float32 else 1e-2
    tols = [[max(2 * e, floor) for e in errs] for errs in defaults["errors"]]

    def verdict(index):
        rec = vetted[index]
        if "error" in rec:
            return dict(ok=False, error=rec["error"])
        worst = max(max(errs) for errs in rec["errors"])
        ok = all(e <= t for errs, ts in zip(rec["errors"], tols) for e, t in zip(errs, ts))
        return dict(ok=ok, worst_error=worst)

    verdicts = {i: verdict(i) for i in range(1, len(items))}
    crashed = [items[i] for i, v in verdicts.items() if "error" in v]
    print(f"vetted {len(items) - 1} candidates (+ defaults) on {len(checks)} check problems and "
          f"{len(shapes)} timing shapes in {vet_s:.0f} s with {args.workers} processes; "
          f"{sum(not v['ok'] for v in verdicts.values())} rejected, {len(crashed)} of them failing "
          f"to run", flush=True)
    for kernel, options in crashed:
        print(f"  fails: {kernel} {options}: {verdicts[items.index((kernel, options))]['error'][:160]}")

    timers = install_timers(triton_impl) if not dry else {}
    report = dict(device=torch.cuda.get_device_name() if not dry else "cpu (dry run)",
                  torch=torch.__version__, triton=__import__("triton").__version__,
                  dtype=dtype_name, layout=args.layout, checks=checks, default_errors=defaults["errors"],
                  vet_s=vet_s, shapes={})
    for shape_name, shape in shapes.items():
        run = timing_problem(triton_impl, shape, dtype, dev, args.layout)
        entry = report["shapes"][shape_name] = dict(shape=shape, kernels={})
        if dry:
            base_kernels, base_total = {}, float("nan")
        else:
            base_kernels, base_total = time_config(triton_impl, timers, run, {}, args.reps,
                                                   args.warmup)
        entry["default_total_ms"] = base_total
        entry["default_kernels_ms"] = base_kernels
        print(f"\n== {shape_name} {shape}, {args.layout} layout: forward + backward "
              f"{base_total:.3f} ms with defaults", flush=True)
        if not dry:
            other = next(x for x in LAYOUTS if x != args.layout)
            other_kernels, other_total = time_config(
                triton_impl, timers, timing_problem(triton_impl, shape, dtype, dev, other), {},
                args.reps, args.warmup)
            entry["other_layout"] = dict(layout=other, total_ms=other_total,
                                         kernels_ms=other_kernels)
            print(f"   {other} layout: {other_total:.3f} ms", flush=True)
            for kernel in sorted(base_kernels, key=lambda k: -base_kernels[k]):
                print(f"     {kernel:<17} {args.layout} {base_kernels[kernel]:7.3f} ms   {other} "
                      f"{other_kernels.get(kernel, float('nan')):7.3f} ms", flush=True)
        for key, (variable, _, _) in OTHER_SETTINGS.items():
            values = getattr(args, key)
            entry[f"{key}_total_ms"], entry[f"{key}_kernels_ms"] = {}, {}
            for value in filter(None, values.split(",")):
                if dry:
                    break
                with _environment(variable, value):
                    kernels_ms, total = time_config(triton_impl, timers, run, {}, args.reps,
                                                    args.warmup)
                entry[f"{key}_total_ms"][value] = total
                entry[f"{key}_kernels_ms"][value] = kernels_ms
                heaviest = sorted(kernels_ms.items(), key=lambda kv: -kv[1])[:4]
                print(f"   {variable}={value}: {total:.3f} ms ("
                      + ", ".join(f"{k} {ms:.3f}" for k, ms in heaviest) + ")", flush=True)
        best_all = {}
        for kernel in kernel_names:
            if time.perf_counter() - t_start > args.time_budget:
                entry["kernels"][kernel] = dict(skipped="time budget")
                print(f"  {kernel}: skipped (time budget)", flush=True)
                continue
            rows = []
            with form_of(kernel):
                default_ms = base_kernels.get(kernel, float("nan"))
                if math.isnan(default_ms) and not dry:  # not in this shape's own state form
                    default_ms = time_config(triton_impl, timers, run, {}, args.reps,
                                             args.warmup)[0].get(kernel, float("nan"))
                for cand in cands[kernel]:
                    row = dict(options=cand, ms=float("nan"), **verdicts[items.index((kernel, cand))])
                    if row["ok"] and not dry:  # only vetted candidates ever run in this process
                        per_kernel, _ = time_config(triton_impl, timers, run, {kernel: cand},
                                                    args.reps, args.warmup)
                        row["ms"] = per_kernel.get(kernel, float("nan"))
                    rows.append(row)
            good = [r for r in rows if r["ok"] and (dry or not math.isnan(r["ms"]))]
            best = min(good, key=lambda r: 0.0 if dry else r["ms"]) if good else None
            entry["kernels"][kernel] = dict(default_ms=default_ms, best=best, rows=rows)
            if best:
                best_all[kernel] = best["options"]
                print(f"  {kernel:<17} default {default_ms:7.3f} ms  best {best['ms']:7.3f} ms "
                      f"({default_ms / best['ms']:.2f}x) {best['options']}  "
                      f"[{len(rows) - len(good)} of {len(rows)} rejected]", flush=True)
            else:
                print(f"  {kernel:<17} no candidate passed: "
                      f"{[r.get('error', r.get('worst_error')) for r in rows][:3]}", flush=True)
        entry["best_options"] = best_all
        if not dry and best_all:
            tuned_kernels, tuned_total = time_config(triton_impl, timers, run, best_all,
                                                     args.reps, args.warmup)
            _, base_again = time_config(triton_impl, timers, run, {}, args.reps, args.warmup)
            entry.update(tuned_total_ms=tuned_total, tuned_kernels_ms=tuned_kernels,
                         default_total_again_ms=base_again)
            print(f"  all bests together: {tuned_total:.3f} ms vs defaults {base_again:.3f} ms "
                  f"({base_again / tuned_total:.2f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s")
    return report


if __name__ == "__main__":
    sys.exit(main() if "--vet-worker" in sys.argv else (main() and 0))
