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

from ..conv1d.triton_impl import conv_backward, conv_forward, conv_update
from ..rmsnorm.triton_impl import rmsnorm_backward, rmsnorm_forward
from ..state_update.triton_impl import state_update
from ..ssd.triton_impl import (_chunk_length, _ssd_backward, _ssd_forward, pack_factor,
                               scan_intermediates_fake)
from .custom_ops import differentiable_triton_op, segment_ids

Tensor = torch.Tensor

_COLUMN_MAPS: dict = {}

# Whether the backward hands the scan its output gradient dy in fp32 instead of y's (16-bit)
# dtype. fp32 lowers the error of the single-head sums dD and d dt_bias a little (on the CPU in
# fp16, by 6-16%), but on an H200 (D768 b8 l2048, bf16) it made the per-group dB/dC kernel 1.78x
# slower (0.383 -> 0.680 ms) and the norm's backward 1.39x (0.155 -> 0.216 ms): +0.44 ms of
# 3.1 ms of GPU time per forward + backward. Those single-head sums are ill-conditioned in 16 bits
# whatever computes them (scripts/gpu_check.py compares against the 16-bit baselines), so the
# default is off. scripts/profile_block.py --variant core_dy_fp32 measures the other setting.
SCAN_DY_IN_FP32 = False


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


# ----------------------------------------------------------------------------------------------
# The fused core as torch.library custom ops (namespace ``matmamba``): one opaque node for
# torch.compile (no graph break), with fake functions for tracing and the hand-written backward
# as the autograd formula. The forward op also returns what the backward reads (conv output, scan
# output, 1/rms, dt', Lam, CB, entering states), marked non-differentiable. Eager calls take an
# autograd.Function over the same implementation (no dispatcher round trips).
# ----------------------------------------------------------------------------------------------

_CORE_CFG = ("int ngroups, int dstate, int headdim, int nheads_total, float eps, "
             "bool norm_before_gate, float dt_lo, float dt_hi, int chunk, int pack")


def _views(conv_out, zxbcdt, ngroups, dstate, headdim, k):
    """B, C, x inside the conv output and dt inside zxbcdt (views)."""
    gn = ngroups * dstate
    B = conv_out[..., :gn].unflatten(-1, (ngroups, dstate))
    C = conv_out[..., gn:2 * gn].unflatten(-1, (ngroups, dstate))
    x = conv_out[..., 2 * gn:].unflatten(-1, (k, headdim))
    dt = zxbcdt[..., 2 * gn:2 * gn + k]
    return B, C, x, dt


def _core_fwd_impl(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, segments, ngroups,
                   dstate, headdim, nheads_total, eps, norm_before_gate, dt_lo, dt_hi, chunk,
                   pack):
    """-> (out (b,l,kP), conv_out, y, rstd, dt', Lam, CB, entering)."""
    batch, seqlen, width_cols = zxbcdt.shape
    gn = ngroups * dstate
    k = dt_bias.shape[0]
    conv_cols, z_cols = _column_maps(zxbcdt.device, gn, nheads_total, headdim, k)
    vec = _map_vector_width(gn, nheads_total, headdim, width_cols)
    conv_out = conv_forward(zxbcdt, conv_weight, conv_bias, None, segments, True, conv_cols,
                            colmap_vec=vec)
    B, C, x, dt = _views(conv_out, zxbcdt, ngroups, dstate, headdim, k)
    y, _, (dtp, lam, CB, entering) = _ssd_forward(
        x, dt, A, B, C, D, dt_bias, None, segments, True, dt_lo, dt_hi, chunk, pack)
    y2 = y.view(batch * seqlen, k * headdim)
    z2 = zxbcdt.view(batch * seqlen, width_cols)
    out, rstd = rmsnorm_forward(y2, z2, norm_weight, eps, norm_before_gate, k * headdim, z_cols,
                                zmap_vec=vec)
    return out.view(batch, seqlen, k * headdim), conv_out, y, rstd, dtp, lam, CB, entering


