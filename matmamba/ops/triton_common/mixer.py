"""The middle of a (nested) Mamba2 block as one autograd node on the Triton kernels:

    zxbcdt (in_proj output) -> causal conv1d + SiLU over [B, C, x] -> SSD scan -> gated RMSNorm

Why one node: composed from separate ops, the block slices z, x, B, C and dt out of the in_proj
output (copies and a ``cat`` for the conv input), and in the backward autograd turns every slice's
gradient into a zero-filled full-size tensor and adds them up. On an H200 that glue took about
1.3 ms of the 4.9 ms of kernels in a D=768, b=8, l=2048 block forward+backward. Here:

- the conv reads its channels straight out of ``zxbcdt`` through a column map (no copy, no cat),
  the norm reads z the same way;
- the backward allocates the gradient of ``zxbcdt`` once and every kernel writes its own columns
  of it: the norm writes dz, the scan writes d dt (and its dx, dB, dC go into the conv output's
  gradient), the conv's dx pass writes the B, C and x columns. The dt columns of heads the width
  does not use are zeroed (their gradient is 0).

Layout of ``zxbcdt`` ("interleaved", the one matmamba.models.block uses; every width a prefix)::

    [ B (G*N) | C (G*N) | dt (H_total) | z_0 x_0 | z_1 x_1 | ... | z_{k-1} x_{k-1} ]     (P each)

Semantics are exactly those of composing the ops (see ``mamba2_mixer_core_reference``)::

    xBC = silu(conv1d([B, C, x], conv_weight, conv_bias))          per-channel causal, width w
    y   = ssd_scan(x', dt, A, B', C', D=D, dt_bias, softplus, dt_limit, seq_idx)
    out = gated_rmsnorm(y, z, norm_weight, eps, norm_before_gate)   over the k*P used channels
"""

from __future__ import annotations

import math

import torch

from ..conv1d.triton_impl import _segment_ids, conv_backward, conv_forward
from ..rmsnorm.triton_impl import rmsnorm_backward, rmsnorm_forward
from ..ssd.triton_impl import _chunk_length, _ssd_backward, _ssd_forward

Tensor = torch.Tensor

_COLUMN_MAPS: dict = {}


def _map_vector_width(gn: int, nheads_total: int, headdim: int, row_stride: int) -> int:
    """Largest v in (8, 4, 2, 1) such that every aligned group of v channels maps to v
    consecutive, v-aligned columns of zxbcdt (for both maps): 2GN, the head area's start, P and
    the row stride must all be multiples of v."""
    for v in (8, 4, 2):
        if all(n % v == 0 for n in (2 * gn, 2 * gn + nheads_total, headdim, row_stride)):
            return v
    return 1


def _column_maps(device, gn: int, nheads_total: int, headdim: int, k: int):
    """(conv channel -> column, z channel -> column) int32 maps for the interleaved layout."""
    key = (str(device), gn, nheads_total, headdim, k)
    maps = _COLUMN_MAPS.get(key)
    if maps is None:
        heads_start = 2 * gn + nheads_total
        within = torch.arange(k * headdim, device=device)
        head, p = within // headdim, within % headdim
        x_cols = heads_start + head * 2 * headdim + headdim + p
        z_cols = heads_start + head * 2 * headdim + p
        conv_cols = torch.cat([torch.arange(2 * gn, device=device), x_cols])
        maps = (conv_cols.to(torch.int32), z_cols.to(torch.int32))
        _COLUMN_MAPS[key] = maps
    return maps


