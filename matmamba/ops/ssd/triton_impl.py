"""SSD (Mamba2) chunked scan in Triton, forward and hand-written backward.

Notation, per batch row b and head h (group g = h // (nheads // ngroups) gives B and C); the
sequence is cut into chunks of Q positions; inside chunk c, t and s are positions 0..Q-1::

    dt'_t   = clamp(softplus(dt_t + dt_bias) or dt_t + dt_bias, lo, hi)      (0 on padding)
    a_t     = dt'_t A                       log-decay of one step (<= 0 for A < 0)
    Lam_t   = a_0 + ... + a_t               chunk-local cumulative log-decay ("Lambda")
    xt_s    = dt'_s x_s                     the input as written into the state
    L_ts    = exp(Lam_t - Lam_s)  for s <= t in the same sequence, else 0
    H0      = state entering the chunk (P x N), G = gradient w.r.t. the state leaving it

Forward (four launches, three in the sequential state form, which fuses K1 and K2)::

    K0  CB[t, s]   = C_t . B_s  (0 if t, s in different seqs)   per (b, chunk, group), fp32;
                     also dt', Lam and K1's weights exp(Lam_end - Lam_s) dt'_s of the group's heads
    K1  S_c        = sum_s exp(Lam_end - Lam_s) xt_s B_s^T      per (b, chunk, group, rows), fp32
    K2  H0_{c+1}   = exp(Lam_end_c) H0_c + S_c                  sequential over chunks, fp32
    K3  y_t        = exp(Lam_t) C_t H0^T + sum_s L_ts CB_ts xt_s + D x_t

K1 and B1 treat a group's heads and head channels as one flat index of rows (head * P + p): one
(rows x Q) @ (Q x N) product per block of rows, no head dim padded, B or C read once per block.
The sequential form (``_state_form``: where there are enough (b, group, row block) walks to fill
the GPU) runs K1+K2 as one walk over the chunks per row block with the state in registers, and
B1+B2 likewise: no chunk state goes through memory.

Backward (five launches; four in the sequential form, which fuses B1 and B2)::

    B1  dS_c       = sum_t exp(Lam_t) dy_t C_t^T                what chunk c's outputs ask of H0
                     per (b, chunk, group, rows), as K1
    B2  G_{c-1}    = exp(Lam_end_c) G_c + dS_c                  reverse pass;  d initial = G_{-1}
    B3  per head:  dxt_s = sum_t L_ts CB_ts dy_t + exp(Lam_end - Lam_s) G B_s
                   y'_t  = sum_s L_ts CB_ts xt_s + exp(Lam_t) C_t H0^T   (y without D x)
                   dLam_t = dy_t . y'_t - xt_t . dxt_t  (+ <G, H_end> at the chunk's last position)
                   da_s  = sum_{t >= s} dLam_t;  ddt'_s = x_s . dxt_s + A da_s;  dA = sum da dt'
                   dx_s  = dt'_s dxt_s + D dy_s
    B4  per group (loops over its heads, sums them):
                   W_ts  = sum_h L^h_ts (dy^h_t . xt^h_s)
                   dC_t  = W B + sum_h exp(Lam^h_t) dy^h_t H0^h
                   dB_s  = W^T C + sum_h exp(Lam^h_end - Lam^h_s) xt^h_s G^h
    B5  dB, dC summed over B4's head splits (in the inputs' dtype); dA, dD, d dt_bias over
        B3's per-(b, chunk) partials

With 16-bit inputs B4 runs in a flat form (MATMAMBA_SSD_BWD_DBDC: auto, flat, head): several heads
a program, L_ts factored as exp(Lam_t - r) exp(r - Lam_s) so that the heads share one product for
W (the comment above _chunk_bwd_dbdc_flat_kernel). The same factoring measured slower in B3
(session 20) and in K3 (session 22), where the per-head forms stay.

The identity behind dLam: Lam_t multiplies every term that C_t reads (so dLam_t gets C_t . dC_t,
which is dy_t . y'_t) and divides every term that xt_t writes (so it loses xt_t . dxt_t); the
chunk's end decay scales the whole leaving state, hence <G, H_end>. Written with the Q x Q matrix
Z_ts = L_ts CB_ts (dy_t . xt_s) the intra-chunk part is rowsum(Z)_t - colsum(Z)_t, the same sum.
The two forms round differently: the intra parts of dy . y' and xt . dxt are large and nearly
cancel (their sums over the chunk cancel exactly), so B3 forms both products from one set of
rounded operands and, with 16-bit operands, carries the fp32 scores to about 16 bits as the sum
of two 16-bit parts (without that, bf16 lost dA to 4e-2 against float64 on the H200).

Short rows are packed (``pack_factor``): a row of l tokens costs ceil(l / Q) whole chunks, so a
ViT-B/16 row of 197 tokens is 4 chunks of 64, a quarter of them padding. k rows of the batch are
then scanned as one row of k * l tokens (a view of the inputs, no copy) with segment ids that
start a new sequence at each original row, and the padding is paid once per k rows.

``seq_idx`` (packed sequences) zeroes every factor that crosses a change of sequence, exactly as
``matmamba.ops.ssd.chunked`` does: pairs in different sequences, contributions to the chunk state
from positions outside the chunk's last sequence, and the entering state for positions (and chunk
ends) in a later sequence than the position just before the chunk.

Matrix products run in the input dtype (bf16 / fp16 tensor cores, fp32 accumulation); for
float32 inputs they run in full fp32 ("ieee"). States, cumulative decays and all reductions are
fp32. The state entering each chunk is stored in the input dtype for the output and gradient
products (as mamba_ssm does).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..triton_common.custom_ops import differentiable_triton_op, segment_ids
from ..triton_common.launch import cdiv, launch, next_power_of_2
from .naive import check_ssd_inputs

Tensor = torch.Tensor

# Chunk length used by the kernels. The result does not depend on it (up to rounding); the
# ``chunk_size`` argument of ssd_scan is accepted for signature parity. 64 keeps every Q x Q tile
# in registers; MATMAMBA_SSD_CHUNK=128 trades bigger tiles for half the state traffic.
_DEFAULT_CHUNK = 64

# Whether the states entering each chunk (and, in the backward, the gradients of the states
# leaving it) are stored in the inputs' 16-bit dtype, as mamba_ssm does, or in fp32. The matrix
# products round them to 16 bits either way, so fp32 storage changes only B3's <G, H0> term (of
# dA) and doubles their traffic; on the H200 it did not change the one-head dA error
# (scripts/probe_precision.py, docs/performance.md session 9). A switch for such probes.
STATES_IN_INPUT_DTYPE = True


@torch.compiler.assume_constant_result  # under torch.compile: read once per trace
def _chunk_length() -> int:
    value = int(os.environ.get("MATMAMBA_SSD_CHUNK", _DEFAULT_CHUNK))
    if value not in (16, 32, 64, 128):
        raise ValueError(f"MATMAMBA_SSD_CHUNK must be 16, 32, 64 or 128; got {value}")
    return value


# Packing short rows (module docstring). Measured on an H200, bf16, fwd+bwd in a CUDA graph,
# h64 p24 n128 (session 13): b64 l197 (29.9% of the padded tokens padding) 1.424 ms as is, packed
# 2 / 4 / 8 / 16 / 32 / 64 rows to a row 1.390 / 1.323 / 1.292 / 1.225 / 1.258 / 1.349 ms, the
# rule's choice then (16) 1.207; the ViT block D768 graphed 2.440 -> 2.227 ms. The segment ids cost 3-8% on
# their own (b8 l2048: 1.445 -> 1.484 ms; b16 l577: 0.961 -> 1.035, where packing 4 rows, padding
# 10.9% -> 2.6%, still lost: 0.983), and rows of many chunks cost their state pass (b8 l2048 as
# one row: 1.662). So rows are packed only where that removes at least _PACK_MIN_SAVING of the
# padded tokens, into rows of at most _PACK_MAX_TOKENS.
_PACK_MIN_SAVING = 0.15
_PACK_MAX_TOKENS = 4096
# Packing trades rows for length, and the state walks run one per (row, head): with too few of them
# the GPU idles. On the H100 (session 23, graphed fwd+bwd, b64 l197 p24 n128, h64): packed 8 to a
# row 1.070 ms, 16 to a row 1.135, unpacked 1.182. The ViT block D768 b64 l197 graphed at widths
# 768 / 384 / 192 / 96 (h64 / 32 / 16 / 8), this rule (k8 / k4 / k1 / k1) against 16 to a row:
# 2.101 / 1.287 / 0.881 / 0.632 ms against 2.176 / 1.359 / 0.923 / 0.664 (unpacked 2.234 / 1.321 /
# 0.880 / 0.640). So packed rows x heads stays at least this.
_PACK_MIN_ROW_HEADS = 512


# B4's two forms, MATMAMBA_SSD_BWD_DBDC = "auto" (default: flat for 16-bit inputs, per-head for
# fp32), "flat" (several heads a program, the decay factored; see above
# _chunk_bwd_dbdc_flat_kernel) or "head" (one head at a time, B4's first form). Flat B4 against the
# per-head one on the H100 (session 21, bf16, the block's layout): 0.321 vs 0.346 ms at b8 l2048
# h64 p24, 0.276 vs 0.339 at ViT's b64 l197, 0.589 vs 0.662 at b32 l1024; the block D768 graphed
# 2.543 -> 2.523 ms at full width, 0.811 -> 0.775 at D/8. fp32 inputs, which are for checks
# rather than speed, keep the per-head form unless "flat" is asked for: fp32 operands double the
# flat form's shared memory. Where the flat form's tiles do not fit in an SM's shared memory
# (the compiler's figure depends on the call's specialization: 162 KB at the block's p = 24 in
# bf16, 229 KB for fp16 at p = 64 with segment ids), B4 runs per head (_bwd_dbdc). (Flat B3, the
# same factoring for dxt and y', measured 4-5% slower than the per-head B3 in session 20 and was
# removed in session 21.)
_BWD_DBDC_FORMS = ("auto", "flat", "head")
# (device, operand dtype, Q, block_p, block_n_full, segment ids) where flat B4 ran out of shared
# memory: B4 runs per head there from then on
_FLAT_B4_TOO_LARGE: set = set()
# Where a tile's largest span of Lam over a chunk is above this, the flat form computes the tile
# the exact way (the factors exp(+-span / 2) would leave fp32's range for small dy).
_FLAT_SPAN_LIMIT = 80.0


def _interpreting() -> bool:
    """Whether the kernels run under the Triton interpreter (its bf16 products are wrong: the flat
    form then widens its bf16 operands, ``_dot_bf16``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result  # under torch.compile: read once per trace
def _bwd_dbdc_setting() -> str:
    value = os.environ.get("MATMAMBA_SSD_BWD_DBDC", "auto").strip().lower() or "auto"
    if value not in _BWD_DBDC_FORMS:
        raise ValueError(f"MATMAMBA_SSD_BWD_DBDC must be one of {', '.join(_BWD_DBDC_FORMS)}; "
                         f"got {value!r}")
    return value


def _bwd_dbdc_form(dot_dtype) -> str:
    """B4's form for operands of ``dot_dtype``: "flat" or "head" (the flat one falls back to
    "head" where its tiles do not fit in shared memory, ``_bwd_dbdc``)."""
    setting = _bwd_dbdc_setting()
    if setting == "auto":
        return "head" if dot_dtype == tl.float32 else "flat"
    return setting


@torch.compiler.assume_constant_result  # under torch.compile: read once per trace
def _pack_setting() -> int:
    """MATMAMBA_SSD_PACK: "auto" (default; ``pack_factor`` decides), 0 or 1 (never pack), or k
    (always pack k rows, where the batch allows it: for tests and benchmarks)."""
    value = os.environ.get("MATMAMBA_SSD_PACK", "auto").strip().lower()
    if value in ("", "auto"):
        return -1
    if not value.isdigit():
        raise ValueError(f"MATMAMBA_SSD_PACK must be 'auto', 0 (off) or a row count k >= 1; got {value!r}")
    return int(value)


def _padded_tokens(batch: int, seqlen: int, k: int, Q: int) -> int:
    return (batch // k) * max(1, cdiv(k * seqlen, Q)) * Q


def pack_factor(batch: int, seqlen: int, Q: int, nheads: int) -> int:
    """How many rows of the batch the scan packs into one row (1: none). Rows are packed where
    that removes at least _PACK_MIN_SAVING of the padded tokens; k divides the batch, packed rows
    hold at most _PACK_MAX_TOKENS, the packed rows times nheads (the state walks) stay at least
    _PACK_MIN_ROW_HEADS, and of the k that pad least the largest is taken (b64 l197 h64: k = 8,
    1.5% padding). MATMAMBA_SSD_PACK overrides."""
    setting = _pack_setting()
    if setting >= 0:
        return setting if setting >= 1 and batch % setting == 0 else 1
    if torch.compiler.is_compiling():  # traced once per shape: no need for the memo
        return _best_pack_factor(batch, seqlen, Q, nheads)
    key = (batch, seqlen, Q, nheads)
    if key not in _PACK_FACTORS:  # (the search is a loop over the batch's divisors: ~10 us)
        _PACK_FACTORS[key] = _best_pack_factor(batch, seqlen, Q, nheads)
    return _PACK_FACTORS[key]


_PACK_FACTORS: dict = {}


def _best_pack_factor(batch: int, seqlen: int, Q: int, nheads: int) -> int:
    unpacked = _padded_tokens(batch, seqlen, 1, Q)
    best, best_tokens = 1, unpacked
    min_rows = cdiv(_PACK_MIN_ROW_HEADS, nheads)
    for k in range(2, batch + 1):
        if k * seqlen > _PACK_MAX_TOKENS or batch // k < min_rows:
            break
        if batch % k:
            continue
        tokens = _padded_tokens(batch, seqlen, k, Q)
        if tokens <= best_tokens:
            best, best_tokens = k, tokens
    return best if best_tokens <= (1 - _PACK_MIN_SAVING) * unpacked else 1


def _packable(t: Tensor) -> bool:
    """Whether (b, l, ...) -> (b / k, k * l, ...) is a view: rows follow each other in memory."""
    return t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)


def _check_pack(pack: int, batch: int, initial_state, seq_idx) -> None:
    if batch % pack:
        raise ValueError(f"ssd_scan (triton): pack={pack} must divide the batch ({batch})")
    if initial_state is not None or seq_idx is not None:
        raise ValueError("ssd_scan (triton): rows are packed only without initial_state and seq_idx "
                         "(pack_factor's caller checks); pass pack=1")


def _pack_rows(t: Tensor, k: int) -> Tensor:
    return t.view(t.shape[0] // k, k * t.shape[1], *t.shape[2:])


_PACKED_SEGMENTS: dict = {}


def _packed_segments(rows: int, k: int, seqlen: int, device) -> Tensor:
    """(rows, k * seqlen) int32 segment ids, i // seqlen (one tensor per shape, rows by stride 0)."""
    key = (str(device), k, seqlen)
    ids = _PACKED_SEGMENTS.get(key)
    if ids is None:
        ids = _PACKED_SEGMENTS[key] = torch.arange(k * seqlen, device=device, dtype=torch.int32) // seqlen
    return ids.expand(rows, k * seqlen)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the entering states (and the backward's G) are stored in: STATES_IN_INPUT_DTYPE."""
    return (dtype if STATES_IN_INPUT_DTYPE and dtype in (torch.float16, torch.bfloat16)
            else torch.float32)


def scan_intermediates_fake(batch, seqlen, nheads, headdim, ngroups, dstate, chunk, pack, dtype,
                            device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty tensors shaped like ``_ssd_forward``'s intermediates (dt', Lam, CB, entering
    states), which are in the scan's packed rows: the custom ops' fake functions return these."""
    rows, nchunks = batch // pack, max(1, cdiv(seqlen * pack, chunk))
    f32 = dict(device=device, dtype=torch.float32)
    return (torch.empty(rows, nheads, nchunks * chunk, **f32),
            torch.empty(rows, nheads, nchunks * chunk, **f32),
            torch.empty(rows, nchunks, ngroups, chunk, chunk, **f32),
            torch.empty(rows, nchunks, nheads, headdim, dstate, device=device, dtype=_state_dtype(dtype)))


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, next_power_of_2(n))


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_config(dtype: torch.dtype):
    """(operand dtype, input_precision) for tl.dot given the dtype of x."""
    if dtype in (torch.float16, torch.bfloat16):
        return _TL_DTYPE[dtype], "tf32"  # precision flag unused for 16-bit operands
    return tl.float32, "ieee"


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot_fp32_lhs(a, b_low, acc, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a @ b_low for an fp32 ``a``. With 16-bit operands ``a`` goes in as the sum of two
    16-bit parts, hi = a rounded and lo = (a - hi) rounded, so the product keeps about 16 of a's
    bits instead of 8 (bf16) or 11 (fp16), for the price of a second product."""
    a_hi = a.to(DOT_DTYPE)
    acc = tl.dot(a_hi, b_low, acc=acc, input_precision=DOT_PREC)
    if DOT_DTYPE != tl.float32:
        a_lo = (a - a_hi.to(tl.float32)).to(DOT_DTYPE)
        acc = tl.dot(a_lo, b_low, acc=acc, input_precision=DOT_PREC)
    return acc


# The flat form (flat B4) holds BLOCK_H heads' channels side by side as the columns of one
# (rows x BLOCK_H * BLOCK_P) tile, and factor the decay so that their products take bf16 operands
# whatever the input dtype (the factors need bf16's range): the helpers below.


@triton.jit
def _per_column(v, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """(ROWS x BLOCK_H) per-head values -> (ROWS x BLOCK_H * BLOCK_P), each over its head's columns."""
    return tl.reshape(tl.broadcast_to(v[:, :, None], (ROWS, BLOCK_H, BLOCK_P)),
                      (ROWS, BLOCK_H * BLOCK_P))


@triton.jit
def _head_tile(first, group_end, nheads, headdim, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """The tile of heads first .. first + BLOCK_H - 1 (those before group_end are real):
    (h_ok, heads) per head, and (f_head, f_p, f_ok) per column f (channel f % BLOCK_P of head
    f // BLOCK_P). Indices past the group are clamped to a real head: masked, never read."""
    offs_hb = tl.arange(0, BLOCK_H)
    h_ok = first + offs_hb < group_end
    heads = tl.minimum(first + offs_hb, nheads - 1)
    offs_f = tl.arange(0, BLOCK_H * BLOCK_P)
    f_head = first + offs_f // BLOCK_P
    f_p = offs_f % BLOCK_P
    f_ok = (f_head < group_end) & (f_p < headdim)
    return h_ok, heads, tl.minimum(f_head, nheads - 1), f_p, f_ok


@triton.jit
def _split_bf16(a):
    hi = a.to(tl.bfloat16)
    return hi, (a - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _dot_bf16(a, b, acc, EMULATE: tl.constexpr):
    """acc + a @ b for bf16 a and b. EMULATE (under the Triton interpreter, whose bf16 products
    are wrong): the same product from the operands widened to fp32, which holds every bf16
    product exactly; only the order of the fp32 sums differs from the GPU's."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    return tl.dot(a, b, acc=acc)


@triton.jit
def _softplus(v):
    # softplus(v) = log(1 + exp(v)), linear above 20 (torch.nn.functional.softplus's threshold).
    # log1p(e) computed as log(u) * e / (u - 1) with u = 1 + e: exact to rounding for tiny e.
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(v > 20.0, v, log1p_e)


@triton.jit
def _discretize_dt(dt_raw_ptrs, bias_ptr, h, mask, HAS_BIAS: tl.constexpr,
                   SOFTPLUS: tl.constexpr, dt_lo, dt_hi):
    """dt' = clamp(softplus?(dt + dt_bias)), 0 where ``mask`` is False. Returns (dt', pre) where
    pre is the value before softplus (needed by the backward)."""
    pre = tl.load(dt_raw_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        val = _softplus(pre)
    else:
        val = pre
    val = tl.minimum(tl.maximum(val, dt_lo), dt_hi)
    return tl.where(mask, val, 0.0), pre


@triton.jit
def _dt_backward(d_dtp, dt_raw_ptrs, bias_ptr, h, mask, HAS_BIAS: tl.constexpr,
                 SOFTPLUS: tl.constexpr, dt_lo, dt_hi):
    """d dt' -> d of the raw dt (and so of dt_bias): back through the clamp (0 where it clipped)
    and softplus (its derivative sigmoid(pre), 1 above softplus's linear threshold of 20); 0 where
    ``mask`` is False."""
    _, pre = _discretize_dt(dt_raw_ptrs, bias_ptr, h, mask, HAS_BIAS, SOFTPLUS, dt_lo, dt_hi)
    if SOFTPLUS:
        sp = _softplus(pre)
        d_pre = tl.where(pre > 20.0, d_dtp, d_dtp / (1.0 + tl.exp(-pre)))
    else:
        sp = pre
        d_pre = d_dtp
    return tl.where((sp >= dt_lo) & (sp <= dt_hi) & mask, d_pre, 0.0)


@triton.jit
def _seq_masks(seq_ptr, stride_seq_b, stride_seq_l, b, chunk_start, t_idx, seqlen,
               Q: tl.constexpr):
    """For a chunk: (seq id per position, seq id of the chunk's last position, seq id of the
    position before the chunk (position 0's for the first chunk)). Padding takes the last id."""
    base = seq_ptr + b * stride_seq_b
    seq_t = tl.load(base + tl.minimum(t_idx, seqlen - 1) * stride_seq_l)
    seq_end = tl.load(base + tl.minimum(chunk_start + Q - 1, seqlen - 1) * stride_seq_l)
    seq_prev = tl.load(base + tl.maximum(chunk_start - 1, 0) * stride_seq_l)
    return seq_t, seq_end, seq_prev


# ----------------------------------------------------------------------------------------------
# K0, per (b, chunk, group): CB[b, c, g, t, s] = C_t . B_s (fp32), shared by every head of the
# group; and, for the group's heads (one Q x BLOCK_H tile at a time), dt' and Lam, which every
# later kernel reads, and K1's weights
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cb_kernel(
    C_ptr, B_ptr, seq_ptr, CB_ptr, dt_ptr, A_ptr, dt_bias_ptr, dtp_ptr, lam_ptr, w_end_ptr,
    seqlen, nheads, heads_per_group, ngroups, dstate, padded_len, dt_lo, dt_hi,
    s_cb, s_cl, s_cg, s_cn,
    s_bb, s_bl, s_bg, s_bn,
    s_dtb, s_dtl, s_dth,
    s_seqb, s_seql,
    Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, HAS_SEQ: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    c = tl.program_id(1)
    bg = tl.program_id(0)
    b = bg // ngroups
    g = bg % ngroups
    nchunks = tl.num_programs(1)
    t_idx = c * Q + tl.arange(0, Q)
    valid = t_idx < seqlen
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((Q, Q), dtype=tl.float32)
    for n0 in range(0, dstate, BLOCK_N):
        n_mask = (n0 + offs_n) < dstate
        c_tile = tl.load(C_ptr + b * s_cb + g * s_cg + t_idx[:, None] * s_cl
                         + (n0 + offs_n)[None, :] * s_cn,
                         mask=valid[:, None] & n_mask[None, :], other=0.0)
        b_tile = tl.load(B_ptr + b * s_bb + g * s_bg + t_idx[None, :] * s_bl
                         + (n0 + offs_n)[:, None] * s_bn,
                         mask=valid[None, :] & n_mask[:, None], other=0.0)   # (N, Q): B^T
        acc += tl.dot(c_tile.to(DOT_DTYPE), b_tile.to(DOT_DTYPE), input_precision=DOT_PREC)
    if HAS_SEQ:  # pairs in different sequences: 0 here, once per group, not in every head's K3/B3
        seq_t, seq_end, seq_prev = _seq_masks(seq_ptr, s_seqb, s_seql, b, c * Q, t_idx, seqlen, Q)
        acc = tl.where(seq_t[:, None] == seq_t[None, :], acc, 0.0)
    offs_q = tl.arange(0, Q)
    out = CB_ptr + ((b * nchunks + c) * ngroups + g) * Q * Q
    tl.store(out + offs_q[:, None] * Q + offs_q[None, :], acc)

    # dt', Lam (padding positions too: dt' = 0 there, Lam carries the chunk's last value) and
    # K1's weights exp(Lam_end - Lam_s) dt'_s [seq_s == seq_end]: computed here once per head, K1
    # reads one (Q x BLOCK_M) tile of them instead of gathering dt', Lam and Lam_end per row
    for h0 in range(0, heads_per_group, BLOCK_H):
        in_group = h0 + tl.arange(0, BLOCK_H)
        h_ok = in_group < heads_per_group
        h = tl.minimum(g * heads_per_group + in_group, nheads - 1)
        dtp, _ = _discretize_dt(dt_ptr + b * s_dtb + t_idx[:, None] * s_dtl + h[None, :] * s_dth,
                                dt_bias_ptr, h[None, :], valid[:, None] & h_ok[None, :],
                                HAS_BIAS, SOFTPLUS, dt_lo, dt_hi)
        A = tl.load(A_ptr + h).to(tl.float32)
        lam = tl.cumsum(dtp * A[None, :], axis=0)
        w_end = tl.exp(tl.sum(dtp * A[None, :], axis=0)[None, :] - lam) * dtp
        if HAS_SEQ:
            w_end = tl.where((seq_t == seq_end)[:, None], w_end, 0.0)
        rows = (b * nheads + h)[None, :] * padded_len + t_idx[:, None]
        tl.store(dtp_ptr + rows, dtp, mask=h_ok[None, :])
        tl.store(lam_ptr + rows, lam, mask=h_ok[None, :])
        tl.store(w_end_ptr + rows, w_end, mask=h_ok[None, :])


# ----------------------------------------------------------------------------------------------
# K1 / B1: each chunk's own contribution to the state (K1) or to the gradient of the state
# entering it (B1), for all heads of a group at once. The group's heads and head channels are one
# flat index m = (head in group) * P + p, so a program computes a BLOCK_M x BLOCK_N tile of
#     K1:  S_c[m, n]  = sum_s exp(Lam_end - Lam_s) [seq_s == seq_end] dt'_s x_s[m] B_s[n]
#     B1:  dS_c[m, n] = sum_t exp(Lam_t) [seq_t == seq_prev] dy_t[m] C_t[n]
# (Lam, dt' of row m's head) as one (BLOCK_M x Q) @ (Q x BLOCK_N) product: no head dim padded to a
# power of two, B or C read once per BLOCK_M rows instead of once per head, and the tile stored
# into the (b, c, h, p, n) chunk states as one contiguous block of rows.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _flat_chunk_product(
    x_ptr, w_end_ptr, lam_ptr, V_ptr, seq_ptr,
    b, g, c, offs_m, m_mask, offs_n, n_mask,
    seqlen, nheads, heads_per_group, headdim, padded_len,
    s_xb, s_xl, s_xh, s_xp,
    s_vb, s_vl, s_vg, s_vn,
    s_seqb, s_seql,
    Q: tl.constexpr, TO_END: tl.constexpr, HAS_SEQ: tl.constexpr, HEADS_PACKED: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """sum_t x_t[m] w_t[m] V_t[n] over chunk c (fp32, BLOCK_M x BLOCK_N): with TO_END (K1)
    w = K0's weights exp(Lam_end - Lam_t) dt'_t [seq_t == seq_end], otherwise (B1) w_t =
    exp(Lam_t) [seq_t == seq_prev], of row m's head. HEADS_PACKED: the heads' channels follow
    each other in x (stride(h) = P stride(p)), so row m sits at m * stride(p) (vector loads)."""
    t_idx = c * Q + tl.arange(0, Q)
    valid = t_idx < seqlen
    head_in_group = offs_m // headdim
    h = g * heads_per_group + head_in_group
    per_head = ((b * nheads + h) * padded_len)[None, :] + t_idx[:, None]               # (Q, M)
    if TO_END:
        w = tl.load(w_end_ptr + per_head, mask=m_mask[None, :], other=0.0)
    else:
        w = tl.exp(tl.load(lam_ptr + per_head, mask=m_mask[None, :], other=0.0))
        if HAS_SEQ:
            seq_t, seq_end, seq_prev = _seq_masks(seq_ptr, s_seqb, s_seql, b, c * Q, t_idx,
                                                  seqlen, Q)
            w = tl.where((seq_t == seq_prev)[:, None], w, 0.0)
    if HEADS_PACKED:
        cols = (g * heads_per_group * headdim + offs_m) * s_xp
    else:
        cols = h * s_xh + (offs_m - head_in_group * headdim) * s_xp
    x_tile = tl.load(x_ptr + b * s_xb + t_idx[:, None] * s_xl + cols[None, :],
                     mask=valid[:, None] & m_mask[None, :], other=0.0).to(tl.float32)  # (Q, M)
    v_tile = tl.load(V_ptr + b * s_vb + g * s_vg + t_idx[:, None] * s_vl + offs_n[None, :] * s_vn,
                     mask=valid[:, None] & n_mask[None, :], other=0.0)                  # (Q, N)
    return tl.dot(tl.trans(x_tile * w).to(DOT_DTYPE), v_tile.to(DOT_DTYPE),
                  input_precision=DOT_PREC)


@triton.jit
def _flat_tile(bg, pid_mn, ngroups, heads_per_group, headdim, dstate,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program's (b, g) and its tile of (flat row, n) from its (b, g) and (row block, N block)
    program ids: -> b, g, offs_m, offs_n, m_mask, n_mask."""
    n_blocks = tl.cdiv(dstate, BLOCK_N)
    offs_m = (pid_mn // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_mn % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return (bg // ngroups, bg % ngroups, offs_m, offs_n, offs_m < heads_per_group * headdim,
            offs_n < dstate)


@triton.jit
def _chunk_states_kernel(
    x_ptr, w_end_ptr, lam_ptr, V_ptr, seq_ptr, S_ptr,
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len,
    s_xb, s_xl, s_xh, s_xp,
    s_vb, s_vl, s_vg, s_vn,
    s_seqb, s_seql,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TO_END: tl.constexpr,
    HAS_SEQ: tl.constexpr, HEADS_PACKED: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    c = tl.program_id(1)
    nchunks = tl.num_programs(1)
    b, g, offs_m, offs_n, m_mask, n_mask = _flat_tile(
        tl.program_id(0), tl.program_id(2), ngroups, heads_per_group, headdim, dstate,
        BLOCK_M, BLOCK_N)
    tile = _flat_chunk_product(
        x_ptr, w_end_ptr, lam_ptr, V_ptr, seq_ptr, b, g, c, offs_m, m_mask, offs_n, n_mask,
        seqlen, nheads, heads_per_group, headdim, padded_len,
        s_xb, s_xl, s_xh, s_xp, s_vb, s_vl, s_vg, s_vn, s_seqb, s_seql,
        Q, TO_END, HAS_SEQ, HEADS_PACKED, DOT_DTYPE, DOT_PREC)
    # rows of (b, c, h, p) in the chunk states, the group's first (h, 0) at row 0 of the tile
    row = ((b * nchunks + c) * nheads + g * heads_per_group).to(tl.int64) * headdim + offs_m
    tl.store(S_ptr + row[:, None] * dstate + offs_n[None, :], tile,
             mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# K2 / B2: passing the state (or its gradient) across chunks, fp32, one flat block of P*N each
#   forward:  H0_0 = initial;  H0_{c+1} = keep_c exp(Lam_end_c) H0_c + S_c;  final = H0_nchunks
#   backward: G_last = d final;  G_{c-1} = keep_c exp(Lam_end_c) G_c + dS_c;  d initial = G_{-1}
#   keep_c = [seq at chunk c's end == seq before chunk c]
# ----------------------------------------------------------------------------------------------


@triton.jit
def _state_pass_kernel(
    src_ptr, out_ptr, start_ptr, final_ptr, lam_ptr, seq_ptr,
    seqlen, nheads, state_size, padded_len, nchunks,
    s_seqb, s_seql,
    Q: tl.constexpr, BLOCK: tl.constexpr, HAS_START: tl.constexpr, HAS_SEQ: tl.constexpr,
    REVERSE: tl.constexpr,
):
    pid = tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // nheads
    h = bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    if HAS_START:
        carry = tl.load(start_ptr + bh * state_size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        if REVERSE:
            c = nchunks - 1 - i
        else:
            c = i
        chunk_slot = ((b * nchunks + c) * nheads + h) * state_size
        # forward: the state entering chunk c; backward: the gradient of the state leaving it
        tl.store(out_ptr + chunk_slot + offs, carry.to(out_ptr.dtype.element_ty), mask=mask)
        local = tl.load(src_ptr + chunk_slot + offs, mask=mask, other=0.0)
        scale = tl.exp(tl.load(lam_ptr + bh * padded_len + c * Q + Q - 1))
        if HAS_SEQ:
            seq_base = seq_ptr + b * s_seqb
            seq_end = tl.load(seq_base + tl.minimum(c * Q + Q - 1, seqlen - 1) * s_seql)
            seq_prev = tl.load(seq_base + tl.maximum(c * Q - 1, 0) * s_seql)
            scale = tl.where(seq_end == seq_prev, scale, 0.0)
        carry = scale * carry + local
    tl.store(final_ptr + bh * state_size + offs, carry, mask=mask)


# ----------------------------------------------------------------------------------------------
# K1+K2 and B1+B2 fused (the "sequential" state form): one program per (b, group, BLOCK_M rows of
# the flat (head, p) index, BLOCK_N of N) walks the chunks in order (backward: in reverse),
# computing each chunk's own term with K1's / B1's product (its loads do not depend on the carried
# state, so they can run ahead) and carrying the state in registers; no chunk state goes through
# memory:
#   forward:  H0_0 = initial;  store H0_c;  H0_{c+1} = keep_c exp(Lam_end_c) H0_c + S_c
#   backward: G_last = d final;  store G_c;  G_{c-1} = keep_c exp(Lam_end_c) G_c + dS_c
# and the carry after the last chunk is the final state (backward: the initial state's gradient).
#
# Long rows with few walks (1 x 64K tokens: 24 walks of 1024 chunks on 132 SMs) cut the walk into
# segments of consecutive chunks (in walk order), one program each (grid axis 2), in two launches:
#   SUMMARY:  segment s (all but the last) walks from a zero state and stores only where it ends,
#             E_s, and its decay d_s = prod_c keep_c exp(Lam_end_c) (per row; the carry is linear)
#   then:     segment s starts from  carry = d_{s-1} (... (d_0 initial + E_0) ...) + E_{s-1}
#             (s short steps over the summaries) and walks its chunks as above.
# One segment is the plain walk (the loop over earlier segments is empty).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _state_walk_kernel(
    x_ptr, w_end_ptr, lam_ptr, V_ptr, seq_ptr, start_ptr, states_ptr, end_ptr,
    seg_end_ptr, seg_decay_ptr,
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len, nchunks, seg_chunks,
    s_xb, s_xl, s_xh, s_xp,
    s_vb, s_vl, s_vg, s_vn,
    s_seqb, s_seql,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REVERSE: tl.constexpr,
    HAS_START: tl.constexpr, HAS_SEQ: tl.constexpr, HEADS_PACKED: tl.constexpr,
    SUMMARY: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    b, g, offs_m, offs_n, m_mask, n_mask = _flat_tile(
        tl.program_id(0), tl.program_id(1), ngroups, heads_per_group, headdim, dstate,
        BLOCK_M, BLOCK_N)
    segment = tl.program_id(2)
    nsegments = tl.cdiv(nchunks, seg_chunks)
    mn_mask = m_mask[:, None] & n_mask[None, :]
    h = g * heads_per_group + offs_m // headdim
    # the tile's place in one (h, p, n) state: the group's first (h, 0) at row 0
    flat_row = g * heads_per_group * headdim + offs_m
    state_offs = (flat_row * dstate)[:, None] + offs_n[None, :]
    state_size = nheads * headdim * dstate
    carry = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not SUMMARY:
        if HAS_START:
            carry = tl.load(start_ptr + b * state_size + state_offs, mask=mn_mask,
                            other=0.0).to(tl.float32)
        for earlier in range(0, segment):  # the earlier segments' summaries
            summary = (b * nsegments + earlier).to(tl.int64)
            earlier_decay = tl.load(seg_decay_ptr + summary * nheads * headdim + flat_row,
                                    mask=m_mask, other=0.0)
            carry = earlier_decay[:, None] * carry + tl.load(
                seg_end_ptr + summary * state_size + state_offs, mask=mn_mask, other=0.0)
    decay = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)  # this segment's (SUMMARY)
    first = segment * seg_chunks
    for i in range(first, tl.minimum(first + seg_chunks, nchunks)):
        if REVERSE:
            c = nchunks - 1 - i
        else:
            c = i
        if not SUMMARY:
            slot = (b * nchunks + c).to(tl.int64) * state_size
            tl.store(states_ptr + slot + state_offs, carry.to(states_ptr.dtype.element_ty),
                     mask=mn_mask)
        local = _flat_chunk_product(
            x_ptr, w_end_ptr, lam_ptr, V_ptr, seq_ptr, b, g, c, offs_m, m_mask, offs_n, n_mask,
            seqlen, nheads, heads_per_group, headdim, padded_len,
            s_xb, s_xl, s_xh, s_xp, s_vb, s_vl, s_vg, s_vn, s_seqb, s_seql,
            Q, not REVERSE, HAS_SEQ, HEADS_PACKED, DOT_DTYPE, DOT_PREC)
        scale = tl.exp(tl.load(lam_ptr + (b * nheads + h) * padded_len + c * Q + Q - 1,
                               mask=m_mask, other=0.0))
        if HAS_SEQ:
            seq_base = seq_ptr + b * s_seqb
            seq_end = tl.load(seq_base + tl.minimum(c * Q + Q - 1, seqlen - 1) * s_seql)
            seq_prev = tl.load(seq_base + tl.maximum(c * Q - 1, 0) * s_seql)
            scale = tl.where(seq_end == seq_prev, scale, 0.0)
        carry = scale[:, None] * carry + local
        if SUMMARY:
            decay = decay * scale
    if SUMMARY:
        summary = (b * nsegments + segment).to(tl.int64)
        tl.store(seg_end_ptr + summary * state_size + state_offs, carry, mask=mn_mask)
        tl.store(seg_decay_ptr + summary * nheads * headdim + flat_row, decay, mask=m_mask)
    elif segment == nsegments - 1:
        tl.store(end_ptr + b * state_size + state_offs, carry, mask=mn_mask)


# ----------------------------------------------------------------------------------------------
# K3: y_t = exp(Lam_t) [seq_t == seq_prev] C_t H0^T + sum_{s<=t} L_ts CB_ts dt'_s x_s + D x_t
# ----------------------------------------------------------------------------------------------


@triton.jit
def _chunk_out_fwd_kernel(
    x_ptr, C_ptr, CB_ptr, H0_ptr, dtp_ptr, lam_ptr, D_ptr, seq_ptr, y_ptr,
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len,
    s_xb, s_xl, s_xh, s_xp,
    s_cb, s_cl, s_cg, s_cn,
    s_yb, s_yl, s_yh, s_yp,
    s_seqb, s_seql,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_SEQ: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    c = tl.program_id(1)
    bh = tl.program_id(0)
    nchunks = tl.num_programs(1)
    b = bh // nheads
    h = bh % nheads
    g = h // heads_per_group
    offs_q = tl.arange(0, Q)
    t_idx = c * Q + offs_q
    valid = t_idx < seqlen
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < headdim
    offs_n = tl.arange(0, BLOCK_N)

    row = bh * padded_len + t_idx
    lam = tl.load(lam_ptr + row)
    dtp = tl.load(dtp_ptr + row)
    from_start = tl.exp(lam)
    pair_ok = offs_q[:, None] >= offs_q[None, :]
    if HAS_SEQ:
        seq_t, seq_end, seq_prev = _seq_masks(seq_ptr, s_seqb, s_seql, b, c * Q, t_idx,
                                              seqlen, Q)
        from_start = tl.where(seq_t == seq_prev, from_start, 0.0)
        # (pairs in different sequences: K0 wrote CB = 0 there, so their scores are 0)

    # Inter-chunk: C (Q, N) @ H0^T (N, P)
    acc = tl.zeros((Q, BLOCK_P), dtype=tl.float32)
    h0_base = H0_ptr + ((b * nchunks + c) * nheads + h) * headdim * dstate
    for n0 in range(0, dstate, BLOCK_N):
        n_mask = (n0 + offs_n) < dstate
        c_tile = tl.load(C_ptr + b * s_cb + g * s_cg + t_idx[:, None] * s_cl
                         + (n0 + offs_n)[None, :] * s_cn,
                         mask=valid[:, None] & n_mask[None, :], other=0.0)
        h0_t = tl.load(h0_base + offs_p[None, :] * dstate + (n0 + offs_n)[:, None],
                       mask=p_mask[None, :] & n_mask[:, None], other=0.0)
        acc += tl.dot(c_tile.to(DOT_DTYPE), h0_t.to(DOT_DTYPE), input_precision=DOT_PREC)
    acc = acc * from_start[:, None]

    # Intra-chunk: (CB o L o dt') (Q, Q) @ x (Q, P)
    cb = tl.load(CB_ptr + ((b * nchunks + c) * ngroups + g) * Q * Q
                 + offs_q[:, None] * Q + offs_q[None, :])
    seg = tl.where(pair_ok, lam[:, None] - lam[None, :], float("-inf"))
    scores = cb * tl.exp(seg)
    x_tile = tl.load(x_ptr + b * s_xb + h * s_xh + t_idx[:, None] * s_xl
                     + offs_p[None, :] * s_xp,
                     mask=valid[:, None] & p_mask[None, :], other=0.0).to(tl.float32)
    # dt'_s goes into the scores, not into x: x stays exact in the dot's 16-bit operand and only
    # (CB o L) dt' is rounded. Rounding both (scores, and x dt') made the single-head gradients of
    # dt_bias, D and A after the gated norm several times less accurate (fp16, CPU interpreter:
    # d dt_bias 9.8e-3 -> 2.5e-3 at one head of 16, the torch path in fp32 inside: 1.5e-3).
    acc += tl.dot((scores * dtp[None, :]).to(DOT_DTYPE), x_tile.to(DOT_DTYPE), input_precision=DOT_PREC)

    if HAS_D:
        if D_PER_CHANNEL:
            d_skip = tl.load(D_ptr + h * headdim + offs_p, mask=p_mask, other=0.0).to(tl.float32)
            acc += x_tile * d_skip[None, :]
        else:
            acc += x_tile * tl.load(D_ptr + h).to(tl.float32)
    tl.store(y_ptr + b * s_yb + h * s_yh + t_idx[:, None] * s_yl + offs_p[None, :] * s_yp,
             acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & p_mask[None, :])


# ----------------------------------------------------------------------------------------------
# B3: per head: dx, d dt (raw), and per-chunk partial sums of dA, dD, d dt_bias
# ----------------------------------------------------------------------------------------------


@triton.jit
def _chunk_bwd_dx_kernel(
    x_ptr, dt_ptr, A_ptr, dt_bias_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, dy_ptr,
    CB_ptr, H0_ptr, G_ptr, dtp_ptr, lam_ptr,
    dx_ptr, ddt_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len, dt_lo, dt_hi,
    s_xb, s_xl, s_xh, s_xp,
    s_dtb, s_dtl, s_dth,
    s_bb, s_bl, s_bg, s_bn,
    s_cb, s_cl, s_cg, s_cn,
    s_dyb, s_dyl, s_dyh, s_dyp,
    s_dxb, s_dxl, s_dxh, s_dxp,
    s_ddtb, s_ddtl, s_ddth,
    s_seqb, s_seql,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_SEQ: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    c = tl.program_id(1)
    bh = tl.program_id(0)
    nchunks = tl.num_programs(1)
    b = bh // nheads
    h = bh % nheads
    g = h // heads_per_group
    offs_q = tl.arange(0, Q)
    t_idx = c * Q + offs_q
    valid = t_idx < seqlen
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < headdim
    offs_n = tl.arange(0, BLOCK_N)
    tile_mask = valid[:, None] & p_mask[None, :]

    row = bh * padded_len + t_idx
    lam = tl.load(lam_ptr + row)
    dtp = tl.load(dtp_ptr + row)
    A = tl.load(A_ptr + h).to(tl.float32)
    lam_end = tl.sum(dtp * A, axis=0)
    from_start = tl.exp(lam)                 # exp(Lam_t): entering state -> position t
    to_end = tl.exp(lam_end - lam)           # exp(Lam_end - Lam_s): position s -> leaving state
    keep_start = lam_end * 0.0 + 1.0         # [seq at chunk end == seq before chunk]
    pair_ok = offs_q[:, None] >= offs_q[None, :]
    if HAS_SEQ:
        seq_t, seq_end, seq_prev = _seq_masks(seq_ptr, s_seqb, s_seql, b, c * Q, t_idx,
                                              seqlen, Q)
        from_start = tl.where(seq_t == seq_prev, from_start, 0.0)
        to_end = tl.where(seq_t == seq_end, to_end, 0.0)
        keep_start = tl.where(seq_end == seq_prev, 1.0, 0.0)
        # (pairs in different sequences: CB = 0 there, from K0)

    # State terms, N in blocks:  B G^T -> dxt_state,  C H0^T -> y_inter,  <G, H0>
    state_slot = ((b * nchunks + c) * nheads + h) * headdim * dstate
    bg_acc = tl.zeros((Q, BLOCK_P), dtype=tl.float32)
    ch_acc = tl.zeros((Q, BLOCK_P), dtype=tl.float32)
    g_dot_h0 = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, dstate, BLOCK_N):
        n_mask = (n0 + offs_n) < dstate
        qn_mask = valid[:, None] & n_mask[None, :]
        np_mask = n_mask[:, None] & p_mask[None, :]
        state_offs = offs_p[None, :] * dstate + (n0 + offs_n)[:, None]        # (N, P) view
        b_tile = tl.load(B_ptr + b * s_bb + g * s_bg + t_idx[:, None] * s_bl
                         + (n0 + offs_n)[None, :] * s_bn, mask=qn_mask, other=0.0)
        c_tile = tl.load(C_ptr + b * s_cb + g * s_cg + t_idx[:, None] * s_cl
                         + (n0 + offs_n)[None, :] * s_cn, mask=qn_mask, other=0.0)
        g_t = tl.load(G_ptr + state_slot + state_offs, mask=np_mask, other=0.0)
        h0_t = tl.load(H0_ptr + state_slot + state_offs, mask=np_mask, other=0.0)
        bg_acc += tl.dot(b_tile.to(DOT_DTYPE), g_t.to(DOT_DTYPE), input_precision=DOT_PREC)
        ch_acc += tl.dot(c_tile.to(DOT_DTYPE), h0_t.to(DOT_DTYPE), input_precision=DOT_PREC)
        g_dot_h0 += g_t.to(tl.float32) * h0_t.to(tl.float32)
    dxt_state = bg_acc * to_end[:, None]
    y_inter = ch_acc * from_start[:, None]

    # x and dy as the products read them (exact for 16-bit inputs): both sides of the
    # cancellation below must see the same values
    x_low = tl.load(x_ptr + b * s_xb + h * s_xh + t_idx[:, None] * s_xl
                    + offs_p[None, :] * s_xp, mask=tile_mask, other=0.0).to(DOT_DTYPE)
    dy_low = tl.load(dy_ptr + b * s_dyb + h * s_dyh + t_idx[:, None] * s_dyl
                     + offs_p[None, :] * s_dyp, mask=tile_mask, other=0.0).to(DOT_DTYPE)
    x_tile = x_low.to(tl.float32)
    dy = dy_low.to(tl.float32)
    # <G, H_end> = exp(Lam_end) <G, H0> + <G, S_c>, the chunk's own part through dxt_state
    leaving = keep_start * tl.exp(lam_end) * tl.sum(tl.sum(g_dot_h0, axis=1), axis=0) \
        + tl.sum(dtp * tl.sum(x_tile * dxt_state, axis=1), axis=0)

    # Intra-chunk: the one Q x Q tile, scores = CB o L, feeds two products, each accumulated
    # onto its state term: dxt = scores^T dy + dxt_state and the scan's own output
    # y' = (scores o dt') x + y_inter (without D x).
    cb = tl.load(CB_ptr + ((b * nchunks + c) * ngroups + g) * Q * Q
                 + offs_q[:, None] * Q + offs_q[None, :])
    seg = tl.where(pair_ok, lam[:, None] - lam[None, :], float("-inf"))
    scores = cb * tl.exp(seg)                                                   # [t, s]
    dxt = _dot_fp32_lhs(tl.trans(scores), dy_low, dxt_state, DOT_DTYPE, DOT_PREC)
    y_ssd = _dot_fp32_lhs(scores * dtp[None, :], x_low, y_inter, DOT_DTYPE, DOT_PREC)

    # d Lam_t = dy_t . y'_t - xt_t . dxt_t (module docstring: the rowsum(Z) - colsum(Z) of the
    # Q x Q Z_ts = scores_ts (dy_t . xt_s) without forming Z, which took two more Q x Q fp32 tiles
    # beside scores), then d a_s = sum_{t >= s} d Lam_t; x_t . dxt_t serves d dt'_t as well.
    # (Session 11: scores split into hi + lo once, shared by both products, with xt split on the
    # y side instead of a second Q x Q split: 0.486 -> 0.508 ms on the H200, dropped. The Z form,
    # d Lam's intra part from Zx = scores o (dy x^T) in fp32 with the Q x Q tiles held transposed
    # (2 products instead of 4), was timed on the H100 in session 20 and lost: 0.539 against
    # 0.482 ms at the 128-register cap, level at cap 168; removed.)
    x_dxt = tl.sum(x_tile * dxt, axis=1)
    d_lam = tl.sum(dy * y_ssd, axis=1) - dtp * x_dxt
    d_lam += tl.where(offs_q == Q - 1, leaving, 0.0)
    d_a = tl.sum(d_lam, axis=0) - tl.cumsum(d_lam, axis=0) + d_lam

    d_dtp = x_dxt + A * d_a
    tl.store(dA_part_ptr + bh * nchunks + c, tl.sum(tl.where(valid, d_a * dtp, 0.0), axis=0))

    dx = dxt * dtp[:, None]
    if HAS_D:
        if D_PER_CHANNEL:
            d_skip = tl.load(D_ptr + h * headdim + offs_p, mask=p_mask, other=0.0).to(tl.float32)
            dx += dy * d_skip[None, :]
            tl.store(dD_part_ptr + (bh * nchunks + c) * headdim + offs_p,
                     tl.sum(dy * x_tile, axis=0), mask=p_mask)
        else:
            dx += dy * tl.load(D_ptr + h).to(tl.float32)
            tl.store(dD_part_ptr + bh * nchunks + c, tl.sum(tl.sum(dy * x_tile, axis=1), axis=0))
    tl.store(dx_ptr + b * s_dxb + h * s_dxh + t_idx[:, None] * s_dxl + offs_p[None, :] * s_dxp,
             dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)

    d_pre = _dt_backward(d_dtp, dt_ptr + b * s_dtb + h * s_dth + t_idx * s_dtl, dt_bias_ptr, h,
                         valid, HAS_BIAS, SOFTPLUS, dt_lo, dt_hi)
    tl.store(ddt_ptr + b * s_ddtb + h * s_ddth + t_idx * s_ddtl,
             d_pre.to(ddt_ptr.dtype.element_ty), mask=valid)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + bh * nchunks + c, tl.sum(d_pre, axis=0))


# ----------------------------------------------------------------------------------------------
# B4: per group (its heads summed): dB, dC
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dbdc_finish(w_acc, dc_acc, db_acc, B_ptr, C_ptr, dB_part_ptr, dC_part_ptr, b, g, split,
                 t_idx, offs_n, qn_mask, seqlen, ngroups, dstate,
                 s_bb, s_bl, s_bg, s_bn, s_cb, s_cl, s_cg, s_cn,
                 DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """B4's last step (both forms): dC += W B, dB += W^T C with W (masked) rounded to the
    products' dtype, then this program's partials into the (splits, b, l, g, n) fp32 buffers."""
    b_tile = tl.load(B_ptr + b * s_bb + g * s_bg + t_idx[:, None] * s_bl + offs_n[None, :] * s_bn,
                     mask=qn_mask, other=0.0)
    c_tile = tl.load(C_ptr + b * s_cb + g * s_cg + t_idx[:, None] * s_cl + offs_n[None, :] * s_cn,
                     mask=qn_mask, other=0.0)
    w_low = w_acc.to(DOT_DTYPE)
    dc_acc += tl.dot(w_low, b_tile.to(DOT_DTYPE), input_precision=DOT_PREC)
    db_acc += tl.dot(tl.trans(w_low), c_tile.to(DOT_DTYPE), input_precision=DOT_PREC)
    base = (((split * (tl.num_programs(0) // ngroups) + b) * seqlen + t_idx[:, None]) * ngroups
            + g) * dstate + offs_n[None, :]
    tl.store(dB_part_ptr + base, db_acc, mask=qn_mask)
    tl.store(dC_part_ptr + base, dc_acc, mask=qn_mask)


@triton.jit
def _chunk_bwd_dbdc_kernel(
    x_ptr, B_ptr, C_ptr, seq_ptr, dy_ptr, H0_ptr, G_ptr, dtp_ptr, lam_ptr,
    dB_part_ptr, dC_part_ptr,
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len, heads_per_split,
    s_xb, s_xl, s_xh, s_xp,
    s_bb, s_bl, s_bg, s_bn,
    s_cb, s_cl, s_cg, s_cn,
    s_dyb, s_dyl, s_dyh, s_dyp,
    s_seqb, s_seql,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SEQ: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    c = tl.program_id(1)
    bg = tl.program_id(0)
    pid_ns = tl.program_id(2)
    nchunks = tl.num_programs(1)
    n_blocks = tl.cdiv(dstate, BLOCK_N)
    pid_n = pid_ns % n_blocks
    split = pid_ns // n_blocks
    b = bg // ngroups
    g = bg % ngroups
    offs_q = tl.arange(0, Q)
    t_idx = c * Q + offs_q
    valid = t_idx < seqlen
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < headdim
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < dstate
    tile_mask = valid[:, None] & p_mask[None, :]
    qn_mask = valid[:, None] & n_mask[None, :]

    pair_ok = offs_q[:, None] >= offs_q[None, :]
    from_start_ok = valid
    to_end_ok = valid
    if HAS_SEQ:
        seq_t, seq_end, seq_prev = _seq_masks(seq_ptr, s_seqb, s_seql, b, c * Q, t_idx,
                                              seqlen, Q)
        from_start_ok = from_start_ok & (seq_t == seq_prev)
        to_end_ok = to_end_ok & (seq_t == seq_end)
        # (pairs in different sequences: zeroed in W once, after the head loop; their per-head
        # L_ts = exp(Lam_t - Lam_s) <= 1 is finite, so the sum over heads can be masked after)

    w_acc = tl.zeros((Q, Q), dtype=tl.float32)
    dc_acc = tl.zeros((Q, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((Q, BLOCK_N), dtype=tl.float32)
    first_head = g * heads_per_group + split * heads_per_split
    last_head = tl.minimum(first_head + heads_per_split, (g + 1) * heads_per_group)
    for h in range(first_head, last_head):
        bh = b * nheads + h
        row = bh * padded_len + t_idx
        lam = tl.load(lam_ptr + row)
        dtp = tl.load(dtp_ptr + row)
        lam_end = tl.load(lam_ptr + bh * padded_len + c * Q + Q - 1)
        from_start = tl.where(from_start_ok, tl.exp(lam), 0.0)
        to_end = tl.where(to_end_ok, tl.exp(lam_end - lam), 0.0)
        x_tile = tl.load(x_ptr + b * s_xb + h * s_xh + t_idx[:, None] * s_xl
                         + offs_p[None, :] * s_xp, mask=tile_mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + b * s_dyb + h * s_dyh + t_idx[:, None] * s_dyl
                     + offs_p[None, :] * s_dyp, mask=tile_mask, other=0.0).to(tl.float32)
        xt = x_tile * dtp[:, None]
        seg = tl.where(pair_ok, lam[:, None] - lam[None, :], float("-inf"))
        dy_xt = tl.dot(dy.to(DOT_DTYPE), tl.trans(xt).to(DOT_DTYPE), input_precision=DOT_PREC)
        w_acc += tl.exp(seg) * dy_xt
        state_slot = ((b * nchunks + c) * nheads + h) * headdim * dstate
        state_offs = offs_p[:, None] * dstate + offs_n[None, :]                 # (P, N)
        pn_mask = p_mask[:, None] & n_mask[None, :]
        h0 = tl.load(H0_ptr + state_slot + state_offs, mask=pn_mask, other=0.0)
        g_st = tl.load(G_ptr + state_slot + state_offs, mask=pn_mask, other=0.0)
        dc_acc += tl.dot((dy * from_start[:, None]).to(DOT_DTYPE), h0.to(DOT_DTYPE),
                         input_precision=DOT_PREC)
        db_acc += tl.dot((xt * to_end[:, None]).to(DOT_DTYPE), g_st.to(DOT_DTYPE),
                         input_precision=DOT_PREC)

    if HAS_SEQ:
        w_acc = tl.where(seq_t[:, None] == seq_t[None, :], w_acc, 0.0)
    _dbdc_finish(w_acc, dc_acc, db_acc, B_ptr, C_ptr, dB_part_ptr, dC_part_ptr, b, g, split,
                 t_idx, offs_n, qn_mask, seqlen, ngroups, dstate,
                 s_bb, s_bl, s_bg, s_bn, s_cb, s_cl, s_cg, s_cn, DOT_DTYPE, DOT_PREC)


# ----------------------------------------------------------------------------------------------
# B4, flat: B4's dB and dC partials for BLOCK_H heads of one group a program, the heads' channels
# side by side as the columns of one (Q x BLOCK_H * BLOCK_P) tile. Per head, B4 spends most of
# its instructions on the Q x Q term L^h o (dy^h xt^h^T) (an exp, a mask and a product only P = 24
# deep). Here the decay factors instead, about a reference point r of each head's chunk
# (L_ts = exp(Lam_t - r) exp(r - Lam_s) = grow_t shrink_s):
#
#     W_ts = sum over the tile's columns f of (grow_t dy_t)[f] (shrink_s xt_s)[f],   s <= t
#
# one (Q x BLOCK_H P) @ (BLOCK_H P x Q) product a tile instead of a Q x Q exp and product a head.
# With r the middle of the head's range of Lam over the chunk, both factors stay within
# exp(+-span / 2), span = max Lam - min Lam: where a tile's largest span is at most SPAN_LIMIT
# (80: factors within e^+-40, far from fp32 / bf16 overflow and underflow for any realistic dy),
# the factored form runs; above it the tile takes B4's exact per-head terms. W only feeds dB and
# dC (rounded to 16 bits for W B and W^T C, as in B4), so with bf16 inputs the factored operands
# go in rounded once; fp16 inputs take hi + lo bf16 parts (bf16's range holds the factors, its
# 8 bits alone would cost fp16's precision); fp32 inputs, fp32 products. (B3's flat form, the
# same factoring for dxt and y', measured 4-5% slower than the per-head B3 on the H100 in
# session 20 and was removed in session 21.)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _chunk_bwd_dbdc_flat_kernel(
    x_ptr, B_ptr, C_ptr, seq_ptr, dy_ptr, H0_ptr, G_ptr, dtp_ptr, lam_ptr,
    dB_part_ptr, dC_part_ptr,
    seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len, tiles_per_split,
    s_xb, s_xl, s_xh, s_xp,
    s_bb, s_bl, s_bg, s_bn,
    s_cb, s_cl, s_cg, s_cn,
    s_dyb, s_dyl, s_dyh, s_dyp,
    s_seqb, s_seql,
    Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
    SPAN_LIMIT: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    F: tl.constexpr = BLOCK_H * BLOCK_P
    c = tl.program_id(1)
    bg = tl.program_id(0)
    pid_ns = tl.program_id(2)
    nchunks = tl.num_programs(1)
    n_blocks = tl.cdiv(dstate, BLOCK_N)
    pid_n = pid_ns % n_blocks
    split = pid_ns // n_blocks
    b = bg // ngroups
    g = bg % ngroups
    offs_q = tl.arange(0, Q)
    t_idx = c * Q + offs_q
    valid = t_idx < seqlen
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < dstate
    qn_mask = valid[:, None] & n_mask[None, :]
    offs_hb = tl.arange(0, BLOCK_H)
    offs_f = tl.arange(0, F)
    pair_ok = offs_q[:, None] >= offs_q[None, :]
    from_start_ok = valid
    to_end_ok = valid
    if HAS_SEQ:
        seq_t, seq_end, seq_prev = _seq_masks(seq_ptr, s_seqb, s_seql, b, c * Q, t_idx,
                                              seqlen, Q)
        from_start_ok = from_start_ok & (seq_t == seq_prev)
        to_end_ok = to_end_ok & (seq_t == seq_end)

    w_acc = tl.zeros((Q, Q), dtype=tl.float32)
    dc_acc = tl.zeros((Q, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((Q, BLOCK_N), dtype=tl.float32)
    group_end = (g + 1) * heads_per_group
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, tl.cdiv(heads_per_group, BLOCK_H))
    for tile in range(first_tile, last_tile):
        first = g * heads_per_group + tile * BLOCK_H
        h_ok, heads, f_head, f_p, f_ok = _head_tile(first, group_end, nheads, headdim, BLOCK_H,
                                                    BLOCK_P)
        tile_mask = valid[:, None] & f_ok[None, :]
        rows = (b * nheads + heads)[None, :] * padded_len + t_idx[:, None]      # (Q, BLOCK_H)
        lam = tl.load(lam_ptr + rows, mask=h_ok[None, :], other=0.0)
        dtp = tl.load(dtp_ptr + rows, mask=h_ok[None, :], other=0.0)
        lam_end = tl.load(lam_ptr + (b * nheads + heads) * padded_len + c * Q + Q - 1,
                          mask=h_ok, other=0.0)
        from_start = _per_column(tl.where(from_start_ok[:, None], tl.exp(lam), 0.0), Q, BLOCK_H,
                                 BLOCK_P)
        to_end = _per_column(tl.where(to_end_ok[:, None], tl.exp(lam_end[None, :] - lam), 0.0), Q,
                             BLOCK_H, BLOCK_P)
        x_tile = tl.load(x_ptr + b * s_xb + t_idx[:, None] * s_xl + f_head[None, :] * s_xh
                         + f_p[None, :] * s_xp, mask=tile_mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + b * s_dyb + t_idx[:, None] * s_dyl + f_head[None, :] * s_dyh
                     + f_p[None, :] * s_dyp, mask=tile_mask, other=0.0).to(tl.float32)
        xt = x_tile * _per_column(dtp, Q, BLOCK_H, BLOCK_P)
        lam_hi = tl.max(lam, axis=0)
        lam_lo = tl.min(lam, axis=0)
        if tl.max(lam_hi - lam_lo, axis=0) <= SPAN_LIMIT:
            ref = (lam_hi + lam_lo) * 0.5
            dys = dy * _per_column(tl.exp(lam - ref[None, :]), Q, BLOCK_H, BLOCK_P)
            xs = xt * _per_column(tl.exp(ref[None, :] - lam), Q, BLOCK_H, BLOCK_P)
            if DOT_DTYPE == tl.float32:
                w_acc = tl.dot(dys, tl.trans(xs), acc=w_acc, input_precision="ieee")
            elif DOT_DTYPE == tl.bfloat16:
                w_acc = _dot_bf16(dys.to(tl.bfloat16), tl.trans(xs.to(tl.bfloat16)), w_acc,
                                  EMULATE_BF16)
            else:
                dys_hi, dys_lo = _split_bf16(dys)
                xs_hi, xs_lo = _split_bf16(xs)
                w_acc = _dot_bf16(dys_hi, tl.trans(xs_hi), w_acc, EMULATE_BF16)
                w_acc = _dot_bf16(dys_lo, tl.trans(xs_hi), w_acc, EMULATE_BF16)
                w_acc = _dot_bf16(dys_hi, tl.trans(xs_lo), w_acc, EMULATE_BF16)
        else:
            # the exact form, head by head (B4's own terms, each from its head's columns)
            for j in tl.static_range(BLOCK_H):
                lam_j = tl.sum(tl.where(offs_hb[None, :] == j, lam, 0.0), axis=1)
                seg = tl.where(pair_ok, lam_j[:, None] - lam_j[None, :], float("-inf"))
                cols_j = (offs_f // BLOCK_P == j)[None, :]
                dy_xt = tl.dot(tl.where(cols_j, dy, 0.0).to(DOT_DTYPE),
                               tl.trans(xt).to(DOT_DTYPE), input_precision=DOT_PREC)
                w_acc += tl.exp(seg) * dy_xt
        state_rows = (b * nchunks + c) * nheads * headdim + f_head * headdim + f_p
        fn_mask = f_ok[:, None] & n_mask[None, :]
        state_offs = state_rows[:, None] * dstate + offs_n[None, :]             # (F, N)
        h0 = tl.load(H0_ptr + state_offs, mask=fn_mask, other=0.0)
        g_st = tl.load(G_ptr + state_offs, mask=fn_mask, other=0.0)
        dc_acc += tl.dot((dy * from_start).to(DOT_DTYPE), h0.to(DOT_DTYPE), input_precision=DOT_PREC)
        db_acc += tl.dot((xt * to_end).to(DOT_DTYPE), g_st.to(DOT_DTYPE), input_precision=DOT_PREC)

    # W's pairs t < s: 0 (the factored products leave exp(Lam_t - Lam_s) >= 1 there, possibly
    # overflowed: dropped, never summed into anything)
    w_acc = tl.where(pair_ok, w_acc, 0.0)
    if HAS_SEQ:
        w_acc = tl.where(seq_t[:, None] == seq_t[None, :], w_acc, 0.0)
    _dbdc_finish(w_acc, dc_acc, db_acc, B_ptr, C_ptr, dB_part_ptr, dC_part_ptr, b, g, split,
                 t_idx, offs_n, qn_mask, seqlen, ngroups, dstate,
                 s_bb, s_bl, s_bg, s_bn, s_cb, s_cl, s_cg, s_cn, DOT_DTYPE, DOT_PREC)


# ----------------------------------------------------------------------------------------------
# B5: the backward's last step, one launch: dB, dC = the sums of B4's head splits, written in the
# inputs' dtype (into any strides); dA, dD, d dt_bias = B3's per-(b, chunk) partials summed over
# b and chunks. Programs below n_elem_programs take BLOCK elements of dB and dC each; program
# n_elem_programs + h takes head h's sums. The sums run in a fixed order (no atomics): the same
# inputs give the same bits. It replaces 7 torch reductions and casts: 22 -> 16 kernels per forward
# + backward, and GPU time 1.495 -> 1.447 ms (b8 l2048 h64 p24 n128) and 0.329 -> 0.285 ms (h8)
# on the H200 (session 8; each torch op also costs the host a dispatch and a launch).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _finalize_grads_kernel(
    dB_part_ptr, dC_part_ptr, dB_ptr, dC_ptr,
    dA_part_ptr, dD_part_ptr, dbias_part_ptr, dA_ptr, dD_ptr, dbias_ptr,
    splits, seqlen, ngroups, dstate, n_elem, n_elem_programs, batch, nheads, nchunks, headdim,
    s_dbb, s_dbl, s_dbg, s_dbn,
    s_dcb, s_dcl, s_dcg, s_dcn,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < n_elem_programs:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elem
        acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_c = tl.zeros((BLOCK,), dtype=tl.float32)
        part_b = dB_part_ptr + offs   # pointers step by n_elem (64-bit arithmetic)
        part_c = dC_part_ptr + offs
        for _ in range(splits):
            acc_b += tl.load(part_b, mask=mask, other=0.0)
            acc_c += tl.load(part_c, mask=mask, other=0.0)
            part_b += n_elem
            part_c += n_elem
        # offs indexes the partials' contiguous (b, l, g, n); the outputs may be strided views
        n = offs % dstate
        g = (offs // dstate) % ngroups
        l_ = (offs // (dstate * ngroups)) % seqlen
        b = offs // (dstate * ngroups * seqlen)
        tl.store(dB_ptr + b * s_dbb + l_ * s_dbl + g * s_dbg + n * s_dbn,
                 acc_b.to(dB_ptr.dtype.element_ty), mask=mask)
        tl.store(dC_ptr + b * s_dcb + l_ * s_dcl + g * s_dcg + n * s_dcn,
                 acc_c.to(dC_ptr.dtype.element_ty), mask=mask)
    else:
        h = pid - n_elem_programs
        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_P)
        p_mask = offs_p < headdim
        acc_a = tl.zeros((BLOCK_R,), dtype=tl.float32)
        acc_bias = tl.zeros((BLOCK_R,), dtype=tl.float32)
        acc_d = tl.zeros((BLOCK_R,), dtype=tl.float32)                 # D per head
        acc_dp = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)        # D per channel
        rows = batch * nchunks
        for r0 in range(0, rows, BLOCK_R):
            r = r0 + offs_r
            r_mask = r < rows
            slot = ((r // nchunks) * nheads + h) * nchunks + r % nchunks     # part[b, h, c]
            acc_a += tl.load(dA_part_ptr + slot, mask=r_mask, other=0.0)
            if HAS_BIAS:
                acc_bias += tl.load(dbias_part_ptr + slot, mask=r_mask, other=0.0)
            if HAS_D:
                if D_PER_CHANNEL:
                    acc_dp += tl.load(dD_part_ptr + slot[:, None] * headdim + offs_p[None, :],
                                      mask=r_mask[:, None] & p_mask[None, :], other=0.0)
                else:
                    acc_d += tl.load(dD_part_ptr + slot, mask=r_mask, other=0.0)
        tl.store(dA_ptr + h, tl.sum(acc_a, axis=0).to(dA_ptr.dtype.element_ty))
        if HAS_BIAS:
            tl.store(dbias_ptr + h, tl.sum(acc_bias, axis=0).to(dbias_ptr.dtype.element_ty))
        if HAS_D:
            if D_PER_CHANNEL:
                tl.store(dD_ptr + h * headdim + offs_p,
                         tl.sum(acc_dp, axis=0).to(dD_ptr.dtype.element_ty), mask=p_mask)
            else:
                tl.store(dD_ptr + h, tl.sum(acc_d, axis=0).to(dD_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _num_warps(Q: int, block_p: int) -> int:
    return 8 if Q >= 128 or block_p >= 128 else 4


# Launch options (num_warps, num_stages, maxnreg, the free tile sizes) of each kernel, by its short
# name ("cb", "state_fwd_fused", "chunk_state_fwd", "state_pass_fwd", "chunk_out_fwd",
# "state_bwd_fused", "chunk_dstate_bwd", "state_pass_bwd", "bwd_dx", "bwd_dbdc", "finalize"). Entries here
# replace the defaults chosen in _ssd_forward / _ssd_backward; scripts/tune_ssd.py sets them to
# time alternatives against each other on the GPU. Results do not depend on them beyond rounding.
# The defaults are that script's winners on an H200 (bf16; scan shapes of the D=768 block, issue
# 3's h64 p24 case, ViT-B/16 and a 3-head narrow width; docs/performance.md, session 4).
LAUNCH_OVERRIDES: dict[str, dict[str, int | None]] = {}


def _launch(kernel: str, **defaults) -> dict:
    opts = dict(defaults)
    opts.update(LAUNCH_OVERRIDES.get(kernel, {}))
    return opts


def _register_caps_apply(Q: int, block_p: int, dot_dtype) -> bool:
    """Whether the measured register caps apply: Q = 64, head dim <= 32, 16-bit operands (every
    cap was tuned there; wider heads, other chunks and fp32 keep ptxas's choice)."""
    return Q == 64 and block_p <= 32 and dot_dtype != tl.float32


def _backward_register_cap(Q: int, block_p: int, dot_dtype) -> int | None:
    """maxnreg for B3 and B4, or None for ptxas's own choice.

    Both are latency-bound (ncu in lm_130m's step: ~12% achieved occupancy, ~70% of the cycles
    with no warp eligible): left alone ptxas gives them 255 registers a thread, 2 programs of 4
    warps an SM. Capped at 128 (4 programs; ptxas spills a few hundred bytes a thread to
    L1-cached local memory) they ran 1.24 - 1.31x (B3) and 1.05 - 1.16x (B4, then at 8 warps and
    2 stages) faster at every p = 24 shape tuned, bf16, Q = 64 (H200, Triton 3.6, session 7).
    Wider heads, other chunks and fp32 operands were not measured and keep ptxas's choice."""
    return 128 if _register_caps_apply(Q, block_p, dot_dtype) else None


# Default launch options of the four heavy kernels (before LAUNCH_OVERRIDES), in one place so that
# scripts/kernel_regs.py compiles exactly what the scan launches.


def _chunk_out_fwd_options(Q: int, block_p: int, block_n_full: int, dot_dtype) -> dict:
    # (num_stages=1 with the whole N was 1.10x faster at p=24, but num_stages=1 is where Triton
    # 3.6 miscompiled bwd_dbdc on the H200 (an illegal address at n=16): not used anywhere.)
    # Registers capped at 96 where the caps apply: 1.06x at lm_step (0.312 -> 0.294 ms), 1.24x at
    # vit (0.187 -> 0.151 ms), H200, session 8; the best of 54 vetted candidates at either shape
    # was at most 1.11x / 1.24x.
    return dict(BLOCK_N=min(block_n_full, 64), num_warps=_num_warps(Q, block_p),
                maxnreg=96 if _register_caps_apply(Q, block_p, dot_dtype) else None)


def _chunk_states_options(rows: int, block_n_full: int) -> dict:
    """K1 / B1 (``_chunk_states_kernel``): BLOCK_M rows of a group's flat (head, p) index."""
    return dict(BLOCK_M=min(64, _pow2(rows)), BLOCK_N=min(block_n_full, 128), num_warps=4)


def _state_walk_options(rows: int, dstate: int, walks: int | None = None,
                        nchunks: int = 0, sms: int = 132) -> dict:
    """The sequential form's walk (``_state_walk_kernel``): whole 128-wide state rows, 64 rows of
    the flat (head, p) index and 8 warps (H100, session 14: 1.08 - 1.33x over 4 warps with 64-wide
    N blocks, at the block, ViT and 4 x 16384 shapes; 32-wide N blocks, for more walks, were
    1.5 - 2x slower: each reloads the x tile and its weights).

    ``walks``: how many walks that 64-row tile makes (batch rows x groups x row blocks), over
    ``nchunks`` chunks each. Where they are few, narrower row tiles at 4 warps make more of them
    (H100, session 19, ``tune_ssd`` at the block's layout, fwd / bwd walk):
      - 4 x 16384 (96 walks of 256 chunks): 16 rows 0.470 / 0.446 ms against 0.540 / 0.590;
      - 8 x 2048 (192 walks of 32 chunks): 32 rows 0.102 / 0.096 against 0.102 / 0.112;
      - ViT b64 l197 (packed: 96 walks of 50 chunks): 64 rows stays best (16: 0.121 / 0.110
        against 0.105 / 0.102), as at b32 l1024 (768 walks).
    Without ``walks``: the 64-row tile, which ``_state_form``'s rule counts walks in, and which
    segmented walks keep (their segments were measured with it; narrower tiles are not measured
    there)."""
    block_m, warps = min(64, _pow2(rows)), 8
    if walks is not None and walks < sms and nchunks >= 128:      # few long walks: 4x as many
        block_m, warps = min(block_m, 16), 4
    elif walks is not None and sms <= walks < 2 * sms:            # 1-2 walks an SM: twice as many
        block_m, warps = min(block_m, 32), 4
    return dict(BLOCK_M=block_m, BLOCK_N=min(_pow2(dstate), 128), num_warps=warps)


def _bwd_dx_options(Q: int, block_p: int, block_n_full: int, dot_dtype) -> dict:
    # 32-wide N steps, 3 stages: 1.03x - 1.12x over 64-wide at every shape tuned. 4 warps at
    # Q = 64 (8 warps: 2.99 vs 2.17 ms, session 1). The register cap: _backward_register_cap.
    return dict(BLOCK_N=min(block_n_full, 32), num_stages=3, num_warps=_num_warps(Q, block_p),
                maxnreg=_backward_register_cap(Q, block_p, dot_dtype))


def _bwd_dbdc_block_n(Q: int, block_n_full: int) -> int:
    """B4's default N block, chosen first: the head splits (hence ``several``) depend on it."""
    return min(block_n_full, 128 if Q <= 64 else 64)


def _bwd_dbdc_options(Q: int, block_p: int, block_n: int, dot_dtype, several: bool) -> dict:
    """``several``: a program sums more than one head of its group."""
    cap = _backward_register_cap(Q, block_p, dot_dtype)
    if cap:  # with the register cap: 8 warps, 2 stages (1.05 - 1.16x, session 7)
        return dict(BLOCK_N=block_n, num_stages=2, num_warps=8, maxnreg=cap)
    # 8 warps pay with 64-wide heads and several heads per program; p = 24: 4 warps (1.1x). With
    # one head per program (few heads) 4 warps and num_stages=1 measured 1.5x faster, but Triton
    # 3.6 miscompiles that on the H200 at n = 16 (illegal address; fine with 2 or 3 stages or 8
    # warps), so it keeps 3 stages.
    return dict(BLOCK_N=block_n, num_stages=3,
                num_warps=8 if Q >= 64 and block_p >= 64 and several else 4)


def _bwd_dbdc_flat_options(Q: int, block_p: int, block_n_full: int, dot_dtype,
                           heads_per_group: int) -> dict:
    # 16-bit operands: 128 columns a tile (4 heads of 24, padded to 32), B4's N block, 8 warps, 2
    # stages: the best of 16 on the H100 (session 21, b8 l2048 h64 p24: 0.320 ms; next 0.356 at 2
    # heads, N 64, 4 warps; the worst 2.59), and the best at ViT's and lm_130m's shapes too.
    # Offline (Triton 3.6, sm_90a, the block's p = 24): 255 registers (304 B spills), 162 KB of
    # shared memory, one program an SM. fp32 operands (asked for with MATMAMBA_SSD_BWD_DBDC=flat)
    # take 4 bytes where bf16 take 2: 64 columns and N steps of 32 (128 columns and 128-wide N
    # steps needed 290 KB at p = 24 on the H100, over the SM's 227 KB).
    columns = 64 if dot_dtype == tl.float32 else 128
    block_n = 32 if dot_dtype == tl.float32 else _bwd_dbdc_block_n(Q, block_n_full)
    return dict(BLOCK_H=min(_pow2(heads_per_group, 1), max(1, columns // block_p)),
                BLOCK_N=min(block_n, block_n_full), num_warps=8, num_stages=2,
                SPAN_LIMIT=_FLAT_SPAN_LIMIT, EMULATE_BF16=_interpreting())


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# The sequential form is chosen where its walks (one per batch row, group and 64 rows of the flat
# (head, p) index) number at least this many per SM. Measured on an H100, bf16, the block's layout,
# fwd+bwd of the scan, parallel vs sequential form (session 14, visit 2; the walks at 4 warps then):
#   walks/SM  shape (b, l, h)           parallel   sequential
#     1.45    8 x 2048, 64 heads         1.490 ms   1.272
#     0.73    4 x 16384, 64 heads        5.659      5.187
#     0.73    8 x 2048, 32 heads         0.818      0.775
#     0.36    8 x 2048, 16 heads         0.493      0.498
#     0.18    8 x 2048, 8 heads          0.326      0.390
#     0.18    1 x 65536, 64 heads        6.215      7.156
# (and ViT b64 l197, 4 packed rows of 3152 tokens: 1.473 vs 1.224; b32 l1024: 2.902 vs 2.369).
_WALKS_PER_SM = 0.5

# Rows of at least _SEGMENT_MIN_CHUNKS chunks with fewer walks than that take the sequential form
# with each walk cut into segments (``_state_walk_kernel``), for about _SEGMENT_WALKS_PER_SM walks
# an SM, each segment at least _SEGMENT_MIN_LENGTH chunks long. There, the parallel form moves
# every chunk's fp32 state through memory (1 x 65536 tokens, 64 heads of 24, N 128: 805 MB each
# way) and the plain walks are too few: 1 x 64K cost 6.2 ms of scan (parallel) or 7.2
# (sequential) where 4 x 16K cost 5.2 (H100, session 14), and the block's time per token at
# l = 64K was 1.16x that at l = 1K (session 15, visit 2; issue 3 asks for at most 1.15x).
# Segmented, the block at 1 x 64K took 10.39 ms against 9.77 at 64 x 1K (1.06x), where the
# parallel form took 11.72 (H100, session 16). Segments forced at 1 x 64K: 2 / 4 / 6 / 9 (this
# rule) / 12 / 16 -> 13.35 / 11.23 / 10.83 / 10.42 / 10.63 / 10.52 ms; 4 x 16K (96 walks, not
# cut) took 10.35 ms as it is and 10.42 / 10.57 in 2 / 4 segments.
_SEGMENT_MIN_CHUNKS = 256
_SEGMENT_WALKS_PER_SM = 1.5
_SEGMENT_MIN_LENGTH = 64


def _walks(batch_groups: int, rows: int, dstate: int) -> int:
    """How many walks the sequential form makes at the walk's 64-row tile, the unit both rules
    count in (``_state_form``, ``_state_walk_options``): the defaults, since launch overrides
    tune a form, they do not choose it."""
    tile = _state_walk_options(rows, dstate)
    return batch_groups * cdiv(rows, tile["BLOCK_M"]) * cdiv(dstate, tile["BLOCK_N"])


def _state_form(batch_groups: int, rows: int, dstate: int, nchunks: int, device) -> tuple[str, int]:
    """How states cross chunks -> (form, segments). "sequential" (K1+K2 / B1+B2 fused: each
    program walks the chunks with its tile of the state in registers; no chunk state goes through
    memory) where there are walks enough to fill the GPU (_WALKS_PER_SM), or where rows are long
    enough to cut each walk into ``segments`` (_SEGMENT_*); otherwise "parallel" (chunk states
    written by a chunk-parallel kernel, then a light pass over them, bandwidth-bound). ``rows``:
    a group's heads x head dim. MATMAMBA_SSD_STATE and MATMAMBA_SSD_SEGMENTS override."""
    forced = os.environ.get("MATMAMBA_SSD_STATE", "").strip()
    if forced and forced not in ("sequential", "parallel"):
        raise ValueError(f"MATMAMBA_SSD_STATE must be 'sequential' or 'parallel'; got {forced!r}")
    forced_segments = os.environ.get("MATMAMBA_SSD_SEGMENTS", "").strip()
    if forced_segments and not (forced_segments.isdigit() and int(forced_segments) >= 1):
        raise ValueError("MATMAMBA_SSD_SEGMENTS must be a number of segments >= 1 (the sequential "
                         f"form's walks cut into that many); got {forced_segments!r}")
    walks = _walks(batch_groups, rows, dstate)
    sms = _sm_count(device)
    few_walks = walks < _WALKS_PER_SM * sms
    form = forced or ("parallel" if few_walks and nchunks < _SEGMENT_MIN_CHUNKS else "sequential")
    if form == "parallel":
        return form, 1
    if forced_segments:
        return form, min(int(forced_segments), nchunks)
    if few_walks and nchunks >= _SEGMENT_MIN_CHUNKS:
        wanted = cdiv(math.ceil(_SEGMENT_WALKS_PER_SM * sms), walks)
        return form, max(1, min(wanted, nchunks // _SEGMENT_MIN_LENGTH))
    return form, 1


# CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2^31 - 1). The kernels put the
# (batch x heads) index, which grows with the batch (a ViT batch of 1024 at 64 heads is already
# 65536), on axis 0, and the chunk index on axis 1.
_MAX_GRID_YZ = 65535


def _check_chunks(nchunks: int, Q: int) -> None:
    if nchunks > _MAX_GRID_YZ:
        raise ValueError(f"ssd_scan (triton): a sequence of {nchunks} chunks of {Q} tokens exceeds the "
                         f"{_MAX_GRID_YZ} chunks one launch can cover (at most {_MAX_GRID_YZ * Q} tokens); "
                         f"pass it in pieces, carrying the final state as the next initial_state")


def _pass_states(x, lam, w_end, V, seq_idx, start, states, end) -> None:
    """K1 + K2 (``w_end``: K0's weights; x, V = B; ``states`` the states entering each chunk,
    ``end`` the final state) or, with ``w_end`` None, B1 + B2 (x = dy, V = C; ``states`` the
    gradients of the states leaving each chunk, ``end`` the initial state's gradient), in the
    state form ``_state_form`` picks. ``start``: the initial state (backward: the final state's
    gradient) or None for zeros."""
    forward = w_end is not None
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = V.shape[2], V.shape[3]
    heads_per_group = nheads // ngroups
    nchunks = states.shape[1]
    padded_len = lam.shape[-1]
    Q = padded_len // nchunks
    rows = heads_per_group * headdim
    dot_dtype, dot_prec = _dot_config(x.dtype)
    seq_arg = seq_idx if seq_idx is not None else x
    s_seq = seq_idx.stride() if seq_idx is not None else (0, 0)
    heads_packed = x.stride(2) == headdim * x.stride(3)
    direction = "fwd" if forward else "bwd"
    form, segments = _state_form(batch * ngroups, rows, dstate, nchunks, x.device)
    if form == "sequential":
        seg_chunks = cdiv(nchunks, segments)
        segments = cdiv(nchunks, seg_chunks)  # none left empty (e.g. 10 chunks in 4 -> 3 x 3 + 1)
        # (segmented walks keep the 64-row tile their rule was measured with)
        walks = _walks(batch * ngroups, rows, dstate) if segments == 1 else None
        opts = _launch(f"state_{direction}_fused",
                       **_state_walk_options(rows, dstate, walks, nchunks, _sm_count(x.device)))
        tiles = cdiv(rows, opts["BLOCK_M"]) * cdiv(dstate, opts["BLOCK_N"])
        seg_end = seg_decay = lam  # (unused with one segment)
        if segments > 1:  # where each segment but the last ends, and its decay
            seg_end = torch.empty(batch, segments, nheads, headdim, dstate, device=x.device,
                                  dtype=torch.float32)
            seg_decay = torch.empty(batch, segments, nheads * headdim, device=x.device,
                                    dtype=torch.float32)
        args = (x, w_end if forward else lam, lam, V, seq_arg,
                start if start is not None else lam, states, end, seg_end, seg_decay,
                seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len, nchunks,
                seg_chunks, *x.stride(), *V.stride(), *s_seq)
        constants = dict(Q=Q, REVERSE=not forward, HAS_START=start is not None,
                         HAS_SEQ=seq_idx is not None, HEADS_PACKED=heads_packed,
                         DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec, **opts)
        if segments > 1:
            launch(_state_walk_kernel, (batch * ngroups, tiles, segments - 1), *args,
                   SUMMARY=True, **constants)
        launch(_state_walk_kernel, (batch * ngroups, tiles, segments), *args, SUMMARY=False,
               **constants)
        return
    local = torch.empty(states.shape, device=x.device, dtype=torch.float32)
    opts = _launch("chunk_state_fwd" if forward else "chunk_dstate_bwd",
                   **_chunk_states_options(rows, _pow2(dstate)))
    grid = (batch * ngroups, nchunks, cdiv(rows, opts["BLOCK_M"]) * cdiv(dstate, opts["BLOCK_N"]))
    launch(_chunk_states_kernel, grid,
        x, w_end if forward else lam, lam, V, seq_arg, local,
        seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len,
        *x.stride(), *V.stride(), *s_seq,
        Q=Q, TO_END=forward, HAS_SEQ=seq_idx is not None, HEADS_PACKED=heads_packed,
        DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec, **opts)
    state_size = headdim * dstate
    opts = _launch(f"state_pass_{direction}", BLOCK=min(1024, next_power_of_2(state_size)),
                   num_warps=4)
    launch(_state_pass_kernel, (batch * nheads, cdiv(state_size, opts["BLOCK"])),
        local, states, start if start is not None else local, end, lam, seq_arg,
        seqlen, nheads, state_size, padded_len, nchunks, *s_seq,
        Q=Q, HAS_START=start is not None, HAS_SEQ=seq_idx is not None, REVERSE=not forward,
        **opts)


def _ssd_forward(x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dt_softplus, dt_lo, dt_hi,
                 Q, pack=1):
    """-> y, final state, (dt', Lam, CB, entering states). ``pack`` > 1: k rows scanned as one
    (``pack_factor``; no initial state or seq_idx then, inputs ``_packable``): y comes back in
    x's shape, the intermediates and the final state (not one row's: unused) in the packed one."""
    y_shape = x.shape
    if pack > 1:
        _check_pack(pack, x.shape[0], initial_state, seq_idx)
        rows, seqlen0 = x.shape[0] // pack, x.shape[1]
        x, dt, B, C = (_pack_rows(t, pack) for t in (x, dt, B, C))
        seq_idx = _packed_segments(rows, pack, seqlen0, x.device)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    heads_per_group = nheads // ngroups
    nchunks = max(1, cdiv(seqlen, Q))
    _check_chunks(nchunks, Q)
    padded_len = nchunks * Q
    dev = x.device
    dot_dtype, dot_prec = _dot_config(x.dtype)
    state_dtype = _state_dtype(x.dtype)
    block_p = _pow2(headdim)
    block_n_full = _pow2(dstate)
    block_n = min(block_n_full, 128)
    warps = _num_warps(Q, block_p)
    seq_arg = seq_idx if seq_idx is not None else x
    s_seq = seq_idx.stride() if seq_idx is not None else (0, 0)

    dtp = torch.empty(batch, nheads, padded_len, device=dev, dtype=torch.float32)
    lam = torch.empty_like(dtp)
    CB = torch.empty(batch, nchunks, ngroups, Q, Q, device=dev, dtype=torch.float32)
    entering = torch.empty(batch, nchunks, nheads, headdim, dstate, device=dev,
                           dtype=state_dtype)
    final_state = torch.empty(batch, nheads, headdim, dstate, device=dev, dtype=torch.float32)
    y = torch.empty(batch, seqlen, nheads, headdim, device=dev, dtype=x.dtype)

    w_end = torch.empty_like(dtp)  # K1's weights (module docstring), K0 -> K1 only
    launch(_cb_kernel, (batch * ngroups, nchunks),
        C, B, seq_arg, CB, dt, A, dt_bias if dt_bias is not None else A, dtp, lam, w_end,
        seqlen, nheads, heads_per_group, ngroups, dstate, padded_len, dt_lo, dt_hi,
        *C.stride(), *B.stride(), *dt.stride(), *s_seq,
        Q=Q, HAS_SEQ=seq_idx is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec,
        **_launch("cb", BLOCK_N=block_n, BLOCK_H=min(64, _pow2(heads_per_group)), num_warps=warps))
    _pass_states(x, lam, w_end, B, seq_idx, initial_state, entering, final_state)
    launch(_chunk_out_fwd_kernel, (batch * nheads, nchunks),
           x, C, CB, entering, dtp, lam, D if D is not None else A, seq_arg, y,
           seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len,
           *x.stride(), *C.stride(), *y.stride(), *s_seq,
           Q=Q, BLOCK_P=block_p, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2,
           HAS_SEQ=seq_idx is not None, DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec,
           **_launch("chunk_out_fwd", **_chunk_out_fwd_options(Q, block_p, block_n_full, dot_dtype)))
    return y.view(y_shape), final_state, (dtp, lam, CB, entering)


def _head_splits(batch, nchunks, ngroups, heads_per_group, n_blocks, device) -> int:
    """How many programs share one group's heads in B4: enough programs to fill the GPU."""
    programs = batch * nchunks * ngroups * n_blocks
    if device.type != "cuda":
        return min(2, heads_per_group)  # exercise the split path under the interpreter
    return max(1, min(heads_per_group, cdiv(4 * _sm_count(device), programs)))


def _bwd_dbdc(x, B, C, seq_arg, dy, entering, leaving_grad, dtp, lam, has_seq, s_seq, Q,
              padded_len, block_p, block_n_full, dot_dtype, dot_prec):
    """B4, per group: -> (dB partials, dC partials, splits). A program sums one split of the
    group's heads (per-head form) or of its tiles of BLOCK_H heads (flat form; per head instead
    where its tiles do not fit in shared memory)."""
    args = (x, B, C, seq_arg, dy, entering, leaving_grad, dtp, lam, has_seq, s_seq, Q, padded_len,
            block_p, block_n_full, dot_dtype, dot_prec)
    key = (x.device, str(dot_dtype), Q, block_p, block_n_full, has_seq)
    if _bwd_dbdc_form(dot_dtype) == "flat" and key not in _FLAT_B4_TOO_LARGE:
        try:
            return _bwd_dbdc_launch(True, *args)
        except OutOfResources:  # raised when the compiled kernel loads, before it is launched
            _FLAT_B4_TOO_LARGE.add(key)
    return _bwd_dbdc_launch(False, *args)


def _bwd_dbdc_launch(flat, x, B, C, seq_arg, dy, entering, leaving_grad, dtp, lam, has_seq, s_seq,
                     Q, padded_len, block_p, block_n_full, dot_dtype, dot_prec):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    heads_per_group = nheads // ngroups
    nchunks = entering.shape[1]
    if flat:
        opts = _launch("bwd_dbdc_flat", **_bwd_dbdc_flat_options(Q, block_p, block_n_full, dot_dtype,
                                                                 heads_per_group))
        units = cdiv(heads_per_group, opts["BLOCK_H"])
        block_n = opts["BLOCK_N"]
    else:
        units = heads_per_group
        block_n = _launch("bwd_dbdc", BLOCK_N=_bwd_dbdc_block_n(Q, block_n_full))["BLOCK_N"]
    n_blocks = cdiv(dstate, block_n)
    splits = _head_splits(batch, nchunks, ngroups, units, n_blocks, x.device)
    per_split = cdiv(units, splits)
    splits = cdiv(units, per_split)
    if not flat:
        opts = _launch("bwd_dbdc", **_bwd_dbdc_options(Q, block_p, block_n, dot_dtype,
                                                       several=per_split > 1))
    dB_part = torch.empty(splits, batch, seqlen, ngroups, dstate, device=x.device,
                          dtype=torch.float32)
    dC_part = torch.empty_like(dB_part)
    launch(_chunk_bwd_dbdc_flat_kernel if flat else _chunk_bwd_dbdc_kernel,
        (batch * ngroups, nchunks, n_blocks * splits),
        x, B, C, seq_arg, dy, entering, leaving_grad, dtp, lam, dB_part, dC_part,
        seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len, per_split,
        *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *s_seq,
        Q=Q, BLOCK_P=block_p, HAS_SEQ=has_seq, DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec, **opts)
    return dB_part, dC_part, splits


def _ssd_backward(dy, d_final, saved, dt_softplus, dt_lo, dt_hi, Q, needs, out=None, pack=1):
    """Launch the backward. ``out`` may hold tensors (any strides) to write "dx", "ddt", "dB",
    "dC" into instead of allocating them (then the returned entries are those tensors). ``pack``:
    the forward's (``saved`` holds the inputs in their own shapes, the intermediates packed)."""
    out = out or {}
    (x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dtp, lam, CB, entering) = saved
    if pack > 1:
        _check_pack(pack, x.shape[0], initial_state, seq_idx)
        if d_final is not None and d_final.numel():
            raise ValueError("ssd_scan (triton): packed rows have no final state to take a gradient of")
        shapes = dict(dx=x.shape, ddt=dt.shape, dB=B.shape, dC=C.shape)
        rows, seqlen0 = x.shape[0] // pack, x.shape[1]
        x, dt, B, C = (_pack_rows(t, pack) for t in (x, dt, B, C))
        dy = dy.reshape(rows, pack * seqlen0, *dy.shape[2:])
        out = {name: _pack_rows(t, pack) for name, t in out.items()}
        seq_idx = _packed_segments(rows, pack, seqlen0, x.device)
        grads = _ssd_backward(dy, None, (x, dt, A, B, C, D, dt_bias, None, seq_idx, dtp, lam, CB,
                                         entering), dt_softplus, dt_lo, dt_hi, Q, needs, out)
        dx, ddt, dA, dB, dC, dD, d_bias, _ = grads
        return (dx.view(shapes["dx"]), ddt.view(shapes["ddt"]), dA, dB.view(shapes["dB"]),
                dC.view(shapes["dC"]), dD, d_bias, None)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    heads_per_group = nheads // ngroups
    nchunks = entering.shape[1]
    padded_len = nchunks * Q
    dev = x.device
    dot_dtype, dot_prec = _dot_config(x.dtype)
    block_p = _pow2(headdim)
    block_n_full = _pow2(dstate)
    seq_arg = seq_idx if seq_idx is not None else x
    s_seq = seq_idx.stride() if seq_idx is not None else (0, 0)

    # B1 + B2: what each chunk's outputs ask of its entering state, passed backwards;
    # G[c] = gradient of the state leaving chunk c
    leaving_grad = torch.empty_like(entering)
    d_initial = torch.empty(batch, nheads, headdim, dstate, device=dev, dtype=torch.float32)
    _pass_states(dy, lam, None, C, seq_idx, d_final, leaving_grad, d_initial)

    # B3: per head. B3 and B4 (below) stay two launches although both reload each head's x, dy
    # and states: one kernel doing both per (group, chunk, split of the heads) was measured
    # 1.14 - 1.83x slower on the H200 (Triton 3.6; commit ac90584, docs/performance.md session 5).
    # Holding dC, dB and W across the heads on top of B3's tiles takes 255 registers a thread
    # with spills: one program per SM, the heads walked serially. B3 doing 2 or 4 heads a program
    # (unrolled) was never faster either (session 7).
    dx = out.get("dx")
    if dx is None:
        dx = torch.empty(batch, seqlen, nheads, headdim, device=dev, dtype=x.dtype)
    ddt = out.get("ddt")
    if ddt is None:
        ddt = torch.empty(batch, seqlen, nheads, device=dev, dtype=dt.dtype)
    dA_part = torch.empty(batch, nheads, nchunks, device=dev, dtype=torch.float32)
    per_channel = D is not None and D.dim() == 2
    dD_part = torch.empty(batch, nheads, nchunks, *((headdim,) if per_channel else ()),
                          device=dev, dtype=torch.float32)
    dbias_part = torch.empty(batch, nheads, nchunks, device=dev, dtype=torch.float32)
    launch(_chunk_bwd_dx_kernel, (batch * nheads, nchunks),
           x, dt, A, dt_bias if dt_bias is not None else A, B, C, D if D is not None else A,
           seq_arg, dy, CB, entering, leaving_grad, dtp, lam,
           dx, ddt, dA_part, dD_part, dbias_part,
           seqlen, nheads, heads_per_group, ngroups, headdim, dstate, padded_len, dt_lo, dt_hi,
           *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *dy.stride(), *dx.stride(),
           *ddt.stride(), *s_seq,
           Q=Q, BLOCK_P=block_p, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
           HAS_D=D is not None, D_PER_CHANNEL=per_channel, HAS_SEQ=seq_idx is not None,
           DOT_DTYPE=dot_dtype, DOT_PREC=dot_prec,
           **_launch("bwd_dx", **_bwd_dx_options(Q, block_p, block_n_full, dot_dtype)))

    # B4: per group
    dB_part, dC_part, splits = _bwd_dbdc(x, B, C, seq_arg, dy, entering, leaving_grad, dtp, lam,
                                         seq_idx is not None, s_seq, Q, padded_len, block_p,
                                         block_n_full, dot_dtype, dot_prec)

    # B5: head splits summed into dB, dC; per-chunk partials into dA, dD, d dt_bias
    dB = out["dB"] if "dB" in out else torch.empty(B.shape, device=dev, dtype=B.dtype)
    dC = out["dC"] if "dC" in out else torch.empty(C.shape, device=dev, dtype=C.dtype)
    dA = torch.empty(nheads, device=dev, dtype=A.dtype)
    dD = torch.empty(D.shape, device=dev, dtype=D.dtype) if D is not None else None
    d_bias = torch.empty(nheads, device=dev, dtype=dt_bias.dtype) if dt_bias is not None else None
    n_elem = batch * seqlen * ngroups * dstate
    opts = _launch("finalize", BLOCK=2048, BLOCK_R=32, num_warps=4)  # 1.01 - 1.12x over 1024
    n_elem_programs = cdiv(n_elem, opts["BLOCK"])
    launch(_finalize_grads_kernel, (n_elem_programs + nheads,),
        dB_part, dC_part, dB, dC, dA_part, dD_part, dbias_part, dA,
        dD if dD is not None else dA, d_bias if d_bias is not None else dA,
        splits, seqlen, ngroups, dstate, n_elem, n_elem_programs, batch, nheads, nchunks, headdim,
        *dB.stride(), *dC.stride(),
        BLOCK_P=block_p if per_channel else 16,  # (only the per-channel dD reads BLOCK_P)
        HAS_D=D is not None, D_PER_CHANNEL=per_channel,
        HAS_BIAS=dt_bias is not None, **opts)
    dA = dA if needs["A"] else None
    dD = dD if needs["D"] else None
    d_bias = d_bias if needs["dt_bias"] else None
    d_init = d_initial.to(initial_state.dtype) if initial_state is not None else None
    return dx, ddt, dA, dB, dC, dD, d_bias, d_init


# ----------------------------------------------------------------------------------------------
# The scan as torch.library custom ops (namespace ``matmamba``): torch.compile keeps them in its
# graph as opaque calls (no graph break), with fake (meta) functions for tracing and the
# hand-written backward registered as the op's autograd formula. The forward op also returns the
# intermediates the backward needs (dt', Lam, CB, entering states); they are marked
# non-differentiable, and the public function drops them. Eager calls take an autograd.Function
# over the same implementation instead (no dispatcher round trips: less host time per call).
# ----------------------------------------------------------------------------------------------


def _empty0(like: Tensor) -> Tensor:
    """Placeholder for an optional output that is absent (custom ops cannot return None)."""
    return like.new_empty((0,))


def _ssd_scan_fwd_impl(x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dt_softplus, dt_lo,
                       dt_hi, chunk, pack):
    """-> (y, final_state, dt', Lam, CB, entering states). ``seq_idx`` here is segment ids.
    With ``pack`` > 1 the final state is absent (a (0,) tensor: the caller does not want it)."""
    y, final_state, (dtp, lam, CB, entering) = _ssd_forward(
        x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dt_softplus, dt_lo, dt_hi, chunk, pack)
    return y, final_state if pack == 1 else _empty0(final_state), dtp, lam, CB, entering


ssd_scan_fwd_op = torch.library.custom_op(
    "matmamba::ssd_scan_fwd", _ssd_scan_fwd_impl, mutates_args=(),
    schema="(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? dt_bias, "
           "Tensor? initial_state, Tensor? seq_idx, bool dt_softplus, float dt_lo, float dt_hi, "
           "int chunk, int pack) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@ssd_scan_fwd_op.register_fake
def _ssd_scan_fwd_fake(x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dt_softplus, dt_lo,
                       dt_hi, chunk, pack):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    f32 = dict(device=x.device, dtype=torch.float32)
    return (x.new_empty(batch, seqlen, nheads, headdim),
            torch.empty(batch, nheads, headdim, dstate, **f32) if pack == 1 else torch.empty(0, **f32),
            *scan_intermediates_fake(batch, seqlen, nheads, headdim, ngroups, dstate, chunk, pack,
                                     x.dtype, x.device))


def _ssd_scan_bwd_impl(dy, d_final, x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dtp,
                       lam, CB, entering, dt_softplus, dt_lo, dt_hi, chunk, pack):
    """-> (dx, ddt, dA, dB, dC, dD, d dt_bias, d initial_state); absent inputs get (0,) tensors."""
    saved = (x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dtp, lam, CB, entering)
    needs = {"A": True, "D": True, "dt_bias": True}
    dx, ddt, dA, dB, dC, dD, d_bias, d_init = _ssd_backward(
        dy, d_final, saved, dt_softplus, dt_lo, dt_hi, chunk, needs, pack=pack)
    return (dx, ddt, dA, dB, dC, dD if dD is not None else _empty0(x),
            d_bias if d_bias is not None else _empty0(x),
            d_init if d_init is not None else _empty0(x))


ssd_scan_bwd_op = torch.library.custom_op(
    "matmamba::ssd_scan_bwd", _ssd_scan_bwd_impl, mutates_args=(),
    schema="(Tensor dy, Tensor? d_final, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
           "Tensor? D, Tensor? dt_bias, Tensor? initial_state, Tensor? seq_idx, Tensor dtp, "
           "Tensor lam, Tensor CB, Tensor entering, bool dt_softplus, float dt_lo, float dt_hi, "
           "int chunk, int pack) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@ssd_scan_bwd_op.register_fake
def _ssd_scan_bwd_fake(dy, d_final, x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dtp,
                       lam, CB, entering, dt_softplus, dt_lo, dt_hi, chunk, pack):
    return (x.new_empty(x.shape), dt.new_empty(dt.shape), A.new_empty(A.shape),
            B.new_empty(B.shape), C.new_empty(C.shape),
            D.new_empty(D.shape) if D is not None else _empty0(x),
            dt_bias.new_empty(dt_bias.shape) if dt_bias is not None else _empty0(x),
            initial_state.new_empty(initial_state.shape) if initial_state is not None
            else _empty0(x))


def _ssd_setup_context(ctx, inputs, output):
    (x, dt, A, B, C, D, dt_bias, initial_state, seq_idx, dt_softplus, dt_lo, dt_hi,
     chunk, pack) = inputs
    _, _, dtp, lam, CB, entering = output
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, initial_state, seq_idx,
                          dtp, lam, CB, entering)
    ctx.config = (dt_softplus, dt_lo, dt_hi, chunk, pack)
    ctx.mark_non_differentiable(dtp, lam, CB, entering)
    ctx.set_materialize_grads(False)  # no zero tensors for unused outputs' gradients


def _ssd_grads(ctx, grad_outputs, backward_op):
    dy, d_final = grad_outputs[:2]  # the rest are non-differentiable intermediates
    saved = ctx.saved_tensors
    x, D, dt_bias, initial_state = saved[0], saved[5], saved[6], saved[7]
    dt_softplus, dt_lo, dt_hi, chunk, pack = ctx.config
    if dy is None:
        dy = torch.zeros_like(x)
    if d_final is not None:
        d_final = d_final.contiguous()
    dx, ddt, dA, dB, dC, dD, d_bias, d_init = backward_op(
        dy, d_final, *saved, dt_softplus, dt_lo, dt_hi, chunk, pack)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, ddt if needs[1] else None, dA if needs[2] else None,
            dB if needs[3] else None, dC if needs[4] else None,
            dD if D is not None and needs[5] else None,
            d_bias if dt_bias is not None and needs[6] else None,
            d_init if initial_state is not None and needs[7] else None,
            None, None, None, None, None, None)


_ssd_scan = differentiable_triton_op(
    "ssd_scan", ssd_scan_fwd_op, _ssd_scan_fwd_impl, _ssd_scan_bwd_impl, _ssd_setup_context,
    _ssd_grads)


def ssd_scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int = 256,
    D: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_state: bool = False,
):
    """SSD scan on Triton kernels; same contract as ``matmamba.ops.ssd.naive.ssd_scan_naive``.

    Inputs may be strided views (any strides); float32, float16 and bfloat16. ``chunk_size`` is
    accepted for signature parity: the kernels use their own chunk (see ``_chunk_length``).
    Returns y (b,l,h,p) in x.dtype [, final_state (b,h,p,n) float32].
    """
    check_ssd_inputs(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=dt_limit,
                     initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size)
    if x.dtype == torch.float64:
        raise TypeError("ssd_scan_triton runs in float32, float16 or bfloat16; use impl='torch' "
                        "or 'naive' for float64")
    dt_lo, dt_hi = (float(v) for v in dt_limit)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if seq_idx is not None:
        seq_idx = segment_ids(seq_idx)  # equal exactly where no boundary lies between
    chunk, pack = _chunk_length(), 1
    if (initial_state is None and seq_idx is None and not return_final_state
            and all(_packable(t) for t in (x, dt, B, C))):
        pack = pack_factor(x.shape[0], x.shape[1], chunk, x.shape[2])
    y, final_state, *_ = _ssd_scan(x, dt, A, B, C, D, dt_bias, initial_state, seq_idx,
                              bool(dt_softplus), dt_lo, dt_hi, chunk, pack)
    return (y, final_state) if return_final_state else y
