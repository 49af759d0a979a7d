"""Causal depthwise conv1d (+ SiLU) in Triton: forward, hand-written backward, decode step.

For input x (b,l,d) channels-last (any strides), weight (d,w), bias (d,), with u the
pre-activation and "in(t)" the input at time t (``initial_state`` for t < 0)::

    u[t, c]  = bias[c] + sum_k weight[c, k] * in(t - (w-1) + k)[c] * same(t - (w-1) + k, t)
    y[t, c]  = silu(u[t, c])   (or u with activation=None)

where same(s, t) = 1 when s and t lie in one sequence (``seq_idx`` segment; the initial state
belongs to the first). Backward, with du = dy * silu'(u), silu'(u) = sig(u) (1 + u (1 - sig(u)))::

    dx[s, c]     = sum_k weight[c, k] * du[s + (w-1) - k, c] * same(s, s + (w-1) - k)
    dweight[c,k] = sum_t du[t, c] * in(t - (w-1) + k)[c] * same(...)
    dbias[c]     = sum_t du[t, c]
    d initial    = dx at the negative times -(w-1) .. -1

The backward is two passes over tiles of positions. The first recomputes u and writes du (in
the inputs' 16-bit dtype, or fp32: ``DU_IN_INPUT_DTYPE``); without the activation du is dy and
the pass is skipped. The second reads du at the w shifted positions (cache hits) for dx and, with
one more read of the input at its own positions, reduces this tile's dweight / dbias into small
partial buffers. A third, small launch sums the partials over the tiles (in a fixed order) into
dweight and dbias in their dtypes. (A single pass that recomputed du at every shift, reading x
w^2 times, took 1.1 ms for the D=768 block's conv at b8 l2048 on an H200. Until session 17 the
first pass formed the weight-gradient sums from the fp32 du in registers, at 64 x 128: 255
registers a thread with spills. Moved to the second pass, which reads du at every shift anyway,
they let the first pass run at 32 x 128 (128 registers) and the second at 64 x 128: the backward
1.12-1.16x faster on an H100. The dweight and dbias sums then read the stored du.)
``final_state`` (the last w-1 inputs) is sliced with torch ops outside the kernels, so autograd
handles its gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common.custom_ops import differentiable_triton_op, segment_ids
from ..triton_common.columns import mapped_columns
from ..triton_common.launch import cdiv, launch, next_power_of_2
from .naive import check_conv1d_inputs, check_conv1d_update_inputs

Tensor = torch.Tensor

# Tile (positions x channels) and warps of each launch: "fwd", "bwd_du" (pass 1 of the backward),
# "bwd_dx" (pass 2); "wgrad" (the sums of pass 2's partials) has its own tile.
# LAUNCH_OVERRIDES[kind] replaces any of them (scripts/bench_conv.py times alternatives on the
# GPU); results do not depend on them beyond rounding. On an H200 (bf16, the D=768 block's 1792
# channels read through the column map; session 11, 8 variants each): the forward is fastest at
# 32 x 128 (0.059 -> 0.056 ms at b8 l2048 and 0.066 -> 0.045 at b64 l197, where 197 positions
# fill 64-row tiles badly); 8 warps were slower at every tile. Session 18 (H100, the two passes
# as now: pass 1 elementwise, pass 2 with the weight-gradient sums), the whole backward at
# b8 l2048 / b64 l197: pass 1 at 16 or 32 x 128 0.366 / 0.307 ms, at 64 x 128 0.373 / 0.321;
# pass 2 at 64 x 128 0.274 / 0.250 (32 x 128: 0.366 / 0.307, 16 x 128: 0.541 / 0.436; 32 x 128
# walking 2 or 4 tiles a program: 0.336 or 0.323 / 0.307 or 0.290), against 0.317 / 0.280 for
# session 17's backward (weight-gradient sums in pass 1) in the same run. Pass 2 at 64 x 128
# compiles to 255 registers with 96 B of spills (2 programs an SM) and is still the fastest.
# Session 19 (H100, same run): pass 2 at 64 x 128 walking 2 tiles 0.264 / 0.246 ms against
# 0.274 / 0.249 for 1 tile (4 tiles: 0.274 / 0.263); the forward at 16 x 128 0.063 / 0.049 ms
# against 0.066 / 0.051 at 32 x 128 (session 18 saw the same: 0.0635 / 0.0494 vs 0.0664 / 0.0515).
LAUNCH_DEFAULTS: dict[str, dict[str, int]] = {
    "fwd": dict(BLOCK_L=16, BLOCK_D=128, num_warps=4),
    "bwd_du": dict(BLOCK_L=32, BLOCK_D=128, num_warps=4),
    # STEPS: tiles of positions a pass-2 program walks (its taps loaded, its partials stored once)
    "bwd_dx": dict(BLOCK_L=64, BLOCK_D=128, num_warps=4, STEPS=2),
    # the sums of pass 2's dweight / dbias partials: (rows of partials, channels) a step. Session
    # 12, b8 l2048: the backward 0.319 ms at 32 x 32, 0.320 at 64 x 32, 0.330 - 0.362 at the other
    # tiles tried (16 x 32, 32 x 64, 64 x 128, 32 x 128)
    "wgrad": dict(BLOCK_R=32, BLOCK_D=32, num_warps=4),
}
LAUNCH_OVERRIDES: dict[str, dict[str, int]] = {}

# Whether pass 1 stores du in the inputs' 16-bit dtype (halving its write and pass 2's read)
# instead of fp32. fp32 inputs always keep fp32. Pass 2 forms dx, dweight and dbias from the
# stored copy, so each gets du's rounding once (2^-9 relative in bf16), summed in fp32. On an H200
# (bf16, the D=768 block's conv, session 12, when dweight and dbias still came from pass 1's fp32
# du): the backward 0.319 -> 0.296 ms at b8 l2048 and 0.284 -> 0.264 at b64 l197; dx moved by
# 2.7e-3 relative to the fp32-du result (scripts/bench_conv.py --du-dtype both).
DU_IN_INPUT_DTYPE = True


def _options(kind: str, dim: int) -> dict[str, int]:
    """One launch kind's options (defaults, then overrides); BLOCK_D no wider than the channels."""
    opts = dict(LAUNCH_DEFAULTS[kind], **LAUNCH_OVERRIDES.get(kind, {}))
    opts["BLOCK_D"] = min(opts["BLOCK_D"], next_power_of_2(dim))
    return opts