class _Mamba2CoreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, segments, cfg):
        ngroups, dstate, headdim, nheads_total, k, eps, norm_before_gate, dt_lo, dt_hi, Q = cfg
        batch, seqlen, width_cols = zxbcdt.shape
        gn = ngroups * dstate
        conv_cols, z_cols = _column_maps(zxbcdt.device, gn, nheads_total, headdim, k)
        vec = _map_vector_width(gn, nheads_total, headdim, width_cols)
        conv_out = conv_forward(zxbcdt, conv_weight, conv_bias, None, segments, True, conv_cols,
                                colmap_vec=vec)
        B = conv_out[..., :gn].unflatten(-1, (ngroups, dstate))
        C = conv_out[..., gn:2 * gn].unflatten(-1, (ngroups, dstate))
        x = conv_out[..., 2 * gn:].unflatten(-1, (k, headdim))
        dt = zxbcdt[..., 2 * gn:2 * gn + k]
        y, _, (dtp, lam, CB, entering) = _ssd_forward(
            x, dt, A, B, C, D, dt_bias, None, segments, True, dt_lo, dt_hi, Q)
        y2 = y.view(batch * seqlen, k * headdim)
        z2 = zxbcdt.view(batch * seqlen, width_cols)
        out, rstd = rmsnorm_forward(y2, z2, norm_weight, eps, norm_before_gate, k * headdim, z_cols,
                                    zmap_vec=vec)
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, segments,
                              conv_out, y, rstd, dtp, lam, CB, entering)
        ctx.cfg = cfg
        return out.view(batch, seqlen, k * headdim)

    @staticmethod
    def backward(ctx, d_out):
        (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, segments,
         conv_out, y, rstd, dtp, lam, CB, entering) = ctx.saved_tensors
        ngroups, dstate, headdim, nheads_total, k, eps, norm_before_gate, dt_lo, dt_hi, Q = ctx.cfg
        batch, seqlen, width_cols = zxbcdt.shape
        gn = ngroups * dstate
        conv_cols, z_cols = _column_maps(zxbcdt.device, gn, nheads_total, headdim, k)
        vec = _map_vector_width(gn, nheads_total, headdim, width_cols)
        d_zxbcdt = torch.empty_like(zxbcdt)
        if nheads_total > k:
            d_zxbcdt[..., 2 * gn + k:2 * gn + nheads_total].zero_()

        # norm: dz into d_zxbcdt's z columns, dy for the scan
        d_out2 = d_out.reshape(batch * seqlen, k * headdim)
        dy, _, d_norm_weight = rmsnorm_backward(
            d_out2, y.view(batch * seqlen, k * headdim), zxbcdt.view(batch * seqlen, width_cols),
            norm_weight, rstd, norm_before_gate, k * headdim, z_cols,
            dz_out=d_zxbcdt.view(batch * seqlen, width_cols), zmap_vec=vec)

        # scan: d dt into d_zxbcdt, dx / dB / dC into the conv output's gradient
        d_conv_out = torch.empty_like(conv_out)
        B = conv_out[..., :gn].unflatten(-1, (ngroups, dstate))
        C = conv_out[..., gn:2 * gn].unflatten(-1, (ngroups, dstate))
        x = conv_out[..., 2 * gn:].unflatten(-1, (k, headdim))
        dt = zxbcdt[..., 2 * gn:2 * gn + k]
        saved = (x, dt, A, B, C, D, dt_bias, None, segments, dtp, lam, CB, entering)
        needs = {"A": ctx.needs_input_grad[4], "D": ctx.needs_input_grad[5],
                 "dt_bias": ctx.needs_input_grad[3]}
        outs = {"dx": d_conv_out[..., 2 * gn:].unflatten(-1, (k, headdim)),
                "ddt": d_zxbcdt[..., 2 * gn:2 * gn + k],
                "dB": d_conv_out[..., :gn].unflatten(-1, (ngroups, dstate)),
                "dC": d_conv_out[..., gn:2 * gn].unflatten(-1, (ngroups, dstate))}
        _, _, dA, _, _, dD, d_dt_bias, _ = _ssd_backward(
            dy.view(batch, seqlen, k, headdim), None, saved, True, dt_lo, dt_hi, Q, needs, out=outs)

        # conv: dx into d_zxbcdt's B, C and x columns
        _, d_conv_weight, d_conv_bias, _ = conv_backward(
            d_conv_out, zxbcdt, conv_weight, conv_bias, None, segments, True, conv_cols,
            dx_out=d_zxbcdt, colmap_vec=vec)
        return (d_zxbcdt, d_conv_weight, d_conv_bias, d_dt_bias, dA, dD, d_norm_weight, None, None)


