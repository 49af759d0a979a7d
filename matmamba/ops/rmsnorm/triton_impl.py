"""Gated RMSNorm in Triton: forward and hand-written backward.

Per row and per group of ``group_size`` channels (default: the whole row), s(z) = silu(z)::

    norm_before_gate=False (Mamba2):  v = x s(z);  r = rsqrt(mean(v^2) + eps);  out = v r w
    norm_before_gate=True:            v = x;       r = rsqrt(mean(v^2) + eps);  out = v r w s(z)

Backward, with n = v r the normalised values and g_n the gradient reaching n::

    False: g_n = dout w;          dw = sum_rows dout n
    True:  g_n = dout w s(z);     dw = sum_rows dout s(z) n;   dz = dout n w s'(z)
    dv = r (g_n - n mean(g_n n))      (the RMSNorm Jacobian, per group)
    False: dx = dv s(z);  dz = dv x s'(z)         True: dx = dv
    s'(z) = sig(z) (1 + z (1 - sig(z)))

One program handles a run of rows for one group; it keeps 1/rms per (row, group) for the
backward and accumulates dw over its rows into a small fp32 partial buffer summed on the host.
x and z may be strided views (last axis contiguous): rows are addressed with their own stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common.custom_ops import differentiable_triton_op
from ..triton_common.columns import mapped_columns
from ..triton_common.launch import cdiv, launch, next_power_of_2
from .naive import check_rmsnorm_inputs

Tensor = torch.Tensor


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr, z_ptr, zmap_ptr, w_ptr, out_ptr, rstd_ptr,
    n_rows, rows_per_program, group_size, n_groups, eps,
    s_xr, s_zr, s_or,
    BLOCK: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_ZMAP: tl.constexpr, VEC: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    cols = grp * group_size + tl.arange(0, BLOCK)
    col_mask = tl.arange(0, BLOCK) < group_size
    z_cols = mapped_columns(zmap_ptr, cols, col_mask, HAS_ZMAP, VEC)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row0 in range(row_start, row_end, ROWS):
        rows = row0 + tl.arange(0, ROWS)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        v = tl.load(x_ptr + rows[:, None] * s_xr + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] * s_zr + z_cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            gate = z * tl.sigmoid(z)
            if not NORM_BEFORE_GATE:
                v = v * gate
        rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / group_size + eps)
        out = v * rstd[:, None] * w[None, :]
        if HAS_Z:
            if NORM_BEFORE_GATE:
                out = out * gate
        tl.store(out_ptr + rows[:, None] * s_or + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(rstd_ptr + rows * n_groups + grp, rstd, mask=rows < row_end)


@triton.jit
def _rmsnorm_bwd_gated_rows(x_ptr, z_ptr, w, rstd_ptr, dout_ptr, dx_ptr, dz_ptr, dw_part_ptr,
                            pid, grp, cols, z_cols, col_mask,
                            n_rows, rows_per_program, group_size, n_groups, dim,
                            s_xr, s_zr, s_dor, s_dxr, s_dzr, ROWS: tl.constexpr):
    """The backward for Mamba2's order (gate, then norm) in two phases around the row sum: phase 1
    reads x, z, dout and forms the sum and dw; phase 2 reads the same tile again (L1 / L2 hits) for
    dz and dx. Nothing but the row's scalars lives across the reduction: the one-phase body keeps
    the fp32 x, z, dout, gate, gate', n and g_n of every element, 168-255 registers a thread at 1-2
    rows of 2048 (Triton 3.6, sm_90a), this one 64 at one row and 8 warps. The two reads carry
    different eviction hints (keep for phase 2, then drop), which also keeps the compiler from
    merging them into one load. It keeps its own row loop (the kernel returns after it): as a
    per-tile helper inside the kernel's loop the same code compiled to 78 registers, 3 programs
    an SM (Triton 3.6, sm_90a)."""
    dw_acc = tl.zeros(w.shape, dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row0 in range(row_start, row_end, ROWS):
        rows = row0 + tl.arange(0, ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_mask[None, :]
        x_ptrs = x_ptr + rows[:, None] * s_xr + cols[None, :]
        dout_ptrs = dout_ptr + rows[:, None] * s_dor + cols[None, :]
        z_ptrs = z_ptr + rows[:, None] * s_zr + z_cols[None, :]
        rstd = tl.load(rstd_ptr + rows * n_groups + grp, mask=row_ok, other=0.0)
        # phase 1: v = x silu(z), n = v r, g_n = dout w; dw += dout n and the row's
        # mean(g_n n) = r^2 sum(dout w v) / G, kept as coef = r^2 S / G
        x = tl.load(x_ptrs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        dout = tl.load(dout_ptrs, mask=mask, other=0.0,
                       eviction_policy="evict_last").to(tl.float32)
        z = tl.load(z_ptrs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        dout_v = dout * x * (z * tl.sigmoid(z))
        coef = tl.sum(dout_v * w[None, :], axis=1) * rstd * rstd / group_size
        dw_acc += tl.sum(dout_v * rstd[:, None], axis=0)
        # phase 2, on the same tile read again (from L1 / L2): dv = r (g_n - n mean(g_n n))
        # = r (dout w - v coef), dz = dv x silu'(z), dx = dv silu(z)
        x = tl.load(x_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        dout = tl.load(dout_ptrs, mask=mask, other=0.0,
                       eviction_policy="evict_first").to(tl.float32)
        z = tl.load(z_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        sig = tl.sigmoid(z)
        gate = z * sig
        dv = rstd[:, None] * (dout * w[None, :] - x * gate * coef[:, None])
        tl.store(dz_ptr + rows[:, None] * s_dzr + z_cols[None, :],
                 (dv * x * (sig * (1.0 + z * (1.0 - sig)))).to(dz_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(dx_ptr + rows[:, None] * s_dxr + cols[None, :],
                 (dv * gate).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * dim + cols, dw_acc, mask=col_mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    x_ptr, z_ptr, zmap_ptr, w_ptr, rstd_ptr, dout_ptr, dx_ptr, dz_ptr, dw_part_ptr,
    n_rows, rows_per_program, group_size, n_groups, dim,
    s_xr, s_zr, s_dor, s_dxr, s_dzr,
    BLOCK: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_ZMAP: tl.constexpr, VEC: tl.constexpr, ROWS: tl.constexpr, RECOMPUTE: tl.constexpr,
):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    cols = grp * group_size + tl.arange(0, BLOCK)
    col_mask = tl.arange(0, BLOCK) < group_size
    z_cols = mapped_columns(zmap_ptr, cols, col_mask, HAS_ZMAP, VEC)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if RECOMPUTE:
        if HAS_Z and not NORM_BEFORE_GATE:
            _rmsnorm_bwd_gated_rows(x_ptr, z_ptr, w, rstd_ptr, dout_ptr, dx_ptr, dz_ptr,
                                    dw_part_ptr, pid, grp, cols, z_cols, col_mask,
                                    n_rows, rows_per_program, group_size, n_groups, dim,
                                    s_xr, s_zr, s_dor, s_dxr, s_dzr, ROWS)
            return
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row0 in range(row_start, row_end, ROWS):
        rows = row0 + tl.arange(0, ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * s_xr + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + rows[:, None] * s_dor + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows * n_groups + grp, mask=row_ok, other=0.0)[:, None]
        v = x
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] * s_zr + z_cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            gate_grad = sig * (1.0 + z * (1.0 - sig))
            if not NORM_BEFORE_GATE:
                v = x * gate
        n = v * rstd
        if HAS_Z and NORM_BEFORE_GATE:
            g_n = dout * w[None, :] * gate
            dw_acc += tl.sum(dout * gate * n, axis=0)
            tl.store(dz_ptr + rows[:, None] * s_dzr + z_cols[None, :],
                     (dout * n * w[None, :] * gate_grad).to(dz_ptr.dtype.element_ty), mask=mask)
        else:
            g_n = dout * w[None, :]
            dw_acc += tl.sum(dout * n, axis=0)
        dv = rstd * (g_n - n * (tl.sum(g_n * n, axis=1) / group_size)[:, None])
        if HAS_Z and not NORM_BEFORE_GATE:
            tl.store(dz_ptr + rows[:, None] * s_dzr + z_cols[None, :],
                     (dv * x * gate_grad).to(dz_ptr.dtype.element_ty), mask=mask)
            dx = dv * gate
        else:
            dx = dv
        tl.store(dx_ptr + rows[:, None] * s_dxr + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(dw_part_ptr + pid * dim + cols, dw_acc, mask=col_mask)


def _as_rows(t: Tensor) -> Tensor:
    """(..., d) -> (rows, d) with a contiguous last axis; a view whenever the strides allow."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _launch(n_rows: int, device: torch.device, n_groups: int,
            programs_per_sm: int = 4) -> tuple[int, int]:
    """(rows per program, programs): enough programs to fill the GPU, few dw partial rows."""
    target = programs_per_sm * (torch.cuda.get_device_properties(device).multi_processor_count
                                if device.type == "cuda" else 2)
    programs = max(1, min(n_rows, cdiv(target, n_groups)))
    rows_per_program = cdiv(max(n_rows, 1), programs)
    return rows_per_program, cdiv(max(n_rows, 1), rows_per_program)