mamba2_mixer_core_fwd_op = torch.library.custom_op(
    "matmamba::mamba2_mixer_core_fwd", _core_fwd_impl, mutates_args=(),
    schema="(Tensor zxbcdt, Tensor conv_weight, Tensor? conv_bias, Tensor dt_bias, Tensor A, "
           "Tensor? D, Tensor norm_weight, Tensor? segments, " + _CORE_CFG
           + ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@mamba2_mixer_core_fwd_op.register_fake
def _mamba2_mixer_core_fwd_fake(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight,
                                segments, ngroups, dstate, headdim, nheads_total, eps,
                                norm_before_gate, dt_lo, dt_hi, chunk, pack):
    batch, seqlen, _ = zxbcdt.shape
    gn = ngroups * dstate
    k = dt_bias.shape[0]
    f32 = dict(device=zxbcdt.device, dtype=torch.float32)
    return (zxbcdt.new_empty(batch, seqlen, k * headdim),
            zxbcdt.new_empty(batch, seqlen, 2 * gn + k * headdim),
            zxbcdt.new_empty(batch, seqlen, k, headdim),
            torch.empty(batch * seqlen, 1, **f32),
            *scan_intermediates_fake(batch, seqlen, k, headdim, ngroups, dstate, chunk, pack,
                                     zxbcdt.dtype, zxbcdt.device))


def _core_bwd_impl(d_out, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, segments,
                   conv_out, y, rstd, dtp, lam, CB, entering, ngroups, dstate, headdim,
                   nheads_total, eps, norm_before_gate, dt_lo, dt_hi, chunk, pack):
    """-> (d zxbcdt, d conv_weight, d conv_bias, d dt_bias, dA, dD, d norm_weight); absent
    optional inputs get (0,) tensors."""
    batch, seqlen, width_cols = zxbcdt.shape
    gn = ngroups * dstate
    k = dt_bias.shape[0]
    conv_cols, z_cols = _column_maps(zxbcdt.device, gn, nheads_total, headdim, k)
    vec = _map_vector_width(gn, nheads_total, headdim, width_cols)
    d_zxbcdt = torch.empty_like(zxbcdt)
    if nheads_total > k:
        d_zxbcdt[..., 2 * gn + k:2 * gn + nheads_total].zero_()

    # norm: dz into d_zxbcdt's z columns; dy for the scan in y's dtype (see SCAN_DY_IN_FP32)
    d_out2 = d_out.reshape(batch * seqlen, k * headdim)
    if d_out2.stride(-1) != 1:
        d_out2 = d_out2.contiguous()
    dy, _, d_norm_weight = rmsnorm_backward(
        d_out2, y.view(batch * seqlen, k * headdim), zxbcdt.view(batch * seqlen, width_cols),
        norm_weight, rstd, norm_before_gate, k * headdim, z_cols,
        dz_out=d_zxbcdt.view(batch * seqlen, width_cols), zmap_vec=vec,
        dx_dtype=torch.float32 if SCAN_DY_IN_FP32 else None)

    # scan: d dt into d_zxbcdt, dx / dB / dC into the conv output's gradient
    d_conv_out = torch.empty_like(conv_out)
    B, C, x, dt = _views(conv_out, zxbcdt, ngroups, dstate, headdim, k)
    saved = (x, dt, A, B, C, D, dt_bias, None, segments, dtp, lam, CB, entering)
    needs = {"A": True, "D": True, "dt_bias": True}
    dB_out, dC_out, dx_out, ddt_out = _views(d_conv_out, d_zxbcdt, ngroups, dstate, headdim, k)
    outs = {"dx": dx_out, "ddt": ddt_out, "dB": dB_out, "dC": dC_out}
    _, _, dA, _, _, dD, d_dt_bias, _ = _ssd_backward(
        dy.view(batch, seqlen, k, headdim), None, saved, True, dt_lo, dt_hi, chunk, needs,
        out=outs, pack=pack)

    # conv: dx into d_zxbcdt's B, C and x columns
    _, d_conv_weight, d_conv_bias, _ = conv_backward(
        d_conv_out, zxbcdt, conv_weight, conv_bias, None, segments, True, conv_cols,
        dx_out=d_zxbcdt, colmap_vec=vec)
    return (d_zxbcdt, d_conv_weight,
            d_conv_bias if d_conv_bias is not None else zxbcdt.new_empty((0,)),
            d_dt_bias, dA, dD if dD is not None else zxbcdt.new_empty((0,)), d_norm_weight)


mamba2_mixer_core_bwd_op = torch.library.custom_op(
    "matmamba::mamba2_mixer_core_bwd", _core_bwd_impl, mutates_args=(),
    schema="(Tensor d_out, Tensor zxbcdt, Tensor conv_weight, Tensor? conv_bias, Tensor dt_bias, "
           "Tensor A, Tensor? D, Tensor norm_weight, Tensor? segments, Tensor conv_out, Tensor y, "
           "Tensor rstd, Tensor dtp, Tensor lam, Tensor CB, Tensor entering, " + _CORE_CFG
           + ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@mamba2_mixer_core_bwd_op.register_fake
def _mamba2_mixer_core_bwd_fake(d_out, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight,
                                segments, conv_out, y, rstd, dtp, lam, CB, entering, ngroups,
                                dstate, headdim, nheads_total, eps, norm_before_gate, dt_lo,
                                dt_hi, chunk, pack):
    return (torch.empty_like(zxbcdt), conv_weight.new_empty(conv_weight.shape),
            conv_bias.new_empty(conv_bias.shape) if conv_bias is not None else zxbcdt.new_empty((0,)),
            dt_bias.new_empty(dt_bias.shape), A.new_empty(A.shape),
            D.new_empty(D.shape) if D is not None else zxbcdt.new_empty((0,)),
            norm_weight.new_empty(norm_weight.shape))


def _core_setup_context(ctx, inputs, output):
    (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, segments, *cfg) = inputs
    _, conv_out, y, rstd, dtp, lam, CB, entering = output
    ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, segments,
                          conv_out, y, rstd, dtp, lam, CB, entering)
    ctx.cfg = tuple(cfg)
    ctx.mark_non_differentiable(conv_out, y, rstd, dtp, lam, CB, entering)
    ctx.set_materialize_grads(False)


def _core_grads(ctx, grad_outputs, backward_op):
    d_out = grad_outputs[0]  # the rest are non-differentiable intermediates
    saved = ctx.saved_tensors
    if d_out is None:
        return (None,) * 18
    conv_bias, D = saved[2], saved[5]
    grads = backward_op(d_out, *saved, *ctx.cfg)
    d_zxbcdt, d_conv_weight, d_conv_bias, d_dt_bias, dA, dD, d_norm_weight = grads
    needs = ctx.needs_input_grad
    return (d_zxbcdt if needs[0] else None, d_conv_weight if needs[1] else None,
            d_conv_bias if conv_bias is not None and needs[2] else None,
            d_dt_bias if needs[3] else None, dA if needs[4] else None,
            dD if D is not None and needs[5] else None, d_norm_weight if needs[6] else None,
            *(None,) * 11)


_mamba2_mixer_core = differentiable_triton_op(
    "mamba2_mixer_core", mamba2_mixer_core_fwd_op, _core_fwd_impl, _core_bwd_impl,
    _core_setup_context, _core_grads)


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
    head_cols = width_cols - 2 * gn - nheads_total
    k, rest = head_cols // (2 * headdim), head_cols % (2 * headdim)  # (Dynamo: no divmod)
    if rest or k < 1 or k > nheads_total:
        raise ValueError(f"zxbcdt's last axis ({width_cols}) must be 2*G*N + H_total + 2*k*P = "
                         f"{2 * gn} + {nheads_total} + 2*k*{headdim} for some 1 <= k <= {nheads_total}")
    if conv_weight.shape[0] != 2 * gn + k * headdim:
        raise ValueError(f"conv_weight must have 2*G*N + k*P = {2 * gn + k * headdim} rows; got "
                         f"{conv_weight.shape[0]}")
    if zxbcdt.stride(-1) != 1 or zxbcdt.stride(0) != seqlen * zxbcdt.stride(1):
        zxbcdt = zxbcdt.contiguous()
    if dt_bias.shape != (k,) or A.shape != (k,):
        raise ValueError(f"dt_bias and A must be (k,) = ({k},) for the {k} heads zxbcdt holds; got "
                         f"{tuple(dt_bias.shape)} and {tuple(A.shape)}")
    segments = segment_ids(seq_idx) if seq_idx is not None else None
    dt_lo, dt_hi = (float(v) for v in dt_limit)
    chunk = _chunk_length()
    # the scan reads x, B, C in the conv's (contiguous) output and dt in zxbcdt, whose rows follow
    # each other (made so above), so short rows can be packed (ssd.triton_impl.pack_factor)
    pack = pack_factor(batch, seqlen, chunk, k) if segments is None else 1
    return _mamba2_mixer_core(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, segments, ngroups,
                dstate, headdim, nheads_total, float(eps), bool(norm_before_gate), dt_lo, dt_hi,
                chunk, pack)[0]


def mamba2_decode_core_triton(
    zxbcdt: Tensor,
    conv_state: Tensor,
    ssm_state: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    dt_bias: Tensor,
    A_log: Tensor,
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
) -> Tensor:
    """One decode step of the same core, from the in_proj output of one token, in three launches:
    the conv update reads B, C and x out of ``zxbcdt`` through the column map, the state update
    takes A = -exp(A_log) and reads dt out of ``zxbcdt`` by strides, the gated norm reads z
    through the column map. Composed from the public ops the step also copies x and z out of
    the interleaved layout, concatenates the conv input and computes A: 11 launches a block
    instead of 5 (with the two projections), which bound a graphed decode step at batch 1.

    zxbcdt (b, 2GN + H_total + 2kP) in the interleaved layout, rows contiguous; conv_state
    (b, 2GN + kP, w - 1) and ssm_state (b, k, P, N), any strides, updated in place (the width's
    prefixes of the inference cache); the parameters as for ``mamba2_mixer_core_triton``, with
    A_log (k,) for A. Not differentiable (decoding): returns (b, kP) in zxbcdt.dtype.
    """
    batch, width_cols = zxbcdt.shape
    gn = ngroups * dstate
    k = dt_bias.shape[0]
    if width_cols != 2 * gn + nheads_total + 2 * k * headdim or zxbcdt.stride(-1) != 1:
        raise ValueError(f"zxbcdt must be (batch, 2*G*N + H_total + 2*k*P = "
                         f"{2 * gn + nheads_total + 2 * k * headdim}) with a contiguous last axis; "
                         f"got {tuple(zxbcdt.shape)} with strides {zxbcdt.stride()}")
    conv_cols, z_cols = _column_maps(zxbcdt.device, gn, nheads_total, headdim, k)
    xBC = conv_update(zxbcdt, conv_state, conv_weight, conv_bias, True, colmap=conv_cols)
    B = xBC[:, :gn].unflatten(-1, (ngroups, dstate))
    C = xBC[:, gn:2 * gn].unflatten(-1, (ngroups, dstate))
    x = xBC[:, 2 * gn:].unflatten(-1, (k, headdim))
    dt = zxbcdt[:, 2 * gn:2 * gn + k]
    y = state_update(ssm_state, x, dt, A_log, B, C, D, dt_bias, True, float(dt_limit[0]),
                     float(dt_limit[1]), a_is_log=True)
    vec = _map_vector_width(gn, nheads_total, headdim, zxbcdt.stride(0))
    out, _ = rmsnorm_forward(y.view(batch, k * headdim), zxbcdt, norm_weight, float(eps),
                             bool(norm_before_gate), k * headdim, z_cols, zmap_vec=vec)
    return out


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