# torch.compile: graph break here; the Triton launches run eagerly (their autograd intact).
@torch.compiler.disable
def mamba2_mixer_core_triton(
    zxbcdt: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    dt_bias: Tensor,
    A: Tensor,
    D: Tensor | None,
    norm_weight: Tensor,
    *,
    ngroups: int,
    dstate: int,
    headdim: int,
    nheads_total: int,
    eps: float = 1e-5,
    norm_before_gate: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    seq_idx: Tensor | None = None,
) -> Tensor:
    """conv1d+SiLU -> SSD scan (softplus dt) -> gated RMSNorm, from the in_proj output.

    zxbcdt (b, l, 2GN + H_total + 2kP) in the interleaved layout (module docstring), last axis
    contiguous; the width's head count k is read off its last axis. conv_weight (2GN + kP, w),
    conv_bias (2GN + kP,), dt_bias / A (k,), D (k,) or (k, P), norm_weight (kP,).
    Returns (b, l, kP) in zxbcdt.dtype, with one backward for all of it.
    """
    batch, seqlen, width_cols = zxbcdt.shape
    gn = ngroups * dstate
    k, rest = divmod(width_cols - 2 * gn - nheads_total, 2 * headdim)
    if rest or k < 1 or k > nheads_total:
        raise ValueError(f"zxbcdt's last axis ({width_cols}) must be 2*G*N + H_total + 2*k*P = "
                         f"{2 * gn} + {nheads_total} + 2*k*{headdim} for some 1 <= k <= {nheads_total}")
    if conv_weight.shape[0] != 2 * gn + k * headdim:
        raise ValueError(f"conv_weight must have 2*G*N + k*P = {2 * gn + k * headdim} rows; got "
                         f"{conv_weight.shape[0]}")
    if zxbcdt.stride(-1) != 1 or zxbcdt.stride(0) != seqlen * zxbcdt.stride(1):
        zxbcdt = zxbcdt.contiguous()
    segments = _segment_ids(seq_idx) if seq_idx is not None else None
    dt_lo, dt_hi = (float(v) for v in dt_limit)
    cfg = (ngroups, dstate, headdim, nheads_total, k, float(eps), bool(norm_before_gate),
           dt_lo, dt_hi, _chunk_length())
    return _Mamba2CoreFunction.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight,
                                     segments, cfg)


def mamba2_mixer_core_reference(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, *,
                                ngroups, dstate, headdim, nheads_total, eps=1e-5,
                                norm_before_gate=False, dt_limit=(0.0, math.inf), seq_idx=None,
                                impl="naive"):
    """The same computation composed from the public ops (the oracle of the tests)."""
    from matmamba import ops
    batch, seqlen, width_cols = zxbcdt.shape
    gn = ngroups * dstate
    k = (width_cols - 2 * gn - nheads_total) // (2 * headdim)
    heads = zxbcdt[..., 2 * gn + nheads_total:].unflatten(-1, (k, 2, headdim))
    z, x = heads[..., 0, :].reshape(batch, seqlen, k * headdim), heads[..., 1, :].reshape(batch, seqlen, k * headdim)
    xBC = torch.cat([zxbcdt[..., :2 * gn], x], dim=-1)
    conv_out = ops.causal_conv1d(xBC, conv_weight, conv_bias, activation="silu", seq_idx=seq_idx, impl=impl)
    B = conv_out[..., :gn].unflatten(-1, (ngroups, dstate))
    C = conv_out[..., gn:2 * gn].unflatten(-1, (ngroups, dstate))
    xs = conv_out[..., 2 * gn:].unflatten(-1, (k, headdim))
    y = ops.ssd_scan(xs, zxbcdt[..., 2 * gn:2 * gn + k], A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True,
                     dt_limit=dt_limit, seq_idx=seq_idx, impl=impl)
    return ops.gated_rmsnorm(y.reshape(batch, seqlen, k * headdim), z, norm_weight, eps=eps,
                             norm_before_gate=norm_before_gate, impl=impl)