def _warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8


# Rows a program normalises at once (a (ROWS, BLOCK) tile), warps, and programs an SM the grid
# aims at. Measured on an H200 (bf16, the block's layout, 16384 and 12608 rows of 1536, group
# 1536, scripts/bench_rmsnorm.py): one row at a time left each program waiting on one row's
# loads. The forward at 4 rows and 8 warps: 0.088-0.090 -> 0.056 ms (1.6x; 0.069 -> 0.046 at
# 12608 rows; session 10). The backward at 2 rows, 4 warps and 8 programs an SM: 0.223 -> 0.183
# ms (0.174 -> 0.144), and inside the block's profile 0.202 -> 0.169 ms with the block's GPU time
# 2.696 -> 2.652 ms, both in one visit (session 11). That launch asked for 8 programs an SM but
# compiled to 255 registers a thread, so only 2 fitted (ncu on an H100, session 17: 12.5%
# occupancy, 57% of DRAM bandwidth). Now (session 17, H100) the backward takes one row, 8 warps
# and the two-phase body (RECOMPUTE: x, z, dout read again after the row sum instead of kept):
# 64 registers, 4 programs an SM; 0.209 -> 0.179 ms (0.164 -> 0.142 at 12608 rows; the one-phase
# body at the same launch 0.183 / 0.145), inside the block's profile 0.194 -> 0.163 ms with its
# GPU time 2.575 -> 2.553 ms. Rows narrower than 1024 keep one row and the one-phase body (not
# measured). LAUNCH_OVERRIDES["fwd"] / ["bwd"] replace any of them for that kernel.
LAUNCH_OVERRIDES: dict[str, dict[str, int]] = {}


