"""Callbacks: throughput and model FLOPs utilisation, memory, a step-based progress bar, and the
measurements of multi-device runs (rank-averaged loss, input wait, weights identical across ranks)."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_warn

from matmamba.training.strategies import is_fsdp

log = logging.getLogger(__name__)

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


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    )


class GlobalLossMonitor(L.Callback):
    """Logs ``train/loss_global``: the training loss of each optimizer step averaged over all ranks.

    ``train/loss`` is each rank's own share of the batch (rank 0's is what loggers record); the
    global one is the loss of the whole global batch, the same quantity whatever the number of
    devices and micro-batches, so curves of runs on different device counts compare directly.
    Also logs ``train/optimizer_step`` (optimizer steps done), because loggers count steps in
    batches when gradients are accumulated. Costs one scalar all-reduce per optimizer step.
    """

    def __init__(self, key: str = "train/loss", name: str = "train/loss_global") -> None:
        self.key = key
        self.name = name
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # also right after a resume

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # an accumulation micro-batch: no optimizer step yet
            return
        self._last_step = step
        value = trainer.callback_metrics.get(self.key)  # live: what training_step logged this step
        if value is None:
            return
        value = value.detach().to(pl_module.device, torch.float32).reshape(())
        if _distributed():
            value = value.clone()
            torch.distributed.all_reduce(value)
            value = value / torch.distributed.get_world_size()
        # Loggers count steps in batches under gradient accumulation: record the optimizer step too.
        pl_module.log_dict({self.name: value, "train/optimizer_step": float(step)},
                           on_step=True, on_epoch=False, batch_size=1)


class InputWaitMonitor(L.Callback):
    """Logs ``perf/input_wait_frac``: the fraction of training wall time spent between one batch's
    end and the next batch's start, i.e. waiting for the data loader (and the host-to-device copy).

    At the end of each batch the callback waits for the GPU to finish, so the interval is time
    the GPU spends idle for want of input; near 0 means the data pipeline keeps the GPU busy.
    The synchronisation costs a little throughput: use it for measurements, not production runs.
    Measured over windows of ``window`` optimizer steps.
    """

    def __init__(self, window: int = 10) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None
        self._last_end: float | None = None
        self._wait = 0.0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()
            self._step_at_start = trainer.global_step
        elif self._last_end is not None:
            self._wait += now - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        now = time.perf_counter()
        self._last_end = now
        if trainer.global_step - self._step_at_start < self.window:
            return
        elapsed = now - self._start
        pl_module.log("perf/input_wait_frac", self._wait / elapsed, on_step=True, on_epoch=False, batch_size=1)
        self._start = now  # the next window starts here; its first gap is counted
        self._step_at_start = trainer.global_step
        self._wait = 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._reset()


class RankWeightsCheck(L.Callback):
    """At the end of training, checks that every rank holds bitwise the same weights (DDP).

    Each parameter and buffer of rank 0 is broadcast and compared with the local copy on every
    rank. The result (tensors compared, tensors that differ, the largest absolute difference)
    is written as JSON to ``out_file`` by rank 0 and logged; ``strict`` raises on a mismatch.
    Sharded strategies (FSDP) hold different shards by design and are skipped.
    """

    def __init__(self, out_file: str | None = None, strict: bool = False) -> None:
        self.out_file = out_file
        self.strict = strict
        self.result: dict[str, Any] | None = None

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        result: dict[str, Any] = {"world_size": trainer.world_size, "global_step": trainer.global_step}
        if is_fsdp(trainer.strategy):
            result.update(status="skipped", reason="FSDP shards the weights across ranks")
        elif not _distributed():
            result.update(status="skipped", reason="a single process")
        else:
            result.update(self._compare(pl_module))
        self.result = result
        if trainer.is_global_zero:
            log.info("weights across ranks: %s", result)
            if self.out_file:
                path = Path(self.out_file)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=2) + "\n")
        if self.strict and result["status"] == "different":
            raise RuntimeError(f"weights differ across ranks: {result}")

    @staticmethod
    def _compare(pl_module) -> dict[str, Any]:
        dist = torch.distributed
        tensors = [*pl_module.named_parameters(), *pl_module.named_buffers()]
        mismatched: list[str] = []
        max_diff = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        for name, local in tensors:
            local = local.detach()
            reference = local.clone()
            dist.broadcast(reference, src=0)
            if not torch.equal(reference, local):
                mismatched.append(name)
                if local.is_floating_point():
                    max_diff = torch.maximum(max_diff, (reference.double() - local.double()).abs().max())
        count = torch.tensor(float(len(mismatched)), dtype=torch.float64, device=pl_module.device)
        dist.all_reduce(count)  # tensors that differ from rank 0's, summed over ranks
        dist.all_reduce(max_diff, op=dist.ReduceOp.MAX)
        names: list[str] = []
        if count.item():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mismatched[:10])
            names = sorted({n for ranks in gathered for n in ranks})
        return {
            "status": "different" if count.item() else "identical",
            "tensors": len(tensors),
            "elements": int(sum(t.numel() for _, t in tensors)),
            "mismatched_tensors": int(count.item()),
            "mismatched_names": names,
            "max_abs_diff": float(max_diff.item()),
        }
