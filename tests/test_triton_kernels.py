"""The Triton kernels against the float64 sequential references, on the CPU under the Triton
interpreter: forward and every gradient, at small awkward shapes (lengths that are not a
multiple of the chunk, head dim 24, odd head counts, several groups, initial states, packed
sequences, strided inputs, both state-passing forms of the scan, two chunk lengths).

TRITON_INTERPRET=1 must be set before Triton decorates the kernels, and other tests may import
the kernel modules first without it, so each group of checks runs in a fresh subprocess:
``python tests/test_triton_kernels.py <group>``. float32, plus one fp16 group for the rounding of
the scan's 16-bit products (the interpreter cannot read bf16; bf16 and fp16 are checked on the GPU
by scripts/gpu_check.py).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
from interpreter_groups import group_main, rel_err, run_group

TOL = 1e-4  # float32 against float64 (issue 3's target)

pytest.importorskip("triton")


@pytest.mark.parametrize("group", ["ssd_parallel", "ssd_sequential", "ssd_launch_options", "ssd_fp16", "ssd_flat",
                                   "ssd_packed", "conv1d", "rmsnorm", "decode", "mixer", "dispatch"])
def test_triton_kernels_under_interpreter(group):
    run_group(__file__, group)


def test_state_form_rule(monkeypatch):
    """Which state form (and how many segments a walk) the scan picks, on a 132-SM GPU, at the
    shapes the rule was measured at (rows: a group's heads x head dim, 64 heads of 24 = 1536)."""
    import torch

    from matmamba.ops.ssd import triton_impl as ti

    monkeypatch.setattr(ti, "_sm_count", lambda device: 132)
    monkeypatch.delenv("MATMAMBA_SSD_STATE", raising=False)
    monkeypatch.delenv("MATMAMBA_SSD_SEGMENTS", raising=False)
    gpu = torch.device("cuda")
    form = lambda batch, heads, nchunks: ti._state_form(batch, heads * 24, 128, nchunks, gpu)  # noqa: E731
    assert form(8, 64, 32) == ("sequential", 1)      # the D=768 block at b8 l2048: 192 walks
    assert form(4, 64, 256) == ("sequential", 1)     # 4 x 16K: 96 walks
    assert form(8, 8, 32) == ("parallel", 1)         # width 96: 24 walks of 32 chunks
    assert form(1, 64, 1024) == ("sequential", 9)    # 1 x 64K: 24 walks, cut for ~1.5 an SM
    assert form(1, 64, 256) == ("sequential", 4)     # 1 x 16K: segments of at least 64 chunks
    assert form(1, 8, 1024) == ("sequential", 16)    # width 96 at 1 x 64K: 3 walks
    monkeypatch.setenv("MATMAMBA_SSD_SEGMENTS", "3")
    assert form(8, 64, 32) == ("sequential", 3)
    assert form(8, 8, 32) == ("parallel", 1)         # segments cut only sequential walks
    monkeypatch.setenv("MATMAMBA_SSD_STATE", "sequential")
    assert form(8, 8, 32) == ("sequential", 3) and form(1, 64, 2) == ("sequential", 2)
    monkeypatch.setenv("MATMAMBA_SSD_STATE", "parallel")
    assert form(1, 64, 1024) == ("parallel", 1)
    monkeypatch.setenv("MATMAMBA_SSD_SEGMENTS", "0")
    monkeypatch.setenv("MATMAMBA_SSD_STATE", "sequential")
    with pytest.raises(ValueError, match="MATMAMBA_SSD_SEGMENTS"):
        form(1, 64, 1024)


def test_state_walk_tile_rule():
    """The walk's row tile by how many 64-row walks there are (132 SMs), at the shapes measured
    (session 19): narrower tiles where walks are few, the 64-row tile elsewhere."""
    from matmamba.ops.ssd import triton_impl as ti

    def tile(walks, nchunks, rows=1536):
        opts = ti._state_walk_options(rows, 128, walks, nchunks, 132)
        return opts["BLOCK_M"], opts["num_warps"]

    assert tile(None, 0) == (64, 8)            # what _state_form counts walks in
    assert tile(96, 256) == (16, 4)            # 4 x 16K: 96 long walks
    assert tile(192, 32) == (32, 4)            # the block at b8 l2048
    assert tile(96, 50) == (64, 8)             # ViT, packed: few walks, but short
    assert tile(768, 16) == (64, 8)            # b32 l1024
    assert tile(264, 32) == (64, 8)            # two walks an SM already
    assert tile(96, 256, rows=24) == (16, 4)   # a one-head group: never wider than its rows
    assert tile(192, 32, rows=24) == (32, 4)
    assert tile(None, 0, rows=24) == (32, 8)


# ---------------------------------------------------------------------------------------------
# The checks (run in the subprocess)
# ---------------------------------------------------------------------------------------------


def _compare(name, triton_fn, naive_fn, inputs: dict, failures: list, tol=TOL):
    """Forward and every gradient of triton_fn (float32) against naive_fn (float64)."""
    import torch

    low, ref = {}, {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            low[key] = value.detach().float().requires_grad_(value.requires_grad)
            ref[key] = value.detach().double().requires_grad_(value.requires_grad)
        else:
            low[key] = ref[key] = value
    out = triton_fn(**low)
    out_ref = naive_fn(**ref)
    out, out_ref = (out if isinstance(out, tuple) else (out,)), (out_ref if isinstance(out_ref, tuple) else (out_ref,))
    cotangents = [torch.randn_like(o, dtype=torch.float64) for o in out_ref]
    leaves = [k for k, v in low.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(sum((o.double() * g).sum() for o, g in zip(out, cotangents)),
                                [low[k] for k in leaves])
    grads_ref = torch.autograd.grad(sum((o * g).sum() for o, g in zip(out_ref, cotangents)),
                                    [ref[k] for k in leaves])
    errors = {f"out{i}": rel_err(o, r) for i, (o, r) in enumerate(zip(out, out_ref))}
    errors.update({f"d{k}": rel_err(g, r) for k, g, r in zip(leaves, grads, grads_ref)})
    worst = max(errors.values())
    print(f"{'ok  ' if worst <= tol else 'FAIL'} {name}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    if not worst <= tol:
        failures.append(name)


def _ssd_group(form: str, failures: list, only=None) -> None:
    """The scan in state form ``form`` at the cases below (``only``: their indices)."""
    import torch

    from matmamba.ops.ssd.naive import ssd_scan_naive
    from matmamba.ops.ssd.triton_impl import ssd_scan_triton

    os.environ["MATMAMBA_SSD_STATE"] = form
    cases = [
        # (b, l, h, p, g, n, chunk, options)
        (2, 37, 3, 24, 1, 16, 16, dict(D="h", bias=True, softplus=True, init=True)),
        # x and dy with their heads' channels apart in memory (the flat-row kernels' strided path)
        (2, 37, 3, 24, 1, 16, 16, dict(D="h", bias=True, softplus=True, heads_apart=True)),
        (1, 70, 5, 24, 5, 16, 32, dict(D="hp", bias=True, softplus=True, seq=True, init=True)),
        (2, 33, 4, 8, 2, 32, 16, dict(D=None, bias=False, softplus=False, limit=(0.0, 0.3))),
        (1, 16, 1, 24, 1, 16, 16, dict(D="h", bias=True, softplus=True, seq=True)),  # one chunk
    ]
    for b, l, h, p, g, n, chunk, opt in (cases if only is None else [cases[i] for i in only]):
        os.environ["MATMAMBA_SSD_CHUNK"] = str(chunk)
        gen = torch.Generator().manual_seed(b * 1000 + l)
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        inputs = dict(
            x=rnd(b, l, h, p).requires_grad_(),
            dt=(rnd(b, l, h) * 0.5 if opt.get("softplus") else rnd(b, l, h).abs() * 0.1).requires_grad_(),
            A=(-torch.rand(h, generator=gen, dtype=torch.float64) * 4 - 0.5).requires_grad_(),
            B=rnd(b, l, g, n).requires_grad_(),
            C=rnd(b, l, g, n).requires_grad_(),
            D=None if opt.get("D") is None else rnd(*((h,) if opt["D"] == "h" else (h, p))).requires_grad_(),
            dt_bias=(rnd(h) * 0.3 - 2).requires_grad_() if opt.get("bias") else None,
            initial_state=rnd(b, h, p, n).requires_grad_() if opt.get("init") else None,
            seq_idx=None,
            dt_softplus=bool(opt.get("softplus")),
            dt_limit=opt.get("limit", (0.0, math.inf)),
            return_final_state=True,
        )
        if opt.get("seq"):
            seq = torch.zeros(b, l, dtype=torch.int32)
            seq[:, l // 3:] = 4
            seq[:, l // 3 + 1:] = 5
            seq[:, l - 1:] = 9
            inputs["seq_idx"] = seq
        triton_fn, naive_fn = ssd_scan_triton, ssd_scan_naive
        if opt.get("heads_apart"):
            inputs["x"] = rnd(b, l, p, h).transpose(2, 3).requires_grad_()
            triton_fn, naive_fn = _heads_apart(ssd_scan_triton), _heads_apart(ssd_scan_naive)
        segments = os.environ.get("MATMAMBA_SSD_SEGMENTS")
        form_name = f"{form}, {segments} segments" if segments else form
        name = f"ssd[{form_name}] b{b} l{l} h{h} p{p} g{g} n{n} Q{chunk} {sorted(k for k, v in opt.items() if v)}"
        _compare(name, triton_fn, naive_fn, inputs, failures)


def _ssd_sequential_group(failures: list) -> None:
    """The sequential form, then with each walk cut into segments (a summary launch, then walks
    that start from the earlier segments' ends): an initial state; several groups with packed
    sequences (a segment boundary inside a sequence and between sequences)."""
    _ssd_group("sequential", failures)
    os.environ["MATMAMBA_SSD_SEGMENTS"] = "2"
    try:
        _ssd_group("sequential", failures, only=(0, 2))
    finally:
        del os.environ["MATMAMBA_SSD_SEGMENTS"]


def _heads_apart(scan):
    """The scan with y returned as (b, l, p, h): its gradient reaches the scan heads apart."""
    def wrapped(**kw):
        y, final = scan(**kw)
        return y.transpose(2, 3), final
    return wrapped


def _ssd_packed_group(failures: list) -> None:
    """Short rows packed into one (``pack_factor``; here forced by MATMAMBA_SSD_PACK): the same
    scan as the rows apart, forward and every gradient, and the packing really happened (the
    forward's ``pack`` argument is recorded). Also: inputs whose rows do not follow each other in
    memory, and calls that want a final state, are not packed and still right."""
    import torch

    from matmamba.ops.ssd import triton_impl
    from matmamba.ops.ssd.naive import ssd_scan_naive

    packs = []
    forward = triton_impl._ssd_forward

    def recording_forward(*args):
        packs.append(args[-1] if len(args) == 14 else 1)
        return forward(*args)
    triton_impl._ssd_forward = recording_forward
    os.environ["MATMAMBA_SSD_STATE"] = "parallel"
    os.environ["MATMAMBA_SSD_CHUNK"] = "16"
    # the rule's floor on state walks is for GPUs (test_ssd_pack_factor_...): one head may pack here
    min_row_heads, triton_impl._PACK_MIN_ROW_HEADS = triton_impl._PACK_MIN_ROW_HEADS, 1
    triton_impl._PACK_FACTORS.clear()
    try:
        for b, l, h, p, force, rows_apart, final, expect in [
                (4, 13, 3, 24, "2", False, False, 2), (4, 13, 3, 24, "4", False, False, 4),
                (6, 5, 1, 8, "auto", False, False, 6),  # 6 rows of 5 in 2 chunks instead of 6
                (4, 13, 3, 24, "4", True, False, 1), (4, 13, 3, 24, "4", False, True, 1)]:
            os.environ["MATMAMBA_SSD_PACK"] = force
            gen = torch.Generator().manual_seed(100 * b + l)
            rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
            x = rnd(l, b, h, p).transpose(0, 1) if rows_apart else rnd(b, l, h, p)  # (b, l) either way
            inputs = dict(x=x.requires_grad_(), dt=(rnd(b, l, h) * 0.5).requires_grad_(),
                          A=(-torch.rand(h, generator=gen, dtype=torch.float64) * 4 - 0.5).requires_grad_(),
                          B=rnd(b, l, 1, 16).requires_grad_(), C=rnd(b, l, 1, 16).requires_grad_(),
                          D=rnd(h).requires_grad_(), dt_bias=(rnd(h) * 0.3 - 2).requires_grad_(),
                          dt_softplus=True, return_final_state=final)
            packs.clear()
            name = (f"ssd packed b{b} l{l} h{h} p{p} MATMAMBA_SSD_PACK={force}"
                    + (" rows apart" if rows_apart else "") + (" final state" if final else ""))
            _compare(name, triton_impl.ssd_scan_triton, ssd_scan_naive, inputs, failures)
            if packs != [expect]:
                print(f"FAIL {name}: packed {packs}, expected [{expect}]")
                failures.append(name + " (pack)")
    finally:
        triton_impl._ssd_forward = forward
        triton_impl._PACK_MIN_ROW_HEADS = min_row_heads
        triton_impl._PACK_FACTORS.clear()
        os.environ.pop("MATMAMBA_SSD_PACK", None)


def _ssd_fp16_group(failures: list) -> None:
    """fp16 operands (the interpreter rounds them as the GPU does): no gradient of the scan may
    lose more to rounding than a few times what the output does. d dt, dA and d dt_bias come from
    dLam, a difference of two large products that nearly cancel (triton_impl's docstring), and
    lost 5-10x more than the output when those products rounded the fp32 scores to 16 bits (on
    the H200 in bf16: dA 4e-2 against float64); carried as two 16-bit parts they lose 1-2x.
    The first shape runs again with the chunk states stored in fp32 (STATES_IN_INPUT_DTYPE off,
    the switch scripts/probe_precision.py flips)."""
    import torch

    from matmamba.ops.ssd import triton_impl
    from matmamba.ops.ssd.naive import ssd_scan_naive
    from matmamba.ops.ssd.triton_impl import ssd_scan_triton

    cases = [(2, 300, 5, 24, 1, 128, True), (1, 200, 4, 64, 1, 128, True), (2, 300, 5, 24, 1, 128, False)]
    for b, l, h, p, g, n, states_16bit in cases:
        triton_impl.STATES_IN_INPUT_DTYPE = states_16bit
        gen = torch.Generator().manual_seed(l)
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        ref = dict(x=rnd(b, l, h, p), dt=rnd(b, l, h) * 0.5,
                   A=-torch.rand(h, generator=gen, dtype=torch.float64) * 4 - 0.5,
                   B=rnd(b, l, g, n), C=rnd(b, l, g, n), D=rnd(h), dt_bias=rnd(h) * 0.3 - 2)
        dy = rnd(b, l, h, p)
        half = {k: v.to(torch.float16 if k in ("x", "B", "C") else torch.float32) for k, v in ref.items()}
        results = []
        for fn, inputs in ((ssd_scan_triton, half), (ssd_scan_naive, ref)):
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            y = fn(**leaves, dt_softplus=True)
            grads = torch.autograd.grad((y.double() * dy).sum(), list(leaves.values()))
            results.append([y] + list(grads))
        names = ["out"] + [f"d{k}" for k in ref]
        errors = {k: rel_err(o, r) for k, o, r in zip(names, *results)}
        worst = max(v for k, v in errors.items() if k != "out")
        ok = worst <= 3 * errors["out"]
        triton_impl.STATES_IN_INPUT_DTYPE = True
        print(f"{'ok  ' if ok else 'FAIL'} ssd fp16 b{b} l{l} h{h} p{p} n{n} states "
              f"{'fp16' if states_16bit else 'fp32'} (worst gradient <= 3x out): "
              + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
        if not ok:
            failures.append(f"ssd fp16 b{b} l{l} h{h} p{p} states_16bit={states_16bit}")


def _ssd_launch_options_group(failures: list) -> None:
    """Non-default launch options (the ones scripts/tune_ssd.py tries) compute the same scan, in
    both state forms, and an override really reaches its launch (a bad one fails)."""
    from matmamba.ops.ssd import triton_impl

    small_tiles = {name: dict(BLOCK_N=16) for name in ("chunk_out_fwd", "bwd_dx", "bwd_dbdc")}
    small_tiles["cb"] = dict(BLOCK_N=16, BLOCK_H=2)  # the group's heads in several tiles
    # the flat (head, p) rows in blocks of 16: blocks that start and end inside a head
    small_tiles.update({name: dict(BLOCK_N=16, BLOCK_M=16) for name in (
        "state_fwd_fused", "chunk_state_fwd", "state_bwd_fused", "chunk_dstate_bwd")})
    small_tiles.update(state_pass_fwd=dict(BLOCK=128), state_pass_bwd=dict(BLOCK=64))
    triton_impl.LAUNCH_OVERRIDES.update(small_tiles)  # n = 32 below: two N blocks everywhere
    try:
        for form in ("parallel", "sequential"):
            # an initial state; several groups with packed sequences; two N blocks, no D or bias
            _ssd_group(form, failures, only=(0, 2, 3))
        os.environ["MATMAMBA_SSD_STATE"] = "parallel"
        triton_impl.LAUNCH_OVERRIDES["state_pass_bwd"] = dict(BLOCK=3)  # not a power of 2
        import torch

        x = torch.randn(1, 40, 2, 8, requires_grad=True)
        y = triton_impl.ssd_scan_triton(x, torch.rand(1, 40, 2), -torch.rand(2),
                                        torch.randn(1, 40, 1, 32), torch.randn(1, 40, 1, 32))
        try:
            y.sum().backward()
            failures.append("a bad state_pass_bwd override did not reach its launch")
        except Exception as exc:  # Triton refuses tl.arange(0, 3)
            print(f"ok   a bad override fails its launch: {type(exc).__name__}")
    finally:
        triton_impl.LAUNCH_OVERRIDES.clear()


def _ssd_flat_group(failures: list) -> None:
    """Flat B4 where the default groups do not reach it: they run it for 16-bit inputs and the
    per-head B4 for fp32 (MATMAMBA_SSD_BWD_DBDC=auto). Here, forced flat in float32: the scan's
    cases with the decay factored; every tile in the exact form (SPAN_LIMIT below any span); one
    head a tile and two with 16-wide N steps; a case whose heads decay so fast that some tiles
    exceed the default limit and others do not (one head a tile)."""
    import torch

    from matmamba.ops.ssd import triton_impl
    from matmamba.ops.ssd.naive import ssd_scan_naive
    from matmamba.ops.ssd.triton_impl import ssd_scan_triton

    os.environ["MATMAMBA_SSD_BWD_DBDC"] = "flat"
    try:
        _ssd_group("parallel", failures)
        for opts in (dict(SPAN_LIMIT=-1.0), dict(BLOCK_H=1), dict(BLOCK_H=2, BLOCK_N=16)):
            triton_impl.LAUNCH_OVERRIDES.update(bwd_dbdc_flat=opts)
            print(f"     flat B4 launched with {opts}")
            _ssd_group("parallel", failures, only=(0, 2, 3))
        triton_impl.LAUNCH_OVERRIDES.update(bwd_dbdc_flat=dict(BLOCK_H=1))
        os.environ["MATMAMBA_SSD_CHUNK"] = "64"
        gen = torch.Generator().manual_seed(5)
        b, l, h, p, n = 2, 150, 4, 24, 16
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        # per-step decays A dt' of about 0.06, 3.5, 0.6 and 7 (dt' averages 0.58): spans over a
        # chunk of 64 of about 4, 220, 37 and 440 (above and below the limit of 80)
        inputs = dict(x=rnd(b, l, h, p).requires_grad_(), dt=(rnd(b, l, h).abs() * 0.1 + 0.5).requires_grad_(),
                      A=torch.tensor([-0.1, -6.0, -1.0, -12.0], dtype=torch.float64).requires_grad_(),
                      B=rnd(b, l, 1, n).requires_grad_(), C=rnd(b, l, 1, n).requires_grad_(),
                      D=rnd(h).requires_grad_(), dt_bias=None, initial_state=rnd(b, h, p, n).requires_grad_(),
                      seq_idx=None, dt_softplus=False, dt_limit=(0.0, math.inf), return_final_state=True)
        spans = (inputs["A"].abs() * inputs["dt"].mean()).detach() * 63
        assert spans.min() < triton_impl._FLAT_SPAN_LIMIT < spans.max(), spans
        _compare(f"ssd[flat B4] b{b} l{l} h{h} p{p} n{n} Q64, spans {[round(v) for v in spans.tolist()]}",
                 ssd_scan_triton, ssd_scan_naive, inputs, failures)
    finally:
        triton_impl.LAUNCH_OVERRIDES.clear()
        del os.environ["MATMAMBA_SSD_BWD_DBDC"]


def _conv_group(failures: list) -> None:
    import torch

    from matmamba.ops.conv1d.naive import causal_conv1d_naive
    from matmamba.ops.conv1d.triton_impl import causal_conv1d_triton

    for b, l, d, w, opt in [(2, 45, 37, 4, dict(seq=True, init=True, bias=True, act="silu")),
                            (1, 70, 130, 4, dict(bias=True, act="silu")),
                            (2, 3, 9, 4, dict(init=True, act=None)),
                            (1, 20, 16, 2, dict(seq=True, bias=True, act="silu")),
                            (2, 61, 20, 3, dict(seq=True, init=True, bias=True, act="silu")),
                            (1, 50, 19, 5, dict(seq=True, init=True, bias=True, act="silu"))]:
        gen = torch.Generator().manual_seed(l)
        inputs = dict(
            x=torch.randn(b, l, d, generator=gen, dtype=torch.float64).requires_grad_(),
            weight=(torch.randn(d, w, generator=gen, dtype=torch.float64) * 0.5).requires_grad_(),
            bias=torch.randn(d, generator=gen, dtype=torch.float64).requires_grad_() if opt.get("bias") else None,
            initial_state=(torch.randn(b, d, w - 1, generator=gen, dtype=torch.float64).requires_grad_()
                           if opt.get("init") else None),
            activation=opt["act"], seq_idx=None, return_final_state=True,
        )
        if opt.get("seq"):
            seq = torch.zeros(b, l, dtype=torch.int64)
            seq[:, l // 4:] = 1
            seq[:, l // 2:] = 3
            inputs["seq_idx"] = seq

        def strided_triton(x, **kw):
            # read x through a strided view, as the block reads a slice of in_proj's output
            wide = x.new_zeros(x.shape[0], x.shape[1], x.shape[2] + 5)
            wide[:, :, 3:3 + x.shape[2]] = x
            return causal_conv1d_triton(wide[:, :, 3:3 + x.shape[2]], **kw)

        _compare(f"conv1d b{b} l{l} d{d} w{w} {sorted(k for k, v in opt.items() if v)}", strided_triton,
                 causal_conv1d_naive, inputs, failures)
        if opt.get("seq") and opt.get("init") and w == 4:
            # each launch on its own tile (the backward's two passes tile the positions
            # differently, so pass 2's reads of du must not assume pass 1's tiling); pass 2
            # walks 2 tiles of 16 a program (the second of its second program past the end),
            # and its 2 x 2 + 2 partials (with the initial state's tile) are summed 4 rows a
            # step: a ragged second step
            from matmamba.ops.conv1d import triton_impl
            triton_impl.LAUNCH_OVERRIDES.update(
                fwd=dict(BLOCK_L=16, BLOCK_D=16, num_warps=2),
                bwd_du=dict(BLOCK_L=32, BLOCK_D=16, num_warps=4),
                bwd_dx=dict(BLOCK_L=16, BLOCK_D=32, num_warps=2, STEPS=2),
                wgrad=dict(BLOCK_R=4, BLOCK_D=16, num_warps=1))
            try:
                _compare(f"conv1d b{b} l{l} d{d} w{w} own tiles per launch", strided_triton,
                         causal_conv1d_naive, inputs, failures)
            finally:
                triton_impl.LAUNCH_OVERRIDES.clear()

    # 16-bit inputs: pass 1 stores du in the input dtype (DU_IN_INPUT_DTYPE) or fp32, and pass 2
    # forms dx and the weight-gradient sums from the stored copy. Every gradient from the 16-bit
    # du must really differ from the fp32 one (it was read) and stay within fp16's rounding of
    # the float64 reference: at most 1.5x the fp32-du error plus 2^-12 (a quarter of fp16's ulp).
    from matmamba.ops.conv1d import triton_impl
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 45, 37, generator=gen, dtype=torch.float64)
    weight = torch.randn(37, 4, generator=gen, dtype=torch.float64) * 0.5
    bias = torch.randn(37, generator=gen, dtype=torch.float64)
    dy = torch.randn(2, 45, 37, generator=gen, dtype=torch.float64)
    grads = {}
    for du16 in (False, True):
        triton_impl.DU_IN_INPUT_DTYPE = du16
        leaves = [x.half().requires_grad_(), weight.float().requires_grad_(), bias.float().requires_grad_()]
        out = causal_conv1d_triton(leaves[0], leaves[1], leaves[2], activation="silu")
        grads[du16] = torch.autograd.grad(out, leaves, dy.half())
    triton_impl.DU_IN_INPUT_DTYPE = True
    ref = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    ref_grads = torch.autograd.grad(causal_conv1d_naive(*ref, activation="silu"), ref, dy)
    report, ok = [], True
    for name, g16, g32, want in zip(("dx", "dweight", "dbias"), grads[True], grads[False], ref_grads):
        err16, err32 = rel_err(g16, want), rel_err(g32, want)
        read = not torch.equal(g16, g32)  # the 16-bit du was really read
        ok &= read and err16 <= 1.5 * err32 + 2.0 ** -12
        report.append(f"{name}={err16:.1e} (fp32 du: {err32:.1e}, differs: {read})")
    print(f"{'ok  ' if ok else 'FAIL'} conv1d fp16, du stored in fp16: " + ", ".join(report))
    if not ok:
        failures.append("conv1d fp16 du16")


def _rmsnorm_group(failures: list) -> None:
    import torch

    from matmamba.ops.rmsnorm.naive import gated_rmsnorm_naive
    from matmamba.ops.rmsnorm.triton_impl import gated_rmsnorm_triton

    for shape, has_z, nbg, group in [((2, 7, 48), True, False, None), ((3, 5, 40), True, True, 8),
                                     ((6, 30), False, False, None), ((4, 72), True, False, 24),
                                     ((5, 1100), True, False, None)]:  # >= 1024: several rows a program
        gen = torch.Generator().manual_seed(sum(shape))
        inputs = dict(
            x=torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(),
            z=torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_() if has_z else None,
            weight=(1 + 0.2 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).requires_grad_(),
            eps=1e-5, norm_before_gate=nbg, group_size=group,
        )
        _compare(f"gated_rmsnorm {shape} z={has_z} norm_before_gate={nbg} group={group}",
                 gated_rmsnorm_triton, gated_rmsnorm_naive, inputs, failures)
        if shape[-1] >= 1024:  # other multi-row tiles (defaults: fwd 4 rows, bwd 2), one program an SM
            from matmamba.ops.rmsnorm import triton_impl
            triton_impl.LAUNCH_OVERRIDES.update(fwd=dict(ROWS=2, programs_per_sm=1),
                                                bwd=dict(ROWS=4, num_warps=8, programs_per_sm=1))
            _compare(f"gated_rmsnorm {shape} fwd 2 rows, bwd 4 rows a program", gated_rmsnorm_triton,
                     gated_rmsnorm_naive, inputs, failures)
            triton_impl.LAUNCH_OVERRIDES.clear()
        if has_z and not nbg:  # both backward bodies: one phase, and two around the row sum
            from matmamba.ops.rmsnorm import triton_impl
            for recompute, rows in [(0, 1), (1, 1), (1, 2)]:
                triton_impl.LAUNCH_OVERRIDES.update(bwd=dict(RECOMPUTE=recompute, ROWS=rows))
                _compare(f"gated_rmsnorm {shape} group={group} bwd RECOMPUTE={recompute} "
                         f"{rows} rows a program", gated_rmsnorm_triton, gated_rmsnorm_naive,
                         inputs, failures)
                triton_impl.LAUNCH_OVERRIDES.clear()
    _rmsnorm_module_cases(failures)


def _rmsnorm_module_cases(failures: list) -> None:
    """The models' RMSNorm (residual stream) outside autograd on the Triton path takes the norm
    kernel; its result matches the module's torch ops in float64 (fp32 in, residual-sized and
    wide rows). Under autograd, or with use_fused_inference(False), it keeps the torch ops."""
    import torch

    from matmamba.models.common import RMSNorm, _triton_inference
    from matmamba.ops import use_fused_inference, use_impl

    for shape in [(2, 5, 40), (3, 1100)]:
        gen = torch.Generator().manual_seed(shape[-1])
        norm = RMSNorm(shape[-1], eps=1e-5)
        with torch.no_grad():
            norm.weight.add_(0.2 * torch.randn(shape[-1], generator=gen))
        x = torch.randn(*shape, generator=gen) * 3
        with torch.no_grad(), use_impl("torch"):
            ref = norm.double()(x.double())
        norm.float()
        with use_impl("triton"):
            assert not _triton_inference(x.requires_grad_(), norm.weight)  # autograd: the ops
            with torch.no_grad():
                assert _triton_inference(x, norm.weight)
                with use_fused_inference(False):  # turned off: the ops
                    assert not _triton_inference(x, norm.weight)
                out = norm(x)
        error = rel_err(out, ref)
        ok = error <= TOL
        print(f"{'ok  ' if ok else 'FAIL'} RMSNorm module {shape} outside autograd (Triton): {error:.1e}")
        if not ok:
            failures.append(f"RMSNorm module {shape}")


def _decode_group(failures: list) -> None:
    import torch

    from matmamba.ops.conv1d.naive import causal_conv1d_update_naive
    from matmamba.ops.conv1d.triton_impl import causal_conv1d_update_triton
    from matmamba.ops.state_update.naive import ssd_state_update_naive
    from matmamba.ops.state_update.triton_impl import ssd_state_update_triton

    for b, h, p, n, g, Dp in [(2, 5, 24, 16, 1, False), (1, 6, 24, 32, 3, True)]:
        cache = torch.randn(b, h + 2, p, n)
        state = cache[:, :h]  # a prefix of the heads: strided, updated in place
        x, dt = torch.randn(b, h, p), torch.randn(b, h) * 0.5
        A, B, C = -torch.rand(h) * 4, torch.randn(b, g, n), torch.randn(b, g, n)
        D = torch.randn(h, p) if Dp else torch.randn(h)
        bias = torch.randn(h)
        ref_state = state.double().clone()
        y = ssd_state_update_triton(state, x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True)
        y_ref = ssd_state_update_naive(ref_state, x.double(), dt.double(), A.double(), B.double(),
                                       C.double(), D=D.double(), dt_bias=bias.double(), dt_softplus=True)
        errors = (rel_err(y, y_ref), rel_err(state, ref_state), rel_err(cache[:, h:], cache[:, h:].clone()))
        ok = max(errors) <= TOL
        print(f"{'ok  ' if ok else 'FAIL'} ssd_state_update b{b} h{h} p{p} n{n} g{g}: {errors}")
        if not ok:
            failures.append("ssd_state_update")
    for b, d, w in [(3, 37, 4), (1, 8, 3)]:
        cache = torch.randn(b, d + 4, w - 1)
        x, weight, bias = torch.randn(b, d), torch.randn(d, w), torch.randn(d)
        ref_state = cache[:, :d].double().clone()
        y = causal_conv1d_update_triton(x, cache[:, :d], weight, bias, activation="silu")
        y_ref = causal_conv1d_update_naive(x.double(), ref_state, weight.double(), bias.double())
        errors = (rel_err(y, y_ref), rel_err(cache[:, :d], ref_state))
        ok = max(errors) <= TOL
        print(f"{'ok  ' if ok else 'FAIL'} causal_conv1d_update b{b} d{d} w{w}: {errors}")
        if not ok:
            failures.append("causal_conv1d_update")
    _block_decode_cases(failures)


def _block_decode_cases(failures: list) -> None:
    """The block's fused decode step (conv update -> state update -> gated norm on the in_proj
    output through column maps, A from A_log in the kernel) against the same block stepping
    through the naive ops in float64: outputs over 3 tokens, and both caches, whose parts beyond
    the width's prefix must stay as they were. Widths full and partial, 2 groups, per-channel D,
    no conv bias, the norm before the gate, a dt limit, a conv of width 3."""
    import copy

    import torch

    from matmamba.models.block import MatMamba2
    from matmamba.ops import use_impl

    for width, kw in [(24, dict(ngroups=2, D_has_hdim=True)),
                      (12, dict(conv_bias=False, norm_before_gate=True, dt_limit=(0.01, 0.5))),
                      (4, dict(d_conv=3))]:  # widths of d_model 24: 6, 3 and 1 of 6 heads
        gen = torch.Generator().manual_seed(width)
        ref_blk = MatMamba2(24, d_state=16, headdim=8, layer_idx=0, **kw).double()  # 6 heads of 8
        with torch.no_grad():
            for prm in ref_blk.parameters():  # away from the init's ones and zeros
                prm.add_(torch.randn(prm.shape, generator=gen, dtype=torch.float64) * 0.1)
        blk = copy.deepcopy(ref_blk).float()
        b = 2
        ref_cache = [torch.randn(t.shape, generator=gen, dtype=torch.float64)
                     for t in ref_blk.allocate_inference_cache(b)]
        cache = [t.float() for t in ref_cache]
        outs, refs = [], []
        with torch.no_grad():
            for _ in range(3):
                u = torch.randn(b, 1, 24, generator=gen, dtype=torch.float64)
                with use_impl("naive"):
                    refs.append(ref_blk.step(u, *ref_cache, width=width))
                with use_impl("triton"):
                    assert blk._fused_decode(u.float())
                    outs.append(blk.step(u.float(), *cache, width=width))
        errors = (rel_err(torch.cat(outs), torch.cat(refs)),
                  rel_err(cache[0], ref_cache[0]), rel_err(cache[1], ref_cache[1]))
        ok = max(errors) <= TOL
        print(f"{'ok  ' if ok else 'FAIL'} block decode step (fused core) width {width} {kw}: "
              f"out, conv cache, ssm cache {tuple(f'{e:.1e}' for e in errors)}")
        if not ok:
            failures.append(f"block decode width {width}")


def _mixer_group(failures: list) -> None:
    """The fused conv -> scan -> gated-norm node against the naive ops composed in float64, at a
    full and two partial widths (unused heads' dt columns must get zero gradient), seq_idx."""
    import torch

    from matmamba.ops.triton_common.mixer import mamba2_mixer_core_reference, mamba2_mixer_core_triton
    os.environ["MATMAMBA_SSD_CHUNK"] = "16"
    G, N, P, H, W = 1, 16, 8, 5, 4
    for k, seq in [(5, False), (3, True), (1, False)]:
        gen = torch.Generator().manual_seed(k)
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        b, l = 2, 37
        inputs = dict(
            zxbcdt=rnd(b, l, 2 * G * N + H + 2 * k * P).requires_grad_(),
            conv_weight=(rnd(2 * G * N + k * P, W) * 0.5).requires_grad_(),
            conv_bias=rnd(2 * G * N + k * P).requires_grad_(),
            dt_bias=(rnd(k) * 0.3 - 1).requires_grad_(),
            A=(-torch.rand(k, generator=gen, dtype=torch.float64) * 3 - 0.5).requires_grad_(),
            D=rnd(k).requires_grad_(),
            norm_weight=(1 + 0.1 * rnd(k * P)).requires_grad_(),
            ngroups=G, dstate=N, headdim=P, nheads_total=H, seq_idx=None,
        )
        if seq:
            sq = torch.zeros(b, l, dtype=torch.int32)
            sq[:, 10:] = 1
            sq[1, 30:] = 2
            inputs["seq_idx"] = sq
        _compare(f"mixer core k{k}/{H}" + (" seq" if seq else ""), mamba2_mixer_core_triton,
                 mamba2_mixer_core_reference, inputs, failures)
        if not seq:  # the two rows scanned as one (ssd.triton_impl.pack_factor, forced)
            os.environ["MATMAMBA_SSD_PACK"] = "2"
            _compare(f"mixer core k{k}/{H} 2 rows packed", mamba2_mixer_core_triton,
                     mamba2_mixer_core_reference, inputs, failures)
            os.environ.pop("MATMAMBA_SSD_PACK")


def _dispatch_group(failures: list) -> None:
    """impl='triton' through the public ops reaches these kernels (also for CPU tensors under
    the interpreter) and agrees with impl='torch'; the block runs on them at two widths."""
    import torch

    from matmamba import MatMamba2, ops

    x = torch.randn(1, 40, 3, 24)
    dt, A = torch.randn(1, 40, 3), -torch.rand(3)
    B, C = torch.randn(1, 40, 1, 16), torch.randn(1, 40, 1, 16)
    y_t = ops.ssd_scan(x, dt, A, B, C, D=torch.ones(3), dt_softplus=True, impl="triton")
    y_r = ops.ssd_scan(x, dt, A, B, C, D=torch.ones(3), dt_softplus=True, impl="torch")
    errors = [rel_err(y_t, y_r)]
    block = MatMamba2(d_model=64, d_state=16, headdim=16)
    u = torch.randn(2, 21, 64)
    for width in (64, 32):
        with ops.use_impl("triton"):
            out_t = block(u, width=width)
        with ops.use_impl("torch"):
            out_r = block(u, width=width)
        errors.append(rel_err(out_t, out_r))
    ok = max(errors) <= TOL
    print(f"{'ok  ' if ok else 'FAIL'} dispatch impl='triton' and the block at widths 64, 32: {errors}")
    if not ok:
        failures.append("dispatch")


def test_ssd_pack_factor_packs_only_where_padding_is_large(monkeypatch):
    """Which rows the scan packs (chunk 64): ViT-B/16's 197 tokens (4 chunks, 23% padding) 8 to a
    row at 64 heads (16 pad as little, but leave 4 rows x 64 heads of state walks), not at all at 8
    heads; 577 tokens (10% padding) and whole chunks not at all; rows of at most 4096 tokens; a
    prime batch as one row when short enough and the heads many; MATMAMBA_SSD_PACK forces a k or
    turns it off."""
    from matmamba.ops.ssd import triton_impl

    monkeypatch.delenv("MATMAMBA_SSD_PACK", raising=False)
    assert triton_impl.pack_factor(64, 197, 64, 64) == 8
    assert triton_impl.pack_factor(64, 197, 64, 32) == 4    # 16 rows x 32 heads; pads 18.8% less
    assert triton_impl.pack_factor(64, 197, 64, 16) == 1    # k = 2 removes only 12.5%
    assert triton_impl.pack_factor(64, 197, 64, 8) == 1
    assert triton_impl.pack_factor(256, 197, 64, 64) == 16
    assert triton_impl.pack_factor(16, 577, 64, 512) == 1
    assert triton_impl.pack_factor(8, 2048, 64, 512) == 1
    assert triton_impl.pack_factor(64, 1000, 64, 512) == 1
    assert triton_impl.pack_factor(1, 197, 64, 512) == 1
    assert triton_impl.pack_factor(7, 197, 64, 512) == 7  # 1379 tokens: 22 chunks instead of 28
    assert triton_impl.pack_factor(7, 197, 64, 64) == 1   # 64 walks would be too few
    assert triton_impl.pack_factor(64, 50, 64, 512) * 50 <= 4096
    for setting, expect in (("0", 1), ("1", 1), ("4", 4), ("3", 1)):  # 3 does not divide 64
        monkeypatch.setenv("MATMAMBA_SSD_PACK", setting)
        assert triton_impl.pack_factor(64, 197, 64, 64) == expect
    monkeypatch.setenv("MATMAMBA_SSD_PACK", "yes")
    with pytest.raises(ValueError, match="MATMAMBA_SSD_PACK must be"):
        triton_impl.pack_factor(64, 197, 64, 64)
    # what the packed launches refuse (the custom ops can be called with any pack)
    with pytest.raises(ValueError, match="must divide the batch"):
        triton_impl._check_pack(3, 64, None, None)
    with pytest.raises(ValueError, match="without initial_state and seq_idx"):
        triton_impl._check_pack(4, 64, None, object())


def test_ssd_bwd_dbdc_form_rule(monkeypatch):
    """B4's form (MATMAMBA_SSD_BWD_DBDC): auto is flat for 16-bit operands and per-head for fp32;
    flat and head force either; a bad value names the valid ones."""
    import triton.language as tl

    from matmamba.ops.ssd import triton_impl

    form = triton_impl._bwd_dbdc_form
    monkeypatch.delenv("MATMAMBA_SSD_BWD_DBDC", raising=False)
    assert [form(d) for d in (tl.bfloat16, tl.float16, tl.float32)] == ["flat", "flat", "head"]
    monkeypatch.setenv("MATMAMBA_SSD_BWD_DBDC", "flat")
    assert form(tl.float32) == "flat"
    monkeypatch.setenv("MATMAMBA_SSD_BWD_DBDC", " Head ")
    assert form(tl.bfloat16) == "head"
    monkeypatch.setenv("MATMAMBA_SSD_BWD_DBDC", "fast")
    with pytest.raises(ValueError, match="MATMAMBA_SSD_BWD_DBDC must be one of auto, flat, head; got 'fast'"):
        form(tl.bfloat16)


def test_ssd_flat_b4_falls_back_per_head_where_out_of_shared_memory(monkeypatch):
    """Where flat B4's compiled kernel needs more shared memory than the SM has (Triton raises
    OutOfResources as it loads, before launching), B4 runs per head, at once and from then on
    for that specialization; other specializations still try the flat form."""
    import torch
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    from matmamba.ops.ssd import triton_impl

    monkeypatch.delenv("MATMAMBA_SSD_BWD_DBDC", raising=False)
    monkeypatch.setattr(triton_impl, "_FLAT_B4_TOO_LARGE", set())
    calls = []

    def fake_launch(flat, x, *rest):
        calls.append(flat)
        if flat and x.shape[-1] == 64:
            raise OutOfResources(234504, 232448, "shared memory")
        return ("flat" if flat else "head",)

    monkeypatch.setattr(triton_impl, "_bwd_dbdc_launch", fake_launch)

    def b4(headdim, has_seq=True, dot_dtype=tl.float16):
        x = torch.empty(1, 8, 2, headdim)
        return triton_impl._bwd_dbdc(x, None, None, None, None, None, None, None, None, has_seq,
                                     (0, 0), 64, 64, triton_impl._pow2(headdim), 128, dot_dtype,
                                     "tf32")[0]

    assert b4(64) == "head" and calls == [True, False]
    assert b4(64) == "head" and calls == [True, False, False]       # not tried again
    assert b4(64, has_seq=False) == "head" and calls[3:] == [True, False]  # another specialization
    assert b4(24) == "flat" and calls[5:] == [True]
    assert b4(24, dot_dtype=tl.float32) == "head" and calls[6:] == [False]  # auto: fp32 per head
    assert len(triton_impl._FLAT_B4_TOO_LARGE) == 2


def test_ssd_launch_limits_are_explicit():
    """The (batch x heads) index rides grid axis 0 (2^31 - 1 programs), so large batches launch;
    a sequence with more chunks than grid axis 1 holds gets an error that says what to do."""
    from matmamba.ops.ssd import triton_impl

    triton_impl._check_chunks(65535, 64)
    with pytest.raises(ValueError, match="initial_state"):
        triton_impl._check_chunks(65536, 64)


def _main(group: str) -> int:
    return group_main({
        "ssd_parallel": lambda failures: _ssd_group("parallel", failures),
        "ssd_sequential": _ssd_sequential_group,
        "ssd_launch_options": _ssd_launch_options_group,
        "ssd_fp16": _ssd_fp16_group,
        "ssd_flat": _ssd_flat_group,
        "ssd_packed": _ssd_packed_group,
        "conv1d": _conv_group,
        "rmsnorm": _rmsnorm_group,
        "decode": _decode_group,
        "mixer": _mixer_group,
        "dispatch": _dispatch_group,
    }, group)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