def _tile(block: int, kind: str) -> dict:
    opts = dict(ROWS=1, num_warps=_warps(block), programs_per_sm=4, RECOMPUTE=0)
    if block >= 1024:
        opts.update(dict(ROWS=4, num_warps=8) if kind == "fwd"
                    else dict(ROWS=1, num_warps=8, programs_per_sm=4, RECOMPUTE=1))
    opts.update(LAUNCH_OVERRIDES.get(kind, {}))
    return opts


def rmsnorm_forward(x2, z2, weight, eps, norm_before_gate, group_size, zmap=None, zmap_vec=1):
    """x2 (rows, d) with a contiguous last axis; z2 (rows, ·) or None: channel c of z is column
    zmap[c] (or c). Returns (out (rows, d) in x2.dtype, rstd (rows, groups) fp32)."""
    n_rows, dim = x2.shape
    n_groups = dim // group_size
    out = torch.empty(n_rows, dim, device=x2.device, dtype=x2.dtype)
    rstd = torch.empty(n_rows, n_groups, device=x2.device, dtype=torch.float32)
    block = next_power_of_2(group_size)
    tile = _tile(block, "fwd")
    rows_per_program, programs = _launch(n_rows, x2.device, n_groups, tile["programs_per_sm"])
    if n_rows > 0:
        launch(_rmsnorm_fwd_kernel, (programs, n_groups),
            x2, z2 if z2 is not None else x2, zmap if zmap is not None else x2, weight, out, rstd,
            n_rows, rows_per_program, group_size, n_groups, eps,
            x2.stride(0), z2.stride(0) if z2 is not None else 0, out.stride(0),
            BLOCK=block, HAS_Z=z2 is not None, NORM_BEFORE_GATE=norm_before_gate,
            HAS_ZMAP=zmap is not None, VEC=zmap_vec, ROWS=tile["ROWS"],
            num_warps=tile["num_warps"])
    return out, rstd


def rmsnorm_backward(dout2, x2, z2, weight, rstd, norm_before_gate, group_size, zmap=None,
                     dz_out=None, zmap_vec=1, dx_dtype=None):
    """Returns (dx (rows, d), dz or None, dweight). With ``dz_out`` (rows, ·) dz is written into
    it at the columns zmap gives. dx is in ``dx_dtype`` (default x2.dtype)."""
    n_rows, dim = x2.shape
    n_groups = dim // group_size
    has_z = z2 is not None
    dx = torch.empty(n_rows, dim, device=x2.device, dtype=dx_dtype or x2.dtype)
    if has_z:
        dz = dz_out if dz_out is not None else torch.empty(n_rows, dim, device=x2.device,
                                                           dtype=z2.dtype)
    else:
        dz = None
    block = next_power_of_2(group_size)
    tile = _tile(block, "bwd")
    rows_per_program, programs = _launch(n_rows, x2.device, n_groups, tile["programs_per_sm"])
    dw_part = torch.zeros(programs, dim, device=x2.device, dtype=torch.float32)
    if n_rows > 0:
        launch(_rmsnorm_bwd_kernel, (programs, n_groups),
            x2, z2 if has_z else x2, zmap if zmap is not None else x2, weight, rstd, dout2, dx,
            dz if has_z else dx, dw_part,
            n_rows, rows_per_program, group_size, n_groups, dim,
            x2.stride(0), z2.stride(0) if has_z else 0, dout2.stride(0), dx.stride(0),
            dz.stride(0) if has_z else 0,
            BLOCK=block, HAS_Z=has_z, NORM_BEFORE_GATE=norm_before_gate,
            HAS_ZMAP=zmap is not None, VEC=zmap_vec, ROWS=tile["ROWS"],
            RECOMPUTE=bool(tile["RECOMPUTE"]), num_warps=tile["num_warps"])
    return dx, dz, dw_part.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (namespace ``matmamba``): opaque to torch.compile (no graph break),
