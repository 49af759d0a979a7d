"""Latency of one forward pass: warm-up, then the median of timed repeats (CUDA events on a GPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def measure_latency(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    ``warmup`` untimed calls come first (allocator, kernel selection, caches). On CUDA each repeat
    is timed with a pair of CUDA events around it, so host-side queueing is not counted; on the
    CPU with ``time.perf_counter``.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"latency needs warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def latency_batch(inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` rows of real inputs: the first rows of a batch, repeated if it is shorter."""
    if batch_size < 1:
        raise ValueError(f"latency.batch_size must be >= 1, got {batch_size}")
    reps = -(-batch_size // inputs.shape[0])
    return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:batch_size].contiguous()
