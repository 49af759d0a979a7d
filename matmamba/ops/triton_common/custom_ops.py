"""One differentiable Triton op, two ways to call it.

Each op is a ``torch.library`` custom op pair (``matmamba::<name>_fwd`` / ``_bwd``), so that
``torch.compile`` keeps it in the graph as one opaque node with the hand-written backward as its
autograd formula. Eager calls go through a plain ``autograd.Function`` built from the same
implementation functions: the dispatcher round trips of a custom op cost about 2.7x the host
time per forward + backward (measured on the CPU), and the narrow widths are bound by host time.

An op supplies:
    forward_impl(*inputs) -> outputs          the forward (also registered as the custom op)
    backward_impl(*args)                      the backward (also registered as the ``_bwd`` op)
    setup_context(ctx, inputs, outputs)       what the backward needs, saved on ``ctx``
    grads(ctx, grad_outputs, backward)        input gradients, calling ``backward`` (the ``_bwd``
                                              op under compile, ``backward_impl`` eagerly)
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def differentiable_triton_op(name: str, forward_op, forward_impl: Callable, backward_impl: Callable,
                             setup_context: Callable, grads: Callable) -> Callable:
    """Register ``grads`` as the autograd formula of ``forward_op`` (``matmamba::<name>_fwd``,
    whose backward op is ``matmamba::<name>_bwd``) and return ``call(*inputs)``: the custom op
    while ``torch.compile`` traces, the eager ``autograd.Function`` otherwise."""

    def formula(ctx, *grad_outputs):
        return grads(ctx, grad_outputs, getattr(torch.ops.matmamba, f"{name}_bwd").default)

    forward_op.register_autograd(formula, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            outputs = forward_impl(*inputs)
            setup_context(ctx, inputs, outputs)
            return outputs

        @staticmethod
        def backward(ctx, *grad_outputs):
            return grads(ctx, grad_outputs, backward_impl)

    Eager.__name__ = Eager.__qualname__ = f"{name}_eager"
    compiled = getattr(torch.ops.matmamba, f"{name}_fwd").default

    def call(*inputs):
        return compiled(*inputs) if torch.compiler.is_compiling() else Eager.apply(*inputs)

    return call


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) int32: how many times ``seq_idx`` changed up to each position (first sequence = 0).
    The kernels only compare ids of neighbouring positions, so any sequence labels work."""
    changed = torch.zeros_like(seq_idx, dtype=torch.int32)
    changed[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return changed.cumsum(dim=1, dtype=torch.int32)