# with fake functions for tracing and the hand-written backward as the autograd formula. The
# forward op also returns 1/rms per (row, group), non-differentiable, for the backward. Eager
# calls take an autograd.Function over the same implementation (no dispatcher round trips).
# ----------------------------------------------------------------------------------------------


def _gated_rmsnorm_fwd_impl(x, z, weight, eps, norm_before_gate, group_size):
    """-> (out (x.shape, contiguous, x.dtype), rstd (rows, groups) fp32)."""
    x2 = _as_rows(x)
    z2 = _as_rows(z) if z is not None else None
    out, rstd = rmsnorm_forward(x2, z2, weight, eps, norm_before_gate, group_size)
    return out.view(x.shape), rstd


gated_rmsnorm_fwd_op = torch.library.custom_op(
    "matmamba::gated_rmsnorm_fwd", _gated_rmsnorm_fwd_impl, mutates_args=(),
    schema="(Tensor x, Tensor? z, Tensor weight, float eps, bool norm_before_gate, "
           "int group_size) -> (Tensor, Tensor)")


@gated_rmsnorm_fwd_op.register_fake
def _gated_rmsnorm_fwd_fake(x, z, weight, eps, norm_before_gate, group_size):
    dim = x.shape[-1]
    rows = x.numel() // dim if dim else 0
    return (x.new_empty(x.shape),
            torch.empty(rows, dim // group_size, device=x.device, dtype=torch.float32))


def _gated_rmsnorm_bwd_impl(dout, x, z, weight, rstd, norm_before_gate, group_size):
    """-> (dx, dz ((0,) without z), dweight)."""
    x2 = _as_rows(x)
    z2 = _as_rows(z) if z is not None else None
    dx, dz, dw = rmsnorm_backward(_as_rows(dout), x2, z2, weight, rstd, norm_before_gate,
                                  group_size)
    return dx.view(x.shape), dz.view(z.shape) if dz is not None else x.new_empty((0,)), dw


gated_rmsnorm_bwd_op = torch.library.custom_op(
    "matmamba::gated_rmsnorm_bwd", _gated_rmsnorm_bwd_impl, mutates_args=(),
    schema="(Tensor dout, Tensor x, Tensor? z, Tensor weight, Tensor rstd, "
           "bool norm_before_gate, int group_size) -> (Tensor, Tensor, Tensor)")


@gated_rmsnorm_bwd_op.register_fake
def _gated_rmsnorm_bwd_fake(dout, x, z, weight, rstd, norm_before_gate, group_size):
    return (x.new_empty(x.shape), z.new_empty(z.shape) if z is not None else x.new_empty((0,)),
            weight.new_empty(weight.shape))


def _rmsnorm_setup_context(ctx, inputs, output):
    x, z, weight, eps, norm_before_gate, group_size = inputs
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.config = (norm_before_gate, group_size)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _rmsnorm_grads(ctx, grad_outputs, backward_op):
    dout, _d_rstd = grad_outputs  # rstd is non-differentiable
    x, z, weight, rstd = ctx.saved_tensors
    norm_before_gate, group_size = ctx.config
    if dout is None:
        return None, None, None, None, None, None
    dx, dz, dw = backward_op(dout, x, z, weight, rstd, norm_before_gate, group_size)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, dz if z is not None and needs[1] else None,
            dw if needs[2] else None, None, None, None)


_gated_rmsnorm = differentiable_triton_op(
    "gated_rmsnorm", gated_rmsnorm_fwd_op, _gated_rmsnorm_fwd_impl, _gated_rmsnorm_bwd_impl,
    _rmsnorm_setup_context, _rmsnorm_grads)


def gated_rmsnorm_triton(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    *,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
    group_size: int | None = None,
) -> Tensor:
    """Gated RMSNorm on Triton; contract of ``matmamba.ops.gated_rmsnorm``. x, z (..., d) may
    be strided views; the result is contiguous in x.dtype."""
    group_size = check_rmsnorm_inputs(x, z, weight, group_size)
    if x.dtype == torch.float64:
        raise TypeError("gated_rmsnorm_triton runs in float32, float16 or bfloat16; use "
                        "impl='torch' or 'naive' for float64")
    return _gated_rmsnorm(x, z, weight, float(eps), bool(norm_before_gate), group_size)[0]
