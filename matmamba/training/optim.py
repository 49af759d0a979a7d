"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], no_decay: set[str], weight_decay: float
) -> list[dict]:
    """Two AdamW groups: with ``weight_decay`` and without (names in ``no_decay``).

    Shared (tied) parameters appear once. Empty groups are dropped.
    """
    decay, plain, seen = [], [], set()
    for name, p in named_params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (plain if name in no_decay else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": plain, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def cosine_lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_lr_ratio``
    at ``total_steps`` (and flat after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    if warmup_steps < 0 or total_steps <= 0:
        raise ValueError(f"need warmup_steps >= 0 and total_steps > 0, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return LambdaLR(
        optimizer, lambda step: cosine_lr_factor(step, warmup_steps, total_steps, min_lr_ratio)
    )