def _tile(kind: str, dim: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_D, num_warps) of one of the position-tiled launches."""
    opts = _options(kind, dim)
    return opts["BLOCK_L"], opts["BLOCK_D"], opts["num_warps"]


@triton.jit
def _input_at(x_ptr, init_ptr, b, pos, offs_c, x_cols, c_mask, seqlen,
              s_xb, s_xl, s_xd, s_ib, s_id, s_ij,
              WIDTH: tl.constexpr, HAS_INIT: tl.constexpr):
    """in(pos) for a vector of times ``pos`` (BLOCK_L,) and channels (BLOCK_D,), fp32. Channel c
    of x lives at column x_cols[c] (= c unless a column map is used)."""
    from_x = (pos >= 0) & (pos < seqlen)
    val = tl.load(x_ptr + b * s_xb + pos[:, None] * s_xl + x_cols[None, :] * s_xd,
                  mask=from_x[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        from_init = (pos < 0) & (pos >= -(WIDTH - 1))
        init_val = tl.load(init_ptr + b * s_ib + offs_c[None, :] * s_id
                           + (pos + WIDTH - 1)[:, None] * s_ij,
                           mask=from_init[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        val += init_val
    return val


@triton.jit
def _segment_at(seg_ptr, b, pos, seqlen, s_sb, s_sl):
    """Segment id of each time in ``pos``; times before 0 belong to segment 0."""
    inside = (pos >= 0) & (pos < seqlen)
    return tl.load(seg_ptr + b * s_sb + tl.minimum(tl.maximum(pos, 0), seqlen - 1) * s_sl,
                   mask=inside, other=0)


@triton.jit
def _preactivation(x_ptr, init_ptr, w_ptr, bias_ptr, seg_ptr, b, t, offs_c, x_cols, c_mask, seqlen,
                   s_xb, s_xl, s_xd, s_ib, s_id, s_ij, s_wd, s_wk, s_sb, s_sl,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, WIDTH: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """u[t, c] for a tile of times t (BLOCK_L,) and channels (BLOCK_D,), fp32."""
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SEQ:
        seg_t = _segment_at(seg_ptr, b, t, seqlen, s_sb, s_sl)
    for k in tl.static_range(WIDTH):
        src = t - (WIDTH - 1) + k
        val = _input_at(x_ptr, init_ptr, b, src, offs_c, x_cols, c_mask, seqlen,
                        s_xb, s_xl, s_xd, s_ib, s_id, s_ij, WIDTH, HAS_INIT)
        if HAS_SEQ:
            same = _segment_at(seg_ptr, b, src, seqlen, s_sb, s_sl) == seg_t
            val = tl.where(same[:, None], val, 0.0)
        w_k = tl.load(w_ptr + offs_c * s_wd + k * s_wk, mask=c_mask, other=0.0).to(tl.float32)
        acc += val * w_k[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, init_ptr, w_ptr, bias_ptr, seg_ptr, colmap_ptr, y_ptr,
    seqlen, dim,
    s_xb, s_xl, s_xd, s_ib, s_id, s_ij, s_wd, s_wk, s_sb, s_sl, s_yb, s_yl, s_yd,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    HAS_COLMAP: tl.constexpr, VEC: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = offs_c < dim
    x_cols = mapped_columns(colmap_ptr, offs_c, c_mask, HAS_COLMAP, VEC)
    u = _preactivation(x_ptr, init_ptr, w_ptr, bias_ptr, seg_ptr, b, t, offs_c, x_cols, c_mask,
                       seqlen,
                       s_xb, s_xl, s_xd, s_ib, s_id, s_ij, s_wd, s_wk, s_sb, s_sl,
                       BLOCK_L, BLOCK_D, WIDTH, HAS_BIAS, HAS_INIT, HAS_SEQ)
    if SILU:
        u = u * tl.sigmoid(u)
    tl.store(y_ptr + b * s_yb + t[:, None] * s_yl + offs_c[None, :] * s_yd,
             u.to(y_ptr.dtype.element_ty), mask=(t < seqlen)[:, None] & c_mask[None, :])


@triton.jit
def _conv_bwd_du_kernel(
    x_ptr, init_ptr, w_ptr, bias_ptr, seg_ptr, colmap_ptr, dy_ptr, du_ptr,
    seqlen, dim,
    s_xb, s_xl, s_xd, s_ib, s_id, s_ij, s_wd, s_wk, s_sb, s_sl, s_dyb, s_dyl, s_dyd,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_COLMAP: tl.constexpr, VEC: tl.constexpr,
):
    """Pass 1 of the backward (with SiLU; without it du = dy and this pass is skipped), per tile
    of outputs t: du = dy * silu'(u), u recomputed, stored (b, l, d) contiguous. Elementwise: the
    weight-gradient sums are pass 2's, which reads du at every shift anyway."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = offs_c < dim
    x_cols = mapped_columns(colmap_ptr, offs_c, c_mask, HAS_COLMAP, VEC)
    t_ok = t < seqlen
    dy = tl.load(dy_ptr + b * s_dyb + t[:, None] * s_dyl + offs_c[None, :] * s_dyd,
                 mask=t_ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    u = _preactivation(x_ptr, init_ptr, w_ptr, bias_ptr, seg_ptr, b, t, offs_c, x_cols, c_mask,
                       seqlen, s_xb, s_xl, s_xd, s_ib, s_id, s_ij, s_wd, s_wk, s_sb, s_sl,
                       BLOCK_L, BLOCK_D, WIDTH, HAS_BIAS, HAS_INIT, HAS_SEQ)
    sig = tl.sigmoid(u)
    du = dy * sig * (1.0 + u * (1.0 - sig))
    tl.store(du_ptr + (b * seqlen + t[:, None]) * dim + offs_c[None, :],
             du.to(du_ptr.dtype.element_ty), mask=t_ok[:, None] & c_mask[None, :])


@triton.jit
def _conv_bwd_dx_kernel(
    du_ptr, x_ptr, init_ptr, w_ptr, seg_ptr, colmap_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    seqlen, dim, first_pos, out_first_pos, first_part, n_parts_l,
    s_dub, s_dul, s_dud, s_xb, s_xl, s_xd, s_ib, s_id, s_ij, s_wd, s_wk, s_sb, s_sl,
    s_dxb, s_dxl, s_dxd,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, STEPS: tl.constexpr, WIDTH: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_COLMAP: tl.constexpr, VEC: tl.constexpr,
):
    """Pass 2, per STEPS tiles of input positions s = first_pos + tile (stored at row
    s - out_first_pos of dx; with first_pos = out_first_pos = -(w-1), one tile, the gradient of
    the initial state, rows 0..w-2 of (b, w-1, d)). With t = s + shift, the output that reads s
    through tap k = w-1-shift, and du masked to same(s, t):

        dx[s]         = sum_k weight[:, k] du[t]
        dw_part[k]    = sum_s in(s) du[t]        (dweight[:, k] = sum over the programs' partials)
        db_part       = sum_s du[s]              (shift 0)

    Each position s of [-(w-1), seqlen) belongs to exactly one tile of the two launches (``keep``),
    so every (t, k) pair of dweight is counted once. The taps are loaded and the partial sums
    stored once per program: both change layout through shared memory (a 1-D load or reduction
    is not laid out like the tile's columns), so STEPS tiles a program pay that once."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = offs_c < dim
    cols = mapped_columns(colmap_ptr, offs_c, c_mask, HAS_COLMAP, VEC)
    taps = ()        # taps[shift] = weight[:, w-1-shift]
    dw_sums = ()     # dw_sums[shift]: this program's partial of dweight[:, w-1-shift]
    for shift in tl.static_range(WIDTH):
        taps = taps + (tl.load(w_ptr + offs_c * s_wd + (WIDTH - 1 - shift) * s_wk, mask=c_mask,
                               other=0.0).to(tl.float32),)
        dw_sums = dw_sums + (tl.zeros((BLOCK_D,), dtype=tl.float32),)
    db_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for step in range(STEPS):
        s = first_pos + (pid_l * STEPS + step) * BLOCK_L + tl.arange(0, BLOCK_L)
        if first_pos < 0:
            keep = s < 0
        else:
            keep = s < seqlen
        # in(s) on this launch's positions only (a position outside both x and the initial
        # state reads 0)
        x_s = _input_at(x_ptr, init_ptr, b, tl.where(keep, s, -WIDTH), offs_c, cols, c_mask,
                        seqlen, s_xb, s_xl, s_xd, s_ib, s_id, s_ij, WIDTH, HAS_INIT)
        if HAS_SEQ:
            seg_s = _segment_at(seg_ptr, b, s, seqlen, s_sb, s_sl)
        dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        new_sums = ()
        for shift in tl.static_range(WIDTH):
            t = s + shift
            t_ok = (t >= 0) & (t < seqlen)
            du = tl.load(du_ptr + b * s_dub + t[:, None] * s_dul + offs_c[None, :] * s_dud,
                         mask=t_ok[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
            if HAS_SEQ:
                same = _segment_at(seg_ptr, b, t, seqlen, s_sb, s_sl) == seg_s
                du = tl.where(same[:, None], du, 0.0)
            dx += du * taps[shift][None, :]
            new_sums = new_sums + (dw_sums[shift] + tl.sum(x_s * du, axis=0),)
            if shift == 0:
                # (keep matters in the initial state's launch: its one tile runs past s = 0 into
                # positions whose du the other launch sums)
                db_sum += tl.sum(tl.where(keep[:, None], du, 0.0), axis=0)
        dw_sums = new_sums
        tl.store(dx_ptr + b * s_dxb + (s - out_first_pos)[:, None] * s_dxl
                 + cols[None, :] * s_dxd, dx.to(dx_ptr.dtype.element_ty),
                 mask=keep[:, None] & c_mask[None, :])
    part = first_part + b * n_parts_l + pid_l
    for shift in tl.static_range(WIDTH):
        tl.store(dw_part_ptr + (part * WIDTH + WIDTH - 1 - shift) * dim + offs_c, dw_sums[shift],
                 mask=c_mask)
    tl.store(db_part_ptr + part * dim + offs_c, db_sum, mask=c_mask)


@triton.jit
def _conv_wgrad_sum_kernel(
    dw_part_ptr, db_part_ptr, dw_ptr, db_ptr, n_parts, dim, s_wd, s_wk,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """dweight[c, k] = sum_r dw_part[r, k, c] and dbias[c] = sum_r db_part[r, c] over the
    (batch x tile) partials r of pass 1, in a fixed order (the same inputs give the same bits),
    stored in the parameters' dtypes through their strides. One launch instead of two torch
    reductions, a transpose and two casts."""
    offs_c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = offs_c < dim
    offs_r = tl.arange(0, BLOCK_R)
    for k in tl.static_range(WIDTH):
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, n_parts, BLOCK_R):
            r = r0 + offs_r
            acc += tl.load(dw_part_ptr + (r[:, None] * WIDTH + k) * dim + offs_c[None, :],
                           mask=(r < n_parts)[:, None] & c_mask[None, :], other=0.0)
        tl.store(dw_ptr + offs_c * s_wd + k * s_wk,
                 tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty), mask=c_mask)
    if HAS_BIAS:
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, n_parts, BLOCK_R):
            r = r0 + offs_r
            acc += tl.load(db_part_ptr + r[:, None] * dim + offs_c[None, :],
                           mask=(r < n_parts)[:, None] & c_mask[None, :], other=0.0)
        tl.store(db_ptr + offs_c, tl.sum(acc, axis=0).to(db_ptr.dtype.element_ty), mask=c_mask)


def conv_forward(x, weight, bias, initial_state, segments, silu, colmap=None, colmap_vec=1):
    """Launch the forward. x (b,l,·): channel c is column colmap[c] of x (or c); the number of
    channels is weight.shape[0]. Returns y (b,l,d) contiguous in x.dtype."""
    batch, seqlen = x.shape[:2]
    dim, width = weight.shape
    y = torch.empty(batch, seqlen, dim, device=x.device, dtype=x.dtype)
    block_l, block_d, warps = _tile("fwd", dim)
    init = initial_state if initial_state is not None else x
    s_init = initial_state.stride() if initial_state is not None else (0, 0, 0)
    seg = segments if segments is not None else x
    s_seg = segments.stride() if segments is not None else (0, 0)
    launch(_conv_fwd_kernel, (cdiv(seqlen, block_l), cdiv(dim, block_d), batch),
        x, init, weight, bias if bias is not None else weight, seg,
        colmap if colmap is not None else weight, y,
        seqlen, dim, *x.stride(), *s_init, *weight.stride(), *s_seg, *y.stride(),
        BLOCK_L=block_l, BLOCK_D=block_d, WIDTH=width, HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None, HAS_SEQ=segments is not None, SILU=silu,
        HAS_COLMAP=colmap is not None, VEC=colmap_vec, num_warps=warps)
    return y


def conv_backward(dy, x, weight, bias, initial_state, segments, silu, colmap=None, dx_out=None,
                  need_init_grad=True, colmap_vec=1):
    """Launch the backward. Returns (dx, dweight, dbias, d_initial_state). With ``dx_out`` the
    input gradient is written into it (at the columns colmap gives) instead of a new tensor."""
    batch, seqlen = x.shape[:2]
    dim, width = weight.shape
    dev = x.device
    init = initial_state if initial_state is not None else x
    s_init = initial_state.stride() if initial_state is not None else (0, 0, 0)
    seg = segments if segments is not None else x
    s_seg = segments.stride() if segments is not None else (0, 0)
    cols = colmap if colmap is not None else weight
    if silu:  # pass 1: du = dy * silu'(u)
        du_dtype = (x.dtype if DU_IN_INPUT_DTYPE and x.dtype in (torch.float16, torch.bfloat16)
                    else torch.float32)
        du = torch.empty(batch, seqlen, dim, device=dev, dtype=du_dtype)
        block_l, block_d, warps = _tile("bwd_du", dim)
        launch(_conv_bwd_du_kernel, (cdiv(seqlen, block_l), cdiv(dim, block_d), batch),
            x, init, weight, bias if bias is not None else weight, seg, cols, dy, du, seqlen, dim,
            *x.stride(), *s_init, *weight.stride(), *s_seg, *dy.stride(),
            BLOCK_L=block_l, BLOCK_D=block_d, WIDTH=width, HAS_BIAS=bias is not None,
            HAS_INIT=initial_state is not None, HAS_SEQ=segments is not None,
            HAS_COLMAP=colmap is not None, VEC=colmap_vec, num_warps=warps)
    else:  # without the activation du is dy itself, read through its strides
        du = dy

    # pass 2: dx and the weight-gradient partials, over [0, seqlen) and, with an initial state,
    # its w-1 positions in one more tile per row (which also gives the state's gradient)
    dx = dx_out if dx_out is not None else torch.empty(batch, seqlen, dim, device=dev,
                                                       dtype=x.dtype)
    block_l, block_d, warps = _tile("bwd_dx", dim)
    steps = _options("bwd_dx", dim)["STEPS"]
    n_d = cdiv(dim, block_d)
    n_tiles = cdiv(seqlen, block_l * steps)  # programs along the positions, one partial each
    with_init = initial_state is not None and width > 1
    n_parts = batch * (n_tiles + with_init)
    dw_part = torch.empty(n_parts, width, dim, device=dev, dtype=torch.float32)
    db_part = torch.empty(n_parts, dim, device=dev, dtype=torch.float32)
    common = (*du.stride(), *x.stride(), *s_init, *weight.stride(), *s_seg)
    launch(_conv_bwd_dx_kernel, (n_tiles, n_d, batch),
        du, x, init, weight, seg, cols, dx, dw_part, db_part, seqlen, dim, 0, 0, 0, n_tiles,
        *common, *dx.stride(),
        BLOCK_L=block_l, BLOCK_D=block_d, STEPS=steps, WIDTH=width,
        HAS_INIT=initial_state is not None, HAS_SEQ=segments is not None,
        HAS_COLMAP=colmap is not None, VEC=colmap_vec, num_warps=warps)
    d_init = None
    if with_init:
        d_init_rows = torch.empty(batch, width - 1, dim, device=dev, dtype=torch.float32)
        launch(_conv_bwd_dx_kernel, (1, n_d, batch),
            du, x, init, weight, seg, weight, d_init_rows, dw_part, db_part,
            seqlen, dim, -(width - 1), -(width - 1), batch * n_tiles, 1,
            *common, *d_init_rows.stride(),
            BLOCK_L=max(16, next_power_of_2(width - 1)), BLOCK_D=block_d, STEPS=1, WIDTH=width,
            HAS_INIT=True, HAS_SEQ=segments is not None, HAS_COLMAP=False, VEC=1, num_warps=4)
        if need_init_grad:
            d_init = d_init_rows.transpose(1, 2).to(initial_state.dtype).contiguous()
    elif initial_state is not None and need_init_grad:  # width 1: the state is never read
        d_init = initial_state.new_zeros(initial_state.shape)
    dw = torch.empty(dim, width, device=dev, dtype=weight.dtype)
    db = torch.empty(dim, device=dev, dtype=bias.dtype) if bias is not None else None
    opts = _options("wgrad", dim)
    launch(_conv_wgrad_sum_kernel, (cdiv(dim, opts["BLOCK_D"]),),
           dw_part, db_part, dw, db if db is not None else dw, n_parts, dim, *dw.stride(),
           WIDTH=width, HAS_BIAS=bias is not None, **opts)
    return dx, dw, db, d_init


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (namespace ``matmamba``): opaque to torch.compile (no graph break),
# with fake functions for tracing and the hand-written backward as the autograd formula. Eager
# calls take an autograd.Function over the same implementation (no dispatcher round trips).
# ----------------------------------------------------------------------------------------------


def _empty0(like: Tensor) -> Tensor:
    """Placeholder for an optional output that is absent (custom ops cannot return None)."""
    return like.new_empty((0,))


def _causal_conv1d_fwd_impl(x, weight, bias, initial_state, segments, silu):
    """y (b,l,d) contiguous in x.dtype; x may be any strided (b,l,d) view."""
    return conv_forward(x, weight, bias, initial_state, segments, silu)


causal_conv1d_fwd_op = torch.library.custom_op(
    "matmamba::causal_conv1d_fwd", _causal_conv1d_fwd_impl, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, Tensor? segments, "
           "bool silu) -> Tensor")


@causal_conv1d_fwd_op.register_fake
def _causal_conv1d_fwd_fake(x, weight, bias, initial_state, segments, silu):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0])


def _causal_conv1d_bwd_impl(dy, x, weight, bias, initial_state, segments, silu, need_init_grad):
    """-> (dx, dweight, dbias, d initial_state); absent ones are (0,) tensors."""
    dx, dw, db, d_init = conv_backward(dy, x, weight, bias, initial_state, segments, silu,
                                       need_init_grad=need_init_grad)
    return (dx, dw, db if db is not None else _empty0(x),
            d_init if d_init is not None else _empty0(x))


causal_conv1d_bwd_op = torch.library.custom_op(
    "matmamba::causal_conv1d_bwd", _causal_conv1d_bwd_impl, mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor? initial_state, "
           "Tensor? segments, bool silu, bool need_init_grad) -> (Tensor, Tensor, Tensor, Tensor)")


@causal_conv1d_bwd_op.register_fake
def _causal_conv1d_bwd_fake(dy, x, weight, bias, initial_state, segments, silu, need_init_grad):
    batch, seqlen = x.shape[:2]
    has_init = initial_state is not None and need_init_grad
    return (x.new_empty(batch, seqlen, weight.shape[0]), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape) if bias is not None else _empty0(x),
            initial_state.new_empty(initial_state.shape) if has_init else _empty0(x))


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, segments, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, segments)
    ctx.silu = silu


def _conv_grads(ctx, grad_outputs, backward_op):
    (dy,) = grad_outputs
    x, weight, bias, initial_state, segments = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_init = initial_state is not None and needs[3]
    dx, dw, db, d_init = backward_op(dy, x, weight, bias, initial_state, segments, ctx.silu,
                                     need_init)
    return (dx if needs[0] else None, dw if needs[1] else None,
            db if bias is not None and needs[2] else None, d_init if need_init else None,
            None, None)


_causal_conv1d = differentiable_triton_op(
    "causal_conv1d", causal_conv1d_fwd_op, _causal_conv1d_fwd_impl, _causal_conv1d_bwd_impl,
    _conv_setup_context, _conv_grads)


def causal_conv1d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = "silu",
    seq_idx: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
):
    """Causal depthwise conv1d (+ SiLU) on Triton; contract of ``matmamba.ops.causal_conv1d``.
    x (b,l,d) may be a strided view (no copy is made). Returns y (b,l,d) contiguous in x.dtype
    [, final_state (b,d,w-1) in x.dtype]."""
    batch, seqlen, dim, width, use_silu = check_conv1d_inputs(
        x, weight, bias, activation, seq_idx, initial_state)
    if x.dtype == torch.float64:
        raise TypeError("causal_conv1d_triton runs in float32, float16 or bfloat16; use "
                        "impl='torch' or 'naive' for float64")
    segments = segment_ids(seq_idx) if seq_idx is not None else None
    y = _causal_conv1d(x, weight, bias, initial_state, segments, use_silu)
    if not return_final_state:
        return y
    history = width - 1
    past = (initial_state.transpose(1, 2).to(x.dtype) if initial_state is not None
            else x.new_zeros(batch, history, dim))
    last_inputs = torch.cat([past, x], dim=1)[:, seqlen:]            # (b, w-1, d)
    if segments is not None:
        seg_padded = torch.cat([segments.new_zeros(batch, history), segments], dim=1)[:, seqlen:]
        keep = (seg_padded == segments[:, -1:]).to(x.dtype)
        last_inputs = last_inputs * keep[:, :, None]
    return y, last_inputs.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Decode step
# ----------------------------------------------------------------------------------------------


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr, col_ptr, dim,
    s_xb, s_xd, s_sb, s_sd, s_sj, s_wd, s_wk, s_yb, s_yd,
    BLOCK_D: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    HAS_COLMAP: tl.constexpr,
):
    """y = act(bias + sum_{k<w-1} w[:,k] state[:,k] + w[:,w-1] x); state <- [state[:,1:], x].
    HAS_COLMAP: channel c of x is column col[c] of x's rows (the block's in_proj output)."""
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = offs_c < dim
    x_cols = offs_c
    if HAS_COLMAP:
        x_cols = tl.load(col_ptr + offs_c, mask=c_mask, other=0)
    x_new = tl.load(x_ptr + b * s_xb + x_cols * s_xd, mask=c_mask, other=0.0)
    acc = x_new.to(tl.float32) * tl.load(w_ptr + offs_c * s_wd + (WIDTH - 1) * s_wk,
                                         mask=c_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    state_row = state_ptr + b * s_sb + offs_c * s_sd
    for k in tl.static_range(WIDTH - 1):
        past = tl.load(state_row + k * s_sj, mask=c_mask, other=0.0)
        acc += past.to(tl.float32) * tl.load(w_ptr + offs_c * s_wd + k * s_wk, mask=c_mask,
                                             other=0.0).to(tl.float32)
        if k > 0:
            tl.store(state_row + (k - 1) * s_sj, past, mask=c_mask)
    if WIDTH > 1:
        tl.store(state_row + (WIDTH - 2) * s_sj, x_new.to(state_ptr.dtype.element_ty),
                 mask=c_mask)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * s_yb + offs_c * s_yd, acc.to(y_ptr.dtype.element_ty), mask=c_mask)


def conv_update(x, conv_state, weight, bias, silu, colmap=None):
    """One decode step; conv_state (b,d,w-1) (any strides) is updated in place. -> y (b,d).
    ``colmap`` (d,) int32: channel c is column colmap[c] of x (b, any); default: x is (b, d)."""
    batch, dim = x.shape[0], weight.shape[0]
    width = weight.shape[1]
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    block_d = min(1024, next_power_of_2(dim))
    launch(_conv_update_kernel, (batch, cdiv(dim, block_d)),
        x, conv_state, weight, bias if bias is not None else weight, y,
        colmap if colmap is not None else weight, dim,
        *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(),
        BLOCK_D=block_d, WIDTH=width, HAS_BIAS=bias is not None, SILU=silu,
        HAS_COLMAP=colmap is not None, num_warps=4)
    return y


def _causal_conv1d_update_impl(x, conv_state, weight, bias, silu):
    """The custom op's body: the public op's update, x (b, d)."""
    return conv_update(x, conv_state, weight, bias, silu)


causal_conv1d_update_op = torch.library.custom_op(
    "matmamba::causal_conv1d_update", _causal_conv1d_update_impl, mutates_args=("conv_state",),
    schema="(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu) -> Tensor")


@causal_conv1d_update_op.register_fake
def _causal_conv1d_update_fake(x, conv_state, weight, bias, silu):
    return x.new_empty(x.shape)


def causal_conv1d_update_triton(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = "silu",
):
    """One decode step on Triton; conv_state (b,d,w-1) updated in place. Returns y (b,d).

    A decode step is not differentiated: when autograd would need to track it, this falls back
    to the torch implementation."""
    *_, use_silu = check_conv1d_update_inputs(x, conv_state, weight, bias, activation)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias)):
        from .torch_impl import causal_conv1d_update_torch
        return causal_conv1d_update_torch(x, conv_state, weight, bias, activation=activation)
    update = (torch.ops.matmamba.causal_conv1d_update.default if torch.compiler.is_compiling()
              else _causal_conv1d_update_impl)
    return update(x, conv_state, weight, bias, use_silu)
