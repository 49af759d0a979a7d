"""Losses that avoid materialising a (tokens x vocab) logits tensor.

An LM step over four widths at 64 x 1024 tokens would otherwise hold, per width, the bf16 logits,
their fp32 copy and the softmax gradient (about 20 GiB at GPT-2's vocabulary): most of the memory
of the step (measured on an H200: lm_130m ran out of 140 GiB at 64 sequences per device).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def lm_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` (b, l, vocab) against ``target`` (b, l), the
    softmax in at least fp32.

    Eagerly this writes the fp32 copy of the logits, then the fp32 log-probabilities, and the
    backward two more tensors of that size. The LM module compiles it when ``model.compile`` is on:
    inductor then reads the 16-bit logits once per pass, reduces them in fp32 registers and writes
    the 16-bit gradient directly (on an H200, lm_130m at 32 x 1024 tokens: about 17 ms less per
    call, 16% of the four-width step).
    """
    logits = logits.flatten(0, -2)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target.flatten())


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions over the last dim, averaged over
    everything else, times T^2 (so its gradient scale does not depend on T); in at least fp32.
    Compiled beside ``lm_cross_entropy`` for the LMs, for the same reason."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_p_student = F.log_softmax(student.flatten(0, -2).to(dtype) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.flatten(0, -2).to(dtype) / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature ** 2


class LMHeadInput(NamedTuple):
    """What a chunked LM loss needs instead of logits: the final hidden states and the head."""

    hidden: torch.Tensor  # (b, l, d)
    weight: torch.Tensor  # (vocab, d)


def _chunk_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)  # under autocast: the same bf16 GEMM as the model's head
    # the softmax in at least fp32 (16-bit logits are upcast; float64 stays float64)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target,
                           reduction="sum")


def chunked_lm_cross_entropy(head: LMHeadInput, target: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head.hidden @ head.weight.T`` against ``target`` (b, l),
    computed ``chunk_tokens`` rows at a time.

    Each chunk is activation-checkpointed: its logits live only while its loss is computed, and
    are recomputed in the backward. Peak extra memory is one chunk's logits; the cost is one more
    head GEMM forward per chunk (a third of the head's FLOPs). Same value and gradients as
    ``F.cross_entropy(lm_head(hidden))`` up to summation order.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    hidden = head.hidden.flatten(0, -2)
    target = target.flatten()
    if hidden.shape[0] != target.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {target.shape[0]} targets")
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_cross_entropy_sum, hidden[rows], head.weight, target[rows],
                                   use_reentrant=False)
    return total / target.numel()
