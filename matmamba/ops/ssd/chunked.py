"""Chunked SSD scan in plain PyTorch (the state-space-duality form of Mamba2), with autograd.

The sequence is cut into chunks of Q positions. Within a chunk the scan is a masked,
decay-weighted attention-like product; between chunks only a (p, n) state per head travels.
For one head, writing a_t = dt'_t A (the log-decay of step t, <= 0), s = start of the chunk,
and the segment sum  segsum(i, j) = a_{j+1} + ... + a_i  (0 when i = j, -inf when j > i)::

    y_i = sum_{j in chunk, j <= i} (C_i . B_j) exp(segsum(i, j)) dt'_j x_j     intra-chunk ("diagonal")
        + exp(a_s + ... + a_i) state_in C_i                                    from earlier chunks
        + D x_i

    chunk_state  = sum_{j in chunk} exp(segsum(Q-1, j)) dt'_j x_j B_j^T        what the chunk adds
    state_out    = exp(a_s + ... + a_{s+Q-1}) state_in + chunk_state            passed on, in fp32

With ``seq_idx`` (packed sequences) every decay factor that would carry information across a
position where ``seq_idx`` changes is set to zero: intra-chunk pairs (i, j) in different
sequences, a chunk state's contributions from positions not in the chunk's last sequence, and the
carried state into positions (and chunk ends) in a later sequence than the one before the chunk.
``initial_state`` therefore only feeds the first sequence of each row.

Everything is computed in float32 (float64 when the inputs are float64); ``y`` is returned in
x.dtype. A Python loop runs over chunks (not over time) for the state passing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .naive import check_ssd_inputs, compute_dtype_for, discretize_dt

Tensor = torch.Tensor


def segment_ids(seq_idx: Tensor) -> Tensor:
    """(b,l) -> (b,l) int64: how many times seq_idx has changed up to each position (0 at t=0).

    Equal ids <=> no sequence boundary in between, whatever values seq_idx holds.
    """
    changed = torch.zeros_like(seq_idx, dtype=torch.int64)
    changed[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return changed.cumsum(dim=1)


def stable_segsum(log_decay: Tensor) -> Tensor:
    """(..., Q) -> (..., Q, Q):  out[..., i, j] = log_decay[j+1] + ... + log_decay[i]  for i >= j.

    Entries with j > i are 0 here (callers mask them). Built as a cumulative sum over i of a
    matrix holding log_decay[i] at (i, j) only where i > j, so each entry is a direct sum of the
    terms it needs: no difference of two long cumulative sums (which loses precision), and no exp
    is ever taken of a large positive number.
    """
    length = log_decay.shape[-1]
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril(-1)
    rows = log_decay[..., :, None].expand(*log_decay.shape, length)  # rows[..., i, j] = a_i
    return rows.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)


def ssd_scan_chunked(
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
    """Chunked SSD scan; same contract as :func:`matmamba.ops.ssd.naive.ssd_scan_naive`.

    Shapes: x (b,l,h,p), dt (b,l,h), A (h,), B, C (b,l,g,n), D (h,) or (h,p), dt_bias (h,),
    initial_state (b,h,p,n), seq_idx (b,l). Returns y (b,l,h,p) in x.dtype and, with
    ``return_final_state``, the final state (b,h,p,n) in float32 (float64 for float64 inputs).
    ``l`` need not be a multiple of ``chunk_size``: the tail is padded with dt' = 0 and x = 0
    (a step that neither decays nor writes the state) and cropped from the output; when
    ``l < chunk_size`` the chunk shrinks to ``l``.
    """
    batch, seqlen, nheads, headdim, ngroups, dstate = check_ssd_inputs(
        x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=dt_limit,
        initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size,
    )
    dtype = compute_dtype_for(x, dt, A, B, C, D, dt_bias, initial_state)
    device = x.device
    heads_per_group = nheads // ngroups
    # A sequence shorter than one chunk is a single chunk of its own length (same result, less work).
    Q = max(1, min(chunk_size, seqlen))
    nchunks = max(1, -(-seqlen // Q))
    pad = nchunks * Q - seqlen

    # Discretise dt before padding, so padded steps get dt' = 0 exactly.
    step = discretize_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # (b,l,h)
    x_c = x.to(dtype)
    B_c = B.to(dtype)
    C_c = C.to(dtype)
    if pad:
        x_c = F.pad(x_c, (0, 0, 0, 0, 0, pad))
        step = F.pad(step, (0, 0, 0, pad))
        B_c = F.pad(B_c, (0, 0, 0, 0, 0, pad))
        C_c = F.pad(C_c, (0, 0, 0, 0, 0, pad))

    # Chunked layouts, heads split as (group g, head-within-group r) so that B and C are shared
    # by broadcasting, never copied per head; time-in-chunk next to the feature axis so that
    # every contraction below is a batched matmul:
    #   x (b,c,g,r,Q,p)   step (b,c,g,r,Q)   B, C (b,c,g,Q,n)
    x_chunks = x_c.reshape(batch, nchunks, Q, ngroups, heads_per_group, headdim).permute(0, 1, 3, 4, 2, 5)
    B_chunks = B_c.reshape(batch, nchunks, Q, ngroups, dstate).transpose(2, 3)
    C_chunks = C_c.reshape(batch, nchunks, Q, ngroups, dstate).transpose(2, 3)
    step_chunks = step.reshape(batch, nchunks, Q, ngroups, heads_per_group).permute(0, 1, 3, 4, 2)
    log_decay = step_chunks * A.to(dtype).reshape(ngroups, heads_per_group)[:, :, None]  # a_t
    decay_from_chunk_start = torch.exp(log_decay.cumsum(dim=-1))  # exp(a_s + ... + a_i)
    chunk_total_decay = decay_from_chunk_start[..., -1]  # (b,c,g,r)

    # Which decay factors are allowed to be non-zero.
    lower = torch.ones(Q, Q, dtype=torch.bool, device=device).tril()  # j <= i
    pair_mask = lower[None, None, None, None]  # (1,1,1,1,Q,Q), broadcast over (b,c,g,r)
    if seq_idx is not None:
        segments = segment_ids(seq_idx)
        if pad:
            # the padded tail stays in the row's last sequence
            segments = torch.cat([segments, segments[:, -1:].expand(batch, pad)], dim=1)
        seg_chunks = segments.reshape(batch, nchunks, Q)
        # Segment of the position just before each chunk; the initial state counts as segment 0.
        seg_before_chunk = torch.cat(
            [segments.new_zeros(batch, 1), seg_chunks[:, :-1, -1]], dim=1
        )  # (b,c)
        same_segment = seg_chunks[:, :, :, None] == seg_chunks[:, :, None, :]  # (b,c,Q,Q)
        pair_mask = (lower & same_segment)[:, :, None, None]  # (b,c,1,1,Q,Q)
        from_start_mask = (seg_chunks == seg_before_chunk[:, :, None])[:, :, None, None]  # (b,c,1,1,Q)
        end_keep_mask = (seg_chunks[:, :, -1] == seg_before_chunk)[:, :, None, None]  # (b,c,1,1)
        decay_from_chunk_start = decay_from_chunk_start * from_start_mask
        chunk_total_decay = chunk_total_decay * end_keep_mask

    # decay[..., i, j] = exp(a_{j+1} + ... + a_i) where allowed, else 0.        (b,c,g,r,Q,Q)
    decay = torch.exp(stable_segsum(log_decay).masked_fill(~pair_mask, -math.inf))

    # 1) Intra-chunk:  y_i = sum_j (C_i . B_j) decay(i, j) (dt'_j x_j)
    x_scaled = x_chunks * step_chunks[..., None]  # dt'_j x_j                        (b,c,g,r,Q,p)
    C_dot_B = C_chunks @ B_chunks.transpose(-1, -2)  # (b,c,g,Q,Q), shared by the group's heads
    y = (C_dot_B[:, :, :, None] * decay) @ x_scaled  # (b,c,g,r,Q,p)

    # 2) What each chunk adds to the state by its end:  sum_j decay(Q-1, j) (dt'_j x_j) B_j^T
    decay_to_chunk_end = decay[..., -1, :, None]  # (b,c,g,r,Q,1)
    chunk_states = (x_scaled * decay_to_chunk_end).transpose(-1, -2) @ B_chunks[:, :, :, None]  # (b,c,g,r,p,n)

    # 3) Pass the state across chunks (float32 or float64), keeping the state entering each chunk.
    if initial_state is None:
        state = x_c.new_zeros(batch, ngroups, heads_per_group, headdim, dstate)
    else:
        state = initial_state.to(dtype).reshape(batch, ngroups, heads_per_group, headdim, dstate)
    states_entering = []
    for c in range(nchunks):
        states_entering.append(state)
        state = chunk_total_decay[:, c, :, :, None, None] * state + chunk_states[:, c]
    states_entering = torch.stack(states_entering, dim=1)  # (b,c,g,r,p,n)

    # 4) Output from the entering state:  y_i += exp(a_s + ... + a_i) state_in C_i
    from_state = C_chunks[:, :, :, None] @ states_entering.transpose(-1, -2)  # (b,c,g,r,Q,p)
    y = y + decay_from_chunk_start[..., None] * from_state

    # (b,c,g,r,Q,p) -> (b,c,Q,g,r,p) -> (b,l,h,p)
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(batch, nchunks * Q, nheads, headdim)[:, :seqlen]
    if D is not None:
        D_c = D.to(dtype)
        y = y + (D_c[:, None] if D_c.dim() == 1 else D_c) * x_c[:, :seqlen]
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    return y, state.reshape(batch, nheads, headdim, dstate)
