"""Callbacks: throughput and model FLOPs utilisation, memory, a step-based progress bar."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_warn

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, most specific first.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
)


def peak_flops_for(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


class ThroughputMonitor(L.Callback):
    """Logs items (images or tokens) per second per device, and on GPU the model FLOPs utilisation.

    Measured over windows of ``window`` optimizer steps. MFU counts the model FLOPs of the widths
    trained in each step (forward x 3 for forward and backward) against the device's peak
    (``peak_tflops``, or a table of bf16 dense peaks by GPU name).
    """

    def __init__(self, window: int = 10, peak_tflops: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.peak_tflops = peak_tflops
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None
        self._items = 0
        self._flops = 0.0
        self._steps = 0

    def _peak(self, pl_module) -> float | None:
        if self.peak_tflops:
            return self.peak_tflops * 1e12
        if pl_module.device.type != "cuda":
            return None
        return peak_flops_for(torch.cuda.get_device_name(pl_module.device))

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._widths = pl_module.widths_for_step(trainer.global_step)  # the step this batch feeds
        if self._start is None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self._start = time.perf_counter()
            self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        items = pl_module.items_in_batch(batch)
        self._items += items
        self._flops += 3.0 * items * sum(pl_module.flops_per_item(w) for w in self._widths)
        steps = trainer.global_step - self._step_at_start
        if steps < self.window:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._start
        kind = "tokens" if pl_module.task == "lm" else "images"
        logs = {
            f"perf/{kind}_per_sec_per_device": self._items / elapsed,
            "perf/steps_per_sec": steps / elapsed,
            "perf/model_tflops_per_device": self._flops / elapsed / 1e12,
        }
        peak = self._peak(pl_module)
        if peak:
            logs["perf/mfu"] = self._flops / elapsed / peak
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)
        self._reset()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._reset()  # do not count evaluation time as training time


class MemoryMonitor(L.Callback):
    """Logs peak GPU memory (allocated, reserved) or, on CPU, the process's peak resident size."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        if pl_module.device.type == "cuda":
            gib = 2**30
            logs = {
                "mem/max_allocated_gib": torch.cuda.max_memory_allocated(pl_module.device) / gib,
                "mem/max_reserved_gib": torch.cuda.max_memory_reserved(pl_module.device) / gib,
            }
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            logs = {"mem/max_rss_gib": peak / (2**30 if sys.platform == "darwin" else 2**20)}
        pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)


class StepProgressBar(TQDMProgressBar):
    """A tqdm bar counted in optimizer steps up to ``trainer.max_steps`` (the training stream is
    endless, so an epoch has no length to show)."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.max_steps <= 0:
            rank_zero_warn("StepProgressBar expects trainer.max_steps > 0")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.n = trainer.global_step
        bar.initial = 0
        bar.set_description("train")
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if trainer.global_step != bar.n and (
            trainer.global_step % self.refresh_rate == 0 or trainer.global_step >= trainer.max_steps
        ):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
