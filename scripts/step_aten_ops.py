#!/usr/bin/env python
"""The ATen ops one forward + backward of the block runs around its Triton kernels (any machine).

The GPU profiles (bench_block's ``profile`` case) name the elementwise kernels of a step but not
what they are for. This script runs one step of ``fused_block_forward`` (the training path:
in_proj -> fused mixer core -> out_proj) under autocast with the Triton launches recorded instead
of run, and lists every ATen op that computes (views and allocations left out) with its inputs'
shapes and dtypes and the bytes its inputs and output occupy: the casts autocast makes, the
gradients' casts back to the parameters' dtype, ``slice_backward`` of the weight slices and the
accumulation into existing ``.grad`` tensors. Then the kernel launches in order.

The step runs for real on the CPU (the kernels' outputs are left unwritten, which does not change
what runs), so large shapes take a while; the ops and their count do not depend on b and l.

    python scripts/step_aten_ops.py                        # D=768, b2 l128, full width
    python scripts/step_aten_ops.py --width 96 --b 8 --l 2048
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# ops that compute nothing (views, allocations): not listed
NON_COMPUTING = frozenset({
    "view", "unflatten", "slice", "t", "unsqueeze", "select", "empty", "alias", "detach",
    "as_strided", "_unsafe_view", "empty_strided", "empty_like", "transpose", "permute", "expand",
    "squeeze", "split", "split_with_sizes", "unbind", "narrow", "new_empty", "new_empty_strided",
    "_reshape_alias", "reshape",
})


class ComputingOps(TorchDispatchMode):
    """Records (op name, [(shape, dtype) of each tensor input], bytes of inputs + output) of every
    ATen op run inside it that is not in NON_COMPUTING."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[tuple[int, ...], str]], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name not in NON_COMPUTING:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(o, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in tensors + outs)
            self.ops.append((name, [(tuple(t.shape), str(t.dtype).replace("torch.", ""))
                                    for t in tensors], nbytes))
        return out


def record_step(d_model: int = 768, batch: int = 2, seqlen: int = 128, width: int | None = None,
                d_state: int = 128, **block_kwargs) -> tuple[list, list[str]]:
    """(ATen ops, kernel names) of the second forward + backward of a fresh block (the first
    creates the .grad tensors, as in a benchmark's warm-up), under bf16 autocast with fp32
    weights and an fp32 input, as bench_block times it."""
    from bench_block import fused_block_forward

    from matmamba import MatMamba2
    from matmamba.ops.conv1d import triton_impl as conv_ti
    from matmamba.ops.rmsnorm import triton_impl as norm_ti
    from matmamba.ops.ssd import triton_impl as ssd_ti

    kernels: list[str] = []
    saved = {module: module.launch for module in (conv_ti, norm_ti, ssd_ti)}
    for module in saved:
        module.launch = lambda kernel, *args, **kwargs: kernels.append(kernel.fn.__name__)
    try:
        torch.manual_seed(0)
        block = MatMamba2(d_model=d_model, d_state=d_state, layer_idx=0, **block_kwargs)
        width = width or d_model
        u = torch.randn(batch, seqlen, d_model, requires_grad=True)
        dy = torch.randn(batch, seqlen, d_model, dtype=torch.bfloat16)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = fused_block_forward(block, u, width)
            out.backward(dy)

        step()
        kernels.clear()
        with ComputingOps() as seen:
            step()
    finally:
        for module, launch in saved.items():
            module.launch = launch
    return seen.ops, kernels


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--b", type=int, default=2)
    parser.add_argument("--l", type=int, default=128)
    parser.add_argument("--width", type=int, default=None, help="default: full width")
    args = parser.parse_args(argv)
    ops, kernels = record_step(args.d_model, args.b, args.l, args.width)
    print(f"{'op':<18} {'inputs (shape dtype)':<64} {'MB':>8}")
    for name, inputs, nbytes in ops:
        shapes = ", ".join(f"{'x'.join(map(str, s)) or 'scalar'} {d}" for s, d in inputs)
        print(f"{name:<18} {shapes:<64} {nbytes / 2**20:8.2f}")
    counts = collections.Counter(name for name, _, _ in ops)
    print("\nops:", dict(counts))
    print(f"bytes in + out of all ops: {sum(n for _, _, n in ops) / 2**20:.1f} MB")
    print("kernels:", " ".join(kernels))
    return {"ops": ops, "kernels": kernels, "counts": dict(counts)}


if __name__ == "__main__":
    main()
