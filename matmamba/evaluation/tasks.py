"""What "quality" means per task: how a batch splits into inputs and targets, and the metrics.

Vision: top-1 and top-5 accuracy (top-5 when there are at least 5 classes) and cross-entropy.
Language models: loss (nats per token), perplexity and, when the data knows its bytes per token,
bits per byte.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# Metric columns and whether higher is better.
HIGHER_IS_BETTER = {"top1": True, "top5": True, "loss": False, "ppl": False, "bpb": False}


class ClassificationMetrics:
    """Running top-k accuracies and mean cross-entropy over a validation set."""

    def __init__(self, n_classes: int) -> None:
        self.ks = [k for k in (1, 5) if k <= n_classes]
        self.hits = {k: 0 for k in self.ks}
        self.loss_sum = 0.0
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(self.ks[-1], dim=-1).indices
        hits = top == labels[:, None]
        for k in self.ks:
            self.hits[k] += int(hits[:, :k].any(dim=-1).sum())
        self.count += labels.shape[0]

    def compute(self) -> dict[str, float]:
        out = {f"top{k}": self.hits[k] / self.count for k in self.ks}
        out["loss"] = self.loss_sum / self.count
        return out


class LanguageModelMetrics:
    """Running next-token loss; perplexity and bits per byte derived from it."""

    def __init__(self, bytes_per_token: float | None = None) -> None:
        self.bytes_per_token = bytes_per_token
        self.loss_sum = 0.0
        self.count = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        self.count += targets.numel()

    def compute(self) -> dict[str, float]:
        loss = self.loss_sum / self.count
        out = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if self.bytes_per_token:
            out["bpb"] = loss / math.log(2) / self.bytes_per_token
        return out


class VisionTask:
    name = "vision"
    item = "image"  # what latency batches and FLOPs count

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return images, labels

    def forward(self, inputs: torch.Tensor, width) -> torch.Tensor:
        return self.model(inputs, width=width)

    def new_metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(self.model.config.n_classes)

    def flops(self, width) -> int:
        return int(self.model.flops_per_image(width))

    def default_metric(self, columns: list[str]) -> str:
        return "top1"


class LanguageModelTask:
    name = "lm"
    item = "token"

    def __init__(self, model: nn.Module, bytes_per_token: float | None = None) -> None:
        self.model = model
        self.bytes_per_token = bytes_per_token

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch[0] if isinstance(batch, (list, tuple)) else batch
        return tokens[:, :-1], tokens[:, 1:]

    def forward(self, inputs: torch.Tensor, width) -> torch.Tensor:
        return self.model(inputs, width=width).logits

    def new_metrics(self) -> LanguageModelMetrics:
        return LanguageModelMetrics(self.bytes_per_token)

    def flops(self, width) -> int:
        return int(self.model.flops_per_token(width))

    def default_metric(self, columns: list[str]) -> str:
        return "bpb" if "bpb" in columns else "loss"


def make_task(task: str, model: nn.Module, datamodule=None):
    if task == "vision":
        return VisionTask(model)
    if task == "lm":
        return LanguageModelTask(model, getattr(datamodule, "bytes_per_token", None))
    raise ValueError(f"unknown task {task!r}; expected 'vision' or 'lm'")


def resolve_metric(name: str, task, columns: list[str]) -> tuple[str, bool]:
    """The ranking metric (``auto``: top1 for vision, bpb or loss for LMs) and whether higher is better."""
    name = task.default_metric(columns) if name in (None, "auto") else name
    if name not in columns:
        raise ValueError(f"metric={name!r} is not measured for this task; choose one of {columns} (or auto)")
    return name, HIGHER_IS_BETTER[name]
