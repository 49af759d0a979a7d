"""Single-token SSD state update (decoding) in Triton.

For each batch row and head (group g = head // (nheads // ngroups))::

    dt'   = clamp(softplus(dt + dt_bias) or dt + dt_bias, lo, hi)
    state = exp(dt' A) state + dt' x B^T            (P x N, fp32, in place)
    y     = state C + D x

One program per (batch row, head, block of P rows): it reads its state block once, writes it
once, and reads x, B, C, dt once. This step is bound by the bytes of the state
(2 x b x h x P x N x 4 bytes per step); the kernel does nothing else.

A decode step is not differentiated: when autograd would need to track it, this falls back to
the torch implementation.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ssd.triton_impl import _softplus
from ..triton_common.launch import cdiv, launch, next_power_of_2
from .naive import check_state_update_inputs

Tensor = torch.Tensor


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, y_ptr,
    nheads, heads_per_group, headdim, dstate, dt_lo, dt_hi,
    s_sb, s_sh, s_sp, s_sn,
    s_xb, s_xh, s_xp,
    s_dtb, s_dth,
    s_bb, s_bg, s_bn,
    s_cb, s_cg, s_cn,
    s_yb, s_yh, s_yp,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, A_IS_LOG: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_mask = offs_p < headdim
    n_mask = offs_n < dstate
    pn_mask = p_mask[:, None] & n_mask[None, :]

    dt = tl.load(dt_ptr + b * s_dtb + h * s_dth).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(dt_bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    A = tl.load(A_ptr + h).to(tl.float32)
    if A_IS_LOG:  # A_ptr holds A_log: A = -exp(A_log), the block's parameterisation
        A = -tl.exp(A)
    decay = tl.exp(dt * A)

    x = tl.load(x_ptr + b * s_xb + h * s_xh + offs_p * s_xp, mask=p_mask, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + b * s_bb + g * s_bg + offs_n * s_bn, mask=n_mask, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + b * s_cb + g * s_cg + offs_n * s_cn, mask=n_mask, other=0.0).to(tl.float32)
    state_ptrs = state_ptr + b * s_sb + h * s_sh + offs_p[:, None] * s_sp + offs_n[None, :] * s_sn
    state = tl.load(state_ptrs, mask=pn_mask, other=0.0).to(tl.float32)
    state = decay * state + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=pn_mask)
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        if D_PER_CHANNEL:
            y += x * tl.load(D_ptr + h * headdim + offs_p, mask=p_mask, other=0.0).to(tl.float32)
        else:
            y += x * tl.load(D_ptr + h).to(tl.float32)
    tl.store(y_ptr + b * s_yb + h * s_yh + offs_p * s_yp, y.to(y_ptr.dtype.element_ty),
             mask=p_mask)


def state_update(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_lo, dt_hi, a_is_log=False):
    """One decode step; ``state`` (b,h,p,n) (any strides) is updated in place. -> y (b,h,p).
    ``a_is_log``: ``A`` holds A_log (the kernel takes A = -exp(A_log))."""
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    y = torch.empty(batch, nheads, headdim, device=x.device, dtype=x.dtype)
    block_n = next_power_of_2(dstate)
    # About 4K state elements per program: a (P-block x N) tile.
    block_p = max(1, min(next_power_of_2(headdim), 4096 // block_n))
    launch(_state_update_kernel, (batch * nheads, cdiv(headdim, block_p)),
        state, x, dt, A, B, C, D if D is not None else A, dt_bias if dt_bias is not None else A, y,
        nheads, nheads // ngroups, headdim, dstate, dt_lo, dt_hi,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(),
        BLOCK_P=block_p, BLOCK_N=block_n, HAS_D=D is not None,
        D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, A_IS_LOG=a_is_log, num_warps=4)
    return y


def _ssd_state_update_impl(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_lo, dt_hi):
    """The custom op's body: the public op's update, with A itself."""
    return state_update(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_lo, dt_hi)


# A torch.library custom op: opaque to torch.compile (no graph break). Eager calls run the
# implementation directly (no dispatcher round trip).
ssd_state_update_op = torch.library.custom_op(
    "matmamba::ssd_state_update", _ssd_state_update_impl, mutates_args=("state",),
    schema="(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
           "Tensor? dt_bias, bool dt_softplus, float dt_lo, float dt_hi) -> Tensor")


@ssd_state_update_op.register_fake
def _ssd_state_update_fake(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_lo, dt_hi):
    return x.new_empty(x.shape)


def ssd_state_update_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> Tensor:
    """One decode step on Triton; contract of ``matmamba.ops.ssd_state_update``. ``state``
    (b,h,p,n) is updated in place (any strides); returns y (b,h,p) in x.dtype."""
    check_state_update_inputs(state, x, dt, A, B, C, D, dt_bias, dt_limit)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, dt, A, B, C, D, dt_bias)):
        from .torch_impl import ssd_state_update_torch
        return ssd_state_update_torch(state, x, dt, A, B, C, D=D, dt_bias=dt_bias,
                                      dt_softplus=dt_softplus, dt_limit=dt_limit)
    dt_lo, dt_hi = (float(v) for v in dt_limit)
    update = (torch.ops.matmamba.ssd_state_update.default if torch.compiler.is_compiling()
              else _ssd_state_update_impl)
    return update(state, x, dt, A, B, C, D, dt_bias, bool(dt_softplus), dt_lo, dt_hi)
