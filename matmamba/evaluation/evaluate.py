"""Evaluate every configuration of a sweep on the same validation data, and time each one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from matmamba.evaluation.latency import latency_batch, measure_latency
from matmamba.evaluation.submodels import Submodel

Advance = Callable[[], None]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def num_batches(loader: DataLoader, limit: int | None) -> int:
    return len(loader) if not limit else min(limit, len(loader))


@torch.inference_mode()
def evaluate_submodels(task, submodels: Sequence[Submodel], loader: DataLoader, device: torch.device,
                       amp_dtype: torch.dtype | None = None, limit_batches: int | None = None,
                       advance: Advance | None = None) -> list[dict[str, float]]:
    """The task's metrics for every configuration, in order.

    The data is read once: each batch goes through every configuration before the next batch
    is loaded, so all configurations see exactly the same inputs. ``advance`` is called after
    each forward (progress bars).
    """
    task.model.eval()
    metrics = [task.new_metrics() for _ in submodels]
    for index, batch in enumerate(loader):
        if limit_batches and index >= limit_batches:
            break
        inputs, target = task.split(to_device(batch, device))
        for submodel, accumulator in zip(submodels, metrics):
            with autocast_context(device, amp_dtype):
                output = task.forward(inputs, submodel.spec)
            accumulator.update(output, target)
            if advance:
                advance()
    return [m.compute() for m in metrics]


@torch.inference_mode()
def time_submodels(task, submodels: Sequence[Submodel], example_inputs: torch.Tensor, device: torch.device,
                   batch_size: int, warmup: int, repeats: int, amp_dtype: torch.dtype | None = None,
                   advance: Advance | None = None) -> list[float]:
    """Median forward latency (ms) of each configuration on ``batch_size`` real inputs."""
    task.model.eval()
    inputs = latency_batch(example_inputs.to(device), batch_size)
    latencies = []
    for submodel in submodels:
        def forward(spec=submodel.spec):
            with autocast_context(device, amp_dtype):
                task.forward(inputs, spec)

        latencies.append(measure_latency(forward, device, warmup=warmup, repeats=repeats))
        if advance:
            advance()
    return latencies
