#!/usr/bin/env python
"""Training-step benchmark of the ``train.py`` recipes, against a published-style baseline.

Each case is a real recipe: its config is composed from ``conf/`` by Hydra (``experiment=<case>``
plus benchmark overrides) and the data module and LightningModule are built by
``matmamba.training.pipeline.build``, exactly as ``train.py`` builds them. The timed loop then
drives the module's own pieces (``split_batch``, ``widths_for_step``, ``train_forward``,
``width_loss``, the optimizer and schedule from ``configure_optimizers``, gradient clipping) in
the order ``training_step`` runs them, so that every phase can be timed on its own:

    data   next(loader) + host->device copy (real), or a copy of one device batch (synthetic)
    prep   split_batch (Mixup/CutMix on the device for the vision recipes)
    fwd@w  forward and loss at width w
    bwd    the joint backward of the summed width losses (the recipes' default), or bwd@w
           per width when the recipe (or --backward-per-width) backpropagates each width alone
    opt    gradient clipping, optimizer step, zero_grad, LR schedule

Phases are CUDA events on the compute stream, so they split the GPU timeline: a phase's time is
the work enqueued in it plus any time the GPU sat idle waiting for it (a data-loader stall shows
up in ``data``). The throughput figure is end to end: wall time over the timed steps with a
``torch.cuda.synchronize`` at both ends. Warm-up steps (compilation, autotuning, allocator
growth) are excluded; medians and means are over the timed steps.

Data modes: ``real`` reads the recipe's DataLoader (its workers, pinned memory): token shards for
the LMs, a generated ImageNet-format JPEG tree with the full augmentation for vision (both made by
``scripts/make_bench_data.py`` when no root is given). Before the timed steps the loader's
prefetch queue is drained, so the timed steps see the loader's steady rate, not a backlog built
while warm-up compiled, and 3 more untimed steps let the workers get back into step (right after
a drain the next batch takes one batch's production time); after the timed steps the loader
alone is timed (``loader_items_per_s``).
``synthetic`` reuses one device batch of the same shape: the model without the input pipeline.

Model FLOPs are the module's own count (``flops_per_item(width)``, forward x 3 for forward and
backward, summed over the widths trained in the step). MFU is reported against a bf16 GEMM
(8192^3) measured in the same run and against the datasheet peak.

Baseline (``--baseline``, GPU only): the same outer model (embedding or patch embedding,
norms, head, residual blocks) whose mixers are ``mamba_ssm``'s ``Mamba2``, one dense block per
trained width at exactly the inner size (heads x head dim) our nested block uses at that width;
trained as the published recipes did: per width forward, loss, backward, then one optimizer step
over all parameters, same batch, bf16 autocast, eager. ``causal_conv1d`` (which Mamba2's fused
``mamba_split_conv1d_scan_combined`` path needs) is used when importable; otherwise the block
runs its other path: PyTorch's conv1d, then the Triton ``mamba_chunk_scan_combined`` and the
Triton gated RMSNorm (the JSON records which). The table shows its step time and the ratio
baseline / ours for the same batch and widths.

    # on one GPU, after installing the mamba_ssm wheel (scripts/gpu_visit.sh shows how):
    python scripts/bench_train.py --cases lm_130m,vision_35m --data synthetic,real --compile off \\
        --json /tmp/bench_train.json --time-budget 420
    # CPU smoke run of the wiring (tiny model):
    python scripts/bench_train.py --device cpu --cases lm_130m --batch 4 --steps 2 --warmup 1 \\
        --model-overrides d_model=64 n_layer=2 d_state=16 headdim=8 chunk_size=16 \\
        --overrides data.seq_len=64 data.num_workers=0

Kernel profile (``--kernel-profile``): after each of our timed runs (not the baseline's), in every
compile setting, ``--kernel-profile-steps`` more steps run under ``torch.profiler`` (the timed
figures are not affected). Each kernel's self device time is classified by its name
(``classify_kernel``, patterns in ``KERNEL_CATEGORIES``): SSD scan, conv1d, gated RMSNorm, GEMM,
loss, optimizer, inductor's fused kernels, ATen elementwise/copies, NCCL, other. The row's
``kernel_profile`` holds ms, share and launches per step by category, the top kernels, and GPU
busy time (union of the kernels' intervals) against the step's wall time: a host-bound step
shows a low busy share. A short block per case follows the main table;
``--kernel-profile-trace DIR`` also writes each case's Chrome trace.

Cases are experiment names, optionally with widths: ``lm_130m:768`` trains the full width alone
(its MFU is the full-width step's), ``lm_130m:768/96`` two widths. Out-of-memory at a micro-batch
halves it (gradient accumulation keeps the step's batch, as the recipes do on fewer GPUs) and
retries; the row says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MATMAMBA_ROOT", str(REPO))  # conf/paths resolves against the repository
# Triton keeps autotuning results in its cache directory, so a second run on the same machine
# skips the minutes mamba_ssm's kernels spend autotuning (set before triton is imported).
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
for _path in (REPO, REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402

T_START = time.perf_counter()
GIB = 2**30


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f} s] {message}", flush=True)


# =============================================================================================
# Configuration: the recipe, composed by Hydra like train.py composes it
# =============================================================================================


@dataclasses.dataclass
class Case:
    """One benchmark case: an experiment, optionally with its own widths (``lm_130m:768/384``)."""

    label: str
    experiment: str
    widths: list[int] | None

    @classmethod
    def parse(cls, spec: str) -> Case:
        name, _, widths = spec.partition(":")
        return cls(spec, name, [int(w) for w in widths.split("/")] if widths else None)


def compose_cfg(overrides: list[str], output_dir: Path):
    """Compose ``conf/train.yaml`` with ``overrides`` as ``train.py`` would (Hydra's runtime config
    set, so ``${hydra:...}`` interpolations resolve; the run folder is ``output_dir``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


@dataclasses.dataclass
class Recipe:
    per_device_batch: int   # the recipe's global data.batch_size over its trainer.devices
    schedule_steps: int     # the length of its LR schedule
    micro_batch: int | None = None  # the recipe's data.micro_batch_size (None: the whole batch)


def recipe_facts(case: Case, args) -> Recipe:
    cfg = compose_cfg([f"experiment={case.experiment}"], Path(args.workdir))
    devices = cfg.trainer.get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    steps = cfg.optim.get("total_steps") or cfg.trainer.max_steps
    micro = cfg.data.get("micro_batch_size")
    return Recipe(max(1, int(cfg.data.batch_size) // devices), int(steps), int(micro) if micro else None)


COMPILE_SETTINGS = ("off", "on", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_override(setting: str) -> str:
    """``--compile`` value -> ``model.compile`` value: off/on, or a torch.compile mode by name."""
    return {"off": "false", "on": "true"}.get(setting, setting)


def case_overrides(case: Case, args, recipe: Recipe, *, batch: int, micro: int, compile_setting: str,
                   data_root: str | None, max_steps: int | None = None) -> list[str]:
    """Hydra overrides that turn the recipe into one benchmark run on one device. The LR
    schedule keeps the recipe's length (``optim.total_steps``), so the timed steps run at the
    recipe's early learning rates whatever ``trainer.max_steps`` is."""
    cuda = args.device == "cuda"
    overrides = [
        f"experiment={case.experiment}",
        f"trainer={'gpu' if cuda else 'cpu'}",
        "trainer.devices=1",
        # The recipes ask for bf16-mixed; on the CPU that is emulated and slow, so fp32 there.
        f"trainer.precision={'bf16-mixed' if cuda else '32-true'}",
        f"optim.total_steps={recipe.schedule_steps}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=none",
        "callbacks=none",
        "extras.print_config=false",
        "export_dir=null",
        f"data.batch_size={batch}",
        f"data.micro_batch_size={micro}",
        f"model.compile={compile_override(compile_setting)}",
    ]
    widths = case.widths or args.widths
    if widths:
        overrides.append(f"model.widths=[{','.join(str(w) for w in widths)}]")
    if args.backward_per_width:
        overrides.append("model.backward_per_width=true")
    if data_root:
        overrides.append(f"data.root={data_root}")
    if max_steps is not None:
        overrides.append(f"trainer.max_steps={max_steps}")
    overrides += [f"++model.overrides.{kv}" for kv in args.model_overrides]
    overrides += list(args.overrides)
    return overrides


# =============================================================================================
# Timing
# =============================================================================================


class PhaseTimer:
    """Marks between phases of a step: CUDA events on the current stream (GPU timeline, no
    synchronisation in the loop), or wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[list[tuple[str, Any]]] = []
        self._marks: list[tuple[str, Any]] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self) -> None:
        self._marks = [("", self._now())]

    def mark(self, label: str) -> None:
        self._marks.append((label, self._now()))

    def end(self) -> None:
        self.steps.append(self._marks)

    def durations(self) -> list[dict[str, float]]:
        """Per step: milliseconds per phase label (a label repeated within a step, e.g. one per
        micro-batch, is summed). Call after synchronising."""
        out = []
        for marks in self.steps:
            phases: dict[str, float] = {}
            for (_, a), (label, b) in itertools.pairwise(marks):
                ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
                phases[label] = phases.get(label, 0.0) + ms
            out.append(phases)
        return out


def bench_device(kind: str) -> torch.device:
    """The one device everything runs on (an explicit index: LightningModule.device reports it)."""
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "min": min(values), "max": max(values)}


def measure_gemm(device: torch.device, n: int) -> dict[str, Any]:
    """The dense matmul rate MFU is measured against: bf16 n^3 on the GPU (median of 10 after
    warm-up), fp32 on the CPU."""
    if device.type == "cuda":
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        c = torch.empty_like(a)
        for _ in range(3):
            torch.matmul(a, b, out=c)
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=c)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        dtype = "bf16"
        del a, b, c
        torch.cuda.empty_cache()
    else:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        dtype = "fp32"
    seconds = statistics.median(times)
    return {"n": n, "dtype": dtype, "ms": seconds * 1e3, "flops_per_s": 2 * n**3 / seconds}


# =============================================================================================
# Data sources
# =============================================================================================


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


class SyntheticSource:
    """One device batch of the recipe's micro-batch shape, reused every step.

    Vision: normalised random images and integer labels. Mixup/CutMix mixes the images in place,
    so each step gets a device copy (it stands where the host->device copy would be).
    LM: random token ids of the model's vocabulary, ``seq_len + 1`` per row.
    """

    kind = "synthetic"

    def __init__(self, module, cfg, micro: int, device: torch.device) -> None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        if module.task == "lm":
            vocab = module.net.config.vocab_size
            tokens = torch.randint(0, vocab, (micro, int(cfg.data.seq_len) + 1), generator=gen)
            self.batch = tokens.to(device)
            self.copy = False
        else:
            c = module.net.config
            images = torch.randn(micro, c.in_chans, c.image_size, c.image_size, generator=gen)
            labels = torch.randint(0, c.n_classes, (micro,), generator=gen)
            self.batch = [images.to(device), labels.to(device)]
            self.copy = getattr(module, "mixup_fn", None) is not None

    def next(self):
        if self.copy:
            return [self.batch[0].clone(), self.batch[1]]
        return self.batch

    def close(self) -> None:
        self.batch = None


class LoaderSource:
    """The recipe's training DataLoader (workers, pinned memory), copied to the device."""

    kind = "real"

    def __init__(self, datamodule, device: torch.device, items_in_batch) -> None:
        datamodule.setup("fit")
        self.loader = datamodule.train_dataloader()
        self.iterator = iter(self.loader)
        self.device = device
        self.items_in_batch = items_in_batch
        workers = self.loader.num_workers
        # Batches the loader can hold ready: each worker prefetches prefetch_factor of them.
        self.depth = workers * (self.loader.prefetch_factor or 2) if workers else 1
        self.workers = workers

    def next(self):
        return to_device(next(self.iterator), self.device)

    def drain(self, wait_s: float = 0.005) -> int:
        """Take batches that are already waiting until one has to be waited for: the prefetch
        queue is then empty, and what follows runs at the loader's steady rate. Returns how
        many batches were dropped."""
        dropped = 0
        for _ in range(self.depth + 1):
            started = time.perf_counter()
            next(self.iterator)
            dropped += 1
            if time.perf_counter() - started > wait_s:
                break
        return dropped

    def probe(self, batches: int, max_s: float) -> dict[str, float]:
        """The loader alone (no model, no device copy): items per second after a drain."""
        self.drain()
        items, count = 0, 0
        started = time.perf_counter()
        while count < batches and time.perf_counter() - started < max_s:
            items += self.items_in_batch(next(self.iterator))
            count += 1
        seconds = time.perf_counter() - started
        return {"items_per_s": items / seconds, "batches": count, "seconds": seconds}

    def close(self) -> None:
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # persistent workers would otherwise live on (and hold cores) until exit
        self.iterator = None


# =============================================================================================
# The step: the recipe's training_step, phase by phase
# =============================================================================================


@dataclasses.dataclass
class StepSpec:
    """What one optimizer step runs: ours (the nested module) or the baseline."""

    module: Any                      # the LightningModule: split_batch, width_loss, width weights
    forward: Any                     # (inputs, width) -> output
    widths_for_step: Any             # step -> widths
    backward_per_width: bool
    accumulate: int
    params: list
    max_norm: float
    optimizer: Any
    scheduler: Any
    autocast: Any                    # () -> context manager
    last_loss: torch.Tensor | None = None


def run_step(spec: StepSpec, source, timer: PhaseTimer, step: int) -> None:
    """One optimizer step, in ``NestedWidthModule.training_step``'s order (single device)."""
    module = spec.module
    scale = 1.0 / spec.accumulate
    widths = spec.widths_for_step(step)
    loss_sum = None
    for _ in range(spec.accumulate):
        batch = source.next()
        timer.mark("data")
        with spec.autocast():
            inputs, target = module.split_batch(batch, training=True)
            timer.mark("prep")
            total, teacher = None, None
            for width in widths:
                output = spec.forward(inputs, width)
                loss = module.width_loss(width, output, target, teacher)
                if width == module.full_width and module.distill_weight > 0:
                    teacher = output.detach()
                weighted = loss * module.width_weights[width]
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                timer.mark(f"fwd@{width}")
                if spec.backward_per_width:
                    (weighted * scale).backward()
                    timer.mark(f"bwd@{width}")
                else:
                    total = weighted if total is None else total + weighted
            del output, loss, weighted
            if total is not None:
                (total * scale).backward()
                timer.mark("bwd")
            del total, teacher, inputs, target, batch
    params = [p for p in spec.params if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, spec.max_norm)  # returns the norm; clipping is a no-op at inf
    spec.optimizer.step()
    spec.optimizer.zero_grad(set_to_none=True)
    if spec.scheduler is not None:
        spec.scheduler.step()
    timer.mark("opt")
    spec.last_loss = loss_sum


def timed_run(spec: StepSpec, source, device: torch.device, warmup: int, steps: int,
              drain: bool, settle: int = 3) -> dict[str, Any]:
    """Warm-up steps, then ``steps`` timed ones: phase splits, wall time, peak memory."""
    discard = PhaseTimer(device)
    for i in range(warmup):
        discard.begin()
        run_step(spec, source, discard, i)
    dropped = 0
    if drain:
        # Drop the backlog the workers built while warm-up compiled, then let the pipeline settle:
        # right after a drain every worker is mid-batch, so the next batch arrives only after one
        # batch's production time (one worker makes a whole batch: 512 augmented JPEGs take a
        # worker about 4 s), which a short timed run would count as input wait. Seen on an H200:
        # 8 timed steps right after a drain gave 0.86 of the synthetic rate with a median data
        # wait of 13 ms.
        dropped = source.drain()
        for i in range(settle):
            discard.begin()
            run_step(spec, source, discard, warmup + i)
        warmup += settle
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = PhaseTimer(device)
    started = time.perf_counter()
    for i in range(steps):
        timer.begin()
        run_step(spec, source, timer, warmup + i)
        timer.end()
    synchronize(device)
    wall = time.perf_counter() - started
    per_step = timer.durations()
    labels = list(dict.fromkeys(label for step in per_step for label in step))  # in order of first use
    out = {
        "wall_s": wall,
        "step_ms_wall": wall / steps * 1e3,
        "phases_ms": {label: summarize([s.get(label, 0.0) for s in per_step]) for label in labels},
        "step_ms_events": summarize([sum(s.values()) for s in per_step]),
        "drained_batches": dropped,
        "settle_steps": settle if drain else 0,
        # Sum over the widths of the last step's losses: a finite number says the step trained.
        "last_loss_sum": float(spec.last_loss.float()) if spec.last_loss is not None else None,
    }
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    else:
        import resource

        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process-wide
    return out


# =============================================================================================
# One case: the recipe's module, built like train.py builds it
# =============================================================================================


class CaseRun:
    """A recipe built for benchmarking: module on the device (compiled if the recipe says so),
    its optimizer and schedule, the data module, and the batch layout."""

    def __init__(self, case: Case, args, recipe: Recipe, *, batch: int, micro: int, compile_setting: str,
                 data_root: str | None):
        from matmamba.training.pipeline import build

        self.case, self.args, self.batch, self.micro = case, args, batch, micro
        self.compile_on = compile_setting != "off"
        self.device = bench_device(args.device)
        self.overrides = case_overrides(case, args, recipe, batch=batch, micro=micro, compile_setting=compile_setting,
                                        data_root=data_root)
        self.cfg = compose_cfg(self.overrides, Path(args.workdir))
        if batch % micro:
            raise ValueError(f"{case.label}: batch {batch} is not a multiple of the micro-batch {micro}")
        self.accumulate = batch // micro
        datamodule, module, trainer, _ = build(self.cfg)
        self.datamodule, self.module = datamodule, module
        module.trainer = trainer  # configure_optimizers reads trainer.max_steps and the strategy
        module.to(self.device)
        module.train()
        if args.act_ckpt:
            apply_activation_checkpointing(module.net)
        module.configure_model()  # torch.compile when model.compile=true, as Lightning does in fit
        config = module.configure_optimizers()
        self.optimizer = config["optimizer"]
        self.scheduler = config["lr_scheduler"]["scheduler"]
        precision = str(trainer.precision)
        bf16 = precision.startswith("bf16")
        self.precision = precision
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 \
            else contextlib.nullcontext
        self.spec = StepSpec(
            module=module,
            forward=module.train_forward,
            widths_for_step=module.widths_for_step,
            backward_per_width=module.backward_per_width,
            accumulate=self.accumulate,
            params=[p for p in module.parameters() if p.requires_grad],
            max_norm=module.optim_cfg.get("grad_clip") or float("inf"),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            autocast=self.autocast,
        )
        self.synthetic = SyntheticSource(module, self.cfg, micro, self.device)

    def describe(self) -> dict[str, Any]:
        m = self.module
        shape = {"seq_len": int(self.cfg.data.seq_len)} if m.task == "lm" else {
            "image_size": m.net.config.image_size, "mixup": m.mixup_fn is not None,
            "auto_augment": self.cfg.data.get("auto_augment"), "re_prob": self.cfg.data.get("re_prob")}
        return {"experiment": self.case.experiment, "model": m.hparams.name, "task": m.task,
                "d_model": m.net.config.d_model, "n_layer": m.net.config.n_layer,
                "widths": list(m.widths_for_step(0)), "params": sum(p.numel() for p in m.parameters()),
                "batch": self.batch, "micro_batch": self.micro, "accumulate": self.accumulate,
                "precision": self.precision, "act_ckpt": bool(self.args.act_ckpt),
                "backward": "per width" if m.backward_per_width else "joint (one backward of the summed losses)",
                "num_workers": int(self.cfg.data.num_workers), **shape}

    def items_per_step(self) -> int:
        return self.module.items_in_batch(self.synthetic.batch) * self.accumulate

    def flops_per_step(self, widths: list[int]) -> float:
        """Model FLOPs of one optimizer step: forward x 3 (forward + backward), every trained width."""
        return 3.0 * self.items_per_step() * sum(self.module.flops_per_item(w) for w in widths)

    def close(self) -> None:
        self.synthetic.close()
        self.module.trainer = None
        self.module = self.optimizer = self.scheduler = self.spec = self.datamodule = self.synthetic = None
        if self.compile_on:
            torch._dynamo.reset()  # compiled graphs hold the model (and its memory) otherwise


def apply_activation_checkpointing(net) -> None:
    """Recompute each residual block in backward instead of storing its activations (what
    ``trainer.strategy.activation_checkpointing=true`` does under FSDP)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as apply,
    )

    from matmamba.models.common import ResidualBlock

    apply(net, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
          check_fn=lambda m: isinstance(m, ResidualBlock))


def measure(run: CaseRun, source, args, gemm: dict, peak: float | None, tag: str = "") -> dict[str, Any]:
    """Time ``run`` on ``source``; derive throughput and MFU. With ``--kernel-profile``, then
    profile ``--kernel-profile-steps`` more steps (the timed figures are not affected)."""
    device = run.device
    result = timed_run(run.spec, source, device, args.warmup, args.steps, drain=source.kind == "real")
    widths = list(run.module.widths_for_step(args.warmup))
    items = run.items_per_step()
    flops = run.flops_per_step(widths)
    wall_step = result["step_ms_wall"] / 1e3
    result.update(items_per_step=items, items_per_s=items / wall_step, model_flops_per_step=flops,
                  model_tflops_per_s=flops / wall_step / 1e12, mfu_gemm=flops / wall_step / gemm["flops_per_s"],
                  mfu_peak=(flops / wall_step / peak) if peak else None)
    phases = result["phases_ms"]
    # Per width: forward MFU always; forward + backward MFU when each width has its own backward.
    per_fwd, per_all = {}, {}
    for w in widths:
        f = 3.0 * items * run.module.flops_per_item(w)
        fwd = phases.get(f"fwd@{w}", {}).get("median")
        bwd = phases.get(f"bwd@{w}", {}).get("median")
        if fwd:
            per_fwd[w] = (f / 3.0) / (fwd / 1e3) / gemm["flops_per_s"]
        if fwd and bwd:
            per_all[w] = f / ((fwd + bwd) / 1e3) / gemm["flops_per_s"]
    result["mfu_gemm_fwd_by_width"] = per_fwd
    if per_all:
        result["mfu_gemm_by_width"] = per_all
    if args.kernel_profile:
        trace = None
        if args.kernel_profile_trace:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", tag or run.case.label)
            trace = Path(args.kernel_profile_trace) / f"{name}.json.gz"
        first_step = args.warmup + result["settle_steps"] + args.steps
        result["kernel_profile"] = kernel_profile(run.spec, source, device, args.kernel_profile_steps, first_step,
                                                  result["step_ms_wall"], trace)
        log(f"{tag or run.case.label}: kernel profile: {kernel_profile_summary(result['kernel_profile'])}")
    return result


# =============================================================================================
# Kernel profile: where the step's GPU time goes, by kind of kernel
# =============================================================================================

# Kernel name -> category: the first category with a pattern that matches (re.search, case
# insensitive) wins, so the order matters: our own Triton kernels first (their names hold words such
# as "state" or "dx" that later patterns could take), then GEMMs, the loss, the optimizer, the rest
# of inductor's generated kernels, ATen's generic kernels and copies, NCCL; "other" is the rest.
# Made for CUDA kernel names; on the CPU (no kernels) the ATen op names classify roughly.
KERNEL_CATEGORIES: dict[str, tuple[str, ...]] = {
    # matmamba/ops/ssd/triton_impl.py (_cb_kernel, _chunk_states_kernel, _state_pass_kernel,
    # _state_walk_kernel, _chunk_out_fwd_kernel, _chunk_bwd_dx_kernel, _chunk_bwd_dbdc_kernel,
    # _finalize_grads_kernel) and
    # matmamba/ops/state_update (_state_update_kernel); matmamba::ssd_* custom ops on the CPU.
    "ssd_scan": (r"(^|_)cb_kernel", r"(^|_)chunk_\w*kernel", r"(^|_)state_\w*kernel", r"finalize_grads_kernel",
                 r"ssd_(scan|state)"),
    # matmamba/ops/conv1d/triton_impl.py: _conv_fwd_kernel, _conv_bwd_du_kernel, _conv_bwd_dx_kernel,
    # _conv_update_kernel; matmamba::causal_conv1d_* on the CPU.
    "conv1d": (r"(^|_)conv_\w*kernel", r"causal_conv1d"),
    # matmamba/ops/rmsnorm/triton_impl.py: _rmsnorm_fwd_kernel, _rmsnorm_bwd_kernel.
    "gated_rmsnorm": (r"rmsnorm_\w*kernel", r"gated_rmsnorm"),
    # cuBLAS/cuBLASLt (nvjet_* and sm90_xmma_gemm_* on Hopper, split-K reduce), CUTLASS, gemv,
    # inductor's matmul templates (triton_tem_fused_mm_0), ATen's matmul ops (the CPU).
    "gemm": (r"gemm", r"gemv", r"cutlass", r"cublas", r"nvjet", r"xmma", r"triton_tem_",
             r"(?<![a-z])(addmm|baddbmm|bmm|mm|matmul)(?![a-z])"),
    "loss": (r"cross_?entropy", r"softmax", r"nll_?loss", r"nllcriterion"),
    # Foreach kernels (AdamW's foreach path, clip_grad_norm_'s _foreach_norm), fused Adam, AMP.
    "optimizer": (r"multi_tensor_apply", r"adam", r"foreach", r"_amp_", r"lpnorm"),
    # The rest of inductor's generated kernels: pointwise, reduction, persistent reduction.
    "inductor_fused": (r"^triton_", r"triton_(poi|red|per)_"),
    "elementwise_other": (r"elementwise_kernel", r"vectorized_elementwise", r"reduce_kernel", r"memcpy", r"memset",
                          r"copy"),
    "nccl": (r"nccl",),
}
_KERNEL_PATTERNS = [(category, re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE))
                    for category, patterns in KERNEL_CATEGORIES.items()]
KERNEL_TOP = 15


def classify_kernel(name: str) -> str:
    """The category of a kernel (or, on the CPU, op) name: see ``KERNEL_CATEGORIES``."""
    for category, pattern in _KERNEL_PATTERNS:
        if pattern.search(name):
            return category
    return "other"


class _NoTimer:
    """run_step's timer when nothing is timed (profiled steps)."""

    def mark(self, label: str) -> None:
        pass


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time with at least one of them running."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def kernel_profile(spec: StepSpec, source, device: torch.device, steps: int, first_step: int,
                   step_ms_wall: float, trace: Path | None = None) -> dict[str, Any]:
    """Run ``steps`` more steps under ``torch.profiler`` and break their GPU time down by kind of
    kernel (``classify_kernel``): per category and for the top kernels, time and launches per step.

    Time is each kernel's self device time (``self_device_time_total``; memcpy and memset count as
    kernels). Busy time is the union of the kernels' intervals, per step; ``busy_share`` is that
    over the timed (unprofiled) step's wall time, so a host-bound step (the GPU waiting for
    launches or data) shows as a share well below 1. On the CPU: CPU ops' self time instead.
    Failures become ``{"status": "error"}`` (the timed figures stand)."""
    import traceback

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        synchronize(device)
        with profile(activities=activities) as prof:
            started = time.perf_counter()
            for i in range(steps):
                run_step(spec, source, _NoTimer(), first_step + i)
            synchronize(device)
            wall = time.perf_counter() - started

        def counted(event) -> bool:
            # Not: record_function ranges mirrored on the GPU timeline (as torch's own table
            # leaves them out), async spans, the profiler's own overhead records.
            if getattr(event, "is_user_annotation", False) or getattr(event, "is_async", False) \
                    or getattr(event, "activity_type", None) == "overhead":
                return False
            return (event.device_type != DeviceType.CPU) == cuda

        def self_us(event) -> float:
            if cuda:
                value = getattr(event, "self_device_time_total", None)
                return float(value if value is not None else event.self_cuda_time_total)  # torch < 2.4
            return float(event.self_cpu_time_total)

        kernels = [(e.key, self_us(e), e.count) for e in prof.key_averages() if counted(e)]
        busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in prof.events() if counted(e)])
        total_us = sum(us for _, us, _ in kernels)
        categories: dict[str, dict[str, float]] = {}
        for name, us, count in kernels:
            c = categories.setdefault(classify_kernel(name), {"us": 0.0, "count": 0})
            c["us"] += us
            c["count"] += count

        def ms(us: float) -> float:  # microseconds over all profiled steps -> ms per step
            return us / 1e3 / steps

        def share(us: float) -> float:
            return us / total_us if total_us > 0 else 0.0

        profiled_ms = wall / steps * 1e3
        out = {
            "status": "ok",
            "steps": steps,
            "time": "GPU kernels' self device time (self_device_time_total)" if cuda
                    else "CPU ops' self CPU time (self_cpu_time_total): no GPU",
            "kernel_ms_per_step": ms(total_us),
            "launches_per_step": sum(count for _, _, count in kernels) / steps,
            "busy_ms_per_step": ms(busy_us),
            "step_ms_wall": step_ms_wall,
            "profiled_step_ms_wall": profiled_ms,
            # GPU: kernel times are the profiler's own measurements and barely change under it, while
            # the host slows down; so the share is of the timed step's wall time. CPU: every op is
            # slower under the profiler, so the share is of the profiled steps' wall time.
            "busy_share": ms(busy_us) / (step_ms_wall if cuda else profiled_ms),
            "busy_share_of": "timed step wall" if cuda else "profiled step wall",
            "busy_share_profiled": ms(busy_us) / profiled_ms,
            "categories": {
                name: {"ms_per_step": ms(c["us"]), "share": share(c["us"]), "launches_per_step": c["count"] / steps}
                for name, c in sorted(categories.items(), key=lambda kv: -kv[1]["us"])},
            "top_kernels": [
                {"name": name[:80], "category": classify_kernel(name), "ms_per_step": ms(us),
                 "share": share(us), "calls_per_step": count / steps}
                for name, us, count in sorted(kernels, key=lambda k: -k[1])[:KERNEL_TOP]],
            "trace": None,
        }
        if trace is not None:
            trace.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace))
            wait = getattr(prof, "wait_for_exports", None)
            if wait is not None:
                wait()
            out["trace"] = str(trace)
        return out
    except Exception as error:  # noqa: BLE001 - a failed profile must not lose the timed row
        traceback.print_exc()
        return {"status": "error", "reason": error_text(error)}
    finally:
        free_memory(device)


def kernel_profile_summary(kp: dict) -> str:
    """One line: busy share and the three largest categories."""
    if kp.get("status") != "ok":
        return f"{kp.get('status')}: {kp.get('reason', '')}"
    top = ", ".join(f"{name} {c['share'] * 100:.0f}%" for name, c in list(kp["categories"].items())[:3])
    return (f"busy {kp['busy_ms_per_step']:.1f} ms/step = {pct(kp['busy_share'])} of the {kp['busy_share_of']}; "
            f"{kp['launches_per_step']:.0f} launches/step; {top}")


# =============================================================================================
# Baseline: the published way, on mamba_ssm's Mamba2
# =============================================================================================


@functools.lru_cache(maxsize=None)
def import_mamba2():
    """``mamba_ssm``'s Mamba2 class and which path its forward takes here, or (None, reason).

    Cached: the stub package put in ``sys.modules`` below has no ``__spec__``, so a second
    ``find_spec`` would fail (seen on the H200: every case after the first lost its baseline).

    ``selective_scan_cuda`` (Mamba-1's CUDA scan, absent from a wheel built without CUDA) is
    replaced by an empty module and the package ``__init__`` (which imports it and Mamba-3) is
    bypassed: Mamba2 needs neither.
    """
    from mamba_baseline import expose_mamba_ssm_package

    try:
        expose_mamba_ssm_package()
    except ImportError as error:
        return None, None, str(error)
    try:
        _ensure_hub_mixin()
        from mamba_ssm.modules import mamba2 as module
    except Exception as error:  # noqa: BLE001 - any import failure means: no baseline
        return None, None, f"mamba_ssm import failed: {type(error).__name__}: {error}"
    try:
        import causal_conv1d_cuda  # noqa: F401 - the fused path's conv kernels

        fused = module.causal_conv1d_fn is not None
    except Exception:  # noqa: BLE001
        fused = False
    path = ("mamba_split_conv1d_scan_combined (fused conv + SSD + gated norm + out_proj; causal_conv1d)"
            if fused else
            "torch nn.Conv1d + SiLU, Triton mamba_chunk_scan_combined, Triton gated RMSNorm "
            "(use_mem_eff_path=False: causal_conv1d is not installed)")
    return module.Mamba2, fused, path


def _ensure_hub_mixin() -> None:
    """Mamba2 subclasses huggingface_hub's PyTorchModelHubMixin (for Hub uploads, unused here);
    should that be missing from the installed huggingface_hub, a plain base class stands in."""
    try:
        import huggingface_hub

        if getattr(huggingface_hub, "PyTorchModelHubMixin", None) is not None:
            return
    except Exception:  # noqa: BLE001 - missing or broken: stand in below
        huggingface_hub = types.ModuleType("huggingface_hub")
        sys.modules["huggingface_hub"] = huggingface_hub
    huggingface_hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})


class PerWidthMixers(torch.nn.Module):
    """One dense mixer per width in a residual block's mixer slot: ``forward(x, width=w)`` runs
    width w's own block. ``resolve_width`` keeps the model's width validation working."""

    def __init__(self, mixers: dict[int, torch.nn.Module]) -> None:
        super().__init__()
        self.mixers = torch.nn.ModuleDict({str(w): m for w, m in mixers.items()})

    def resolve_width(self, width=None, mrl_level=None) -> int:
        if str(width) not in self.mixers:
            raise ValueError(f"the baseline has blocks for widths {list(self.mixers)}, not {width}")
        return int(width)

    def forward(self, hidden, width=None, inference_params=None, **ignored):
        return self.mixers[str(width)](hidden)


def mamba2_at_width(Mamba2, block, width: int, fused: bool, device) -> torch.nn.Module:
    """A mamba_ssm Mamba2 with our block's residual width D and exactly the inner size (heads x
    head dim), state size, groups, conv and chunk our nested block uses at ``width``.

    Mamba2 sizes its inner width as expand * d_model, and widths below D/2 need a fractional
    expand, so it is built at d_model = inner, expand = 1 (every inner size then exact) and its
    two projections are replaced by ones from and to the residual width D.
    """
    heads = block.heads_for_width(width)
    inner = heads * block.headdim
    m = Mamba2(d_model=inner, d_state=block.d_state, d_conv=block.d_conv, expand=1, headdim=block.headdim,
               ngroups=block.ngroups, dt_limit=block.dt_limit, chunk_size=block.chunk_size,
               use_mem_eff_path=fused, rmsnorm=True, norm_before_gate=block.norm_before_gate,
               bias=block.in_proj.bias is not None, conv_bias=block.conv_bias is not None, device=device)
    assert m.nheads == heads and m.d_inner == inner
    m.in_proj = torch.nn.Linear(block.d_model, m.in_proj.out_features, bias=m.in_proj.bias is not None,
                                device=device)
    m.out_proj = torch.nn.Linear(inner, block.d_model, bias=m.out_proj.bias is not None, device=device)
    m.d_model = block.d_model
    return m


def dense_at_width(block, width: int, device) -> torch.nn.Module:
    """CPU stand-in for the baseline's mixer (tests): our block as a dense block of width's heads."""
    from matmamba.models.block import MatMamba2

    return MatMamba2(block.d_model, d_state=block.d_state, d_conv=block.d_conv, expand=block.expand,
                     headdim=block.headdim, ngroups=block.ngroups, chunk_size=block.chunk_size,
                     nheads=block.heads_for_width(width), device=device)


def build_baseline(run: CaseRun, impl: str):
    """(StepSpec, description) of the published-style baseline for ``run``'s case, or (None, reason)."""
    from matmamba import create_model

    module, device = run.module, run.device
    widths = list(module.widths_for_step(0))
    if impl == "mamba_ssm":
        if device.type != "cuda":
            return None, "the mamba_ssm baseline needs CUDA (its kernels are Triton GPU kernels)"
        Mamba2, fused, path = import_mamba2()
        if Mamba2 is None:
            return None, path
        make = lambda block, w: mamba2_at_width(Mamba2, block, w, fused, device)  # noqa: E731
    else:
        path = "matmamba dense blocks (a stand-in for wiring tests, not a baseline)"
        make = lambda block, w: dense_at_width(block, w, device)  # noqa: E731
    # The same outer model as the recipe's (fresh weights): embedding/patch embedding, norms,
    # drop path, head; then each residual block's mixer becomes one dense block per width.
    overrides = dict(module.hparams.overrides or {})
    net = create_model(module.hparams.name, **{**overrides, "widths": widths})
    for layer in net.layers:
        block = layer.mixer
        layer.mixer = PerWidthMixers({w: make(block, w) for w in widths})
    net.to(device)
    net.train()
    lm = module.task == "lm"

    def forward(inputs, width):
        out = net(inputs, width=width)
        return out.logits if lm else out

    params = [p for p in net.parameters() if p.requires_grad]
    cfg = module.optim_cfg
    no_decay = [p for p in params if p.ndim < 2 or getattr(p, "_no_weight_decay", False)]
    decay = [p for p in params if not (p.ndim < 2 or getattr(p, "_no_weight_decay", False))]
    groups = [{"params": decay, "weight_decay": cfg.get("weight_decay", 0.0)},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.get("lr", 1e-3), betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=cfg.get("eps", 1e-8),
        fused=device.type == "cuda")
    spec = StepSpec(module=module, forward=forward, widths_for_step=lambda step: widths,
                    backward_per_width=True,  # one width per micro-step, as published
                    accumulate=run.accumulate, params=params, max_norm=run.spec.max_norm,
                    optimizer=optimizer, scheduler=None, autocast=run.autocast)
    info = {"impl": impl, "path": path, "params": sum(p.numel() for p in params),
            "mixer_inner_sizes": {w: net.layers[0].mixer.mixers[str(w)].d_inner for w in widths}}
    return spec, info


# =============================================================================================
# Optional: the same recipe through trainer.fit, read from the ThroughputMonitor
# =============================================================================================


def lightning_throughput(case: Case, args, recipe: Recipe, *, batch: int, micro: int, compile_setting: str,
                         data_root: str) -> dict:
    """Run ``trainer.fit`` for whole ThroughputMonitor windows of ``--steps`` steps (the first
    window holds the warm-up) and return the last window's figures."""
    from matmamba.training.pipeline import build

    windows = math.ceil(max(args.warmup, 1) / args.steps) + 1
    overrides = case_overrides(case, args, recipe, batch=batch, micro=micro, compile_setting=compile_setting,
                               data_root=data_root, max_steps=windows * args.steps)
    overrides += ["callbacks=throughput", f"callbacks.throughput.window={args.steps}",
                  "+trainer.enable_checkpointing=false", "trainer.limit_val_batches=0"]
    if case.experiment.startswith("vision") and data_root:
        classes = sum(1 for p in (Path(data_root) / "train").iterdir() if p.is_dir())
        if classes != 1000:  # fit checks that data and model agree on the classes (the recipes: 1000)
            overrides += [f"++model.overrides.n_classes={classes}", f"model.top_k=[1,{min(5, classes)}]"]
    cfg = compose_cfg(overrides, Path(args.workdir))
    datamodule, module, trainer, _ = build(cfg)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    kind = "tokens" if module.task == "lm" else "images"
    out = {"items_per_s": metrics.get(f"perf/{kind}_per_sec_per_device"),
           "steps_per_s": metrics.get("perf/steps_per_sec"),
           "mfu_peak": metrics.get("perf/mfu"), "fit_seconds": time.perf_counter() - started,
           "max_steps": windows * args.steps, "window": args.steps}
    del trainer, module, datamodule
    return out


# =============================================================================================
# Data preparation
# =============================================================================================


def ensure_token_root(args) -> str:
    """--token-root, or generated shards: into --token-root when it holds none, else under
    --data-dir (kept, so that later runs on the same machine reuse them)."""
    import make_bench_data

    root = Path(args.token_root or Path(args.data_dir) / "tokens")
    if not (root / "meta.json").is_file():
        log(f"generating token shards in {root}")
        make_bench_data.make_tokens(root, tokens=args.gen_tokens, val_tokens=min(1_000_000, args.gen_tokens // 10))
    return str(root)


def ensure_image_root(args) -> str:
    """--image-root, or a generated ImageNet-format tree: into --image-root when it has no
    train/ folder, else under --data-dir (kept for later runs)."""
    import make_bench_data

    if args.image_root and (Path(args.image_root) / "train").is_dir():
        return args.image_root
    root = Path(args.image_root or Path(args.data_dir) / "imagenet")
    marker = root / ".complete"
    if not marker.is_file():
        log(f"generating an ImageNet-format JPEG tree in {root}")
        # 1000 classes, as the recipes' heads have: the labels and the head agree.
        summary = make_bench_data.make_imagenet(root, classes=1000, train_per_class=args.gen_images_per_class,
                                                val_per_class=1, workers=args.gen_workers)
        marker.write_text(json.dumps(summary) + "\n")
    return str(root)


# =============================================================================================
# Report
# =============================================================================================


def versions() -> dict[str, Any]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    import importlib.metadata as md

    for name in ("triton", "lightning", "hydra-core", "timm", "mamba_ssm", "causal_conv1d", "numpy", "pillow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def fmt(value, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def pct(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def phase_columns(row: dict) -> tuple[str, str, str, str]:
    """(data, fwd per width, bwd, opt) as short strings from a row's phase medians."""
    phases = {k: v["median"] for k, v in row["phases_ms"].items()}
    widths = row["widths"]
    fwd = "/".join(fmt(phases.get(f"fwd@{w}")) for w in widths)
    if any(f"bwd@{w}" in phases for w in widths):
        bwd = "/".join(fmt(phases.get(f"bwd@{w}")) for w in widths)
    else:
        bwd = fmt(phases.get("bwd")) + " joint"
    data = fmt(phases.get("data", 0.0) + phases.get("prep", 0.0))
    return data, fwd, bwd, fmt(phases.get("opt"))


def print_table(rows: list[dict], meta: dict) -> None:
    gemm = meta.get("gemm", {})
    print()
    print("=" * 150)
    print(f"bench_train on {meta['device_name']}: measured {gemm.get('dtype')} GEMM "
          f"{fmt(gemm.get('flops_per_s', 0) / 1e12, '.4g')} TFLOP/s, datasheet peak "
          f"{fmt((meta.get('peak_flops') or 0) / 1e12, '.0f')} TFLOP/s; "
          f"{meta['args']['warmup']} warm-up + {meta['args']['steps']} timed steps; step ms = wall time / step; "
          f"split = medians (ms) of data+prep / fwd by width / bwd / opt; ratio = baseline / ours")
    head = (f"{'case':<16} {'data':<9} {'comp':<4} {'batch':>9} {'items/s/GPU':>12} {'step ms':>9} {'data':>6} "
            f"{'fwd ms by width':<24} {'bwd ms':<24} {'opt':>5} {'MFU gemm':>8} {'MFU peak':>8} {'peak GiB':>8} "
            f"{'base ms':>8} {'ratio':>6}  note")
    print(head)
    print("-" * len(head))
    for row in rows:
        label = row["case"] + (" base" if row.get("is_baseline") else "")
        if row.get("status") != "ok":
            print(f"{label:<16} {row.get('data', '-'):<9} {row.get('compile', '-'):<4} {'':>9} "
                  f"{row.get('status')}: {row.get('reason', '')}")
            continue
        data, fwd, bwd, opt = phase_columns(row)
        batch = f"{row['batch']}" + (f"/{row['micro_batch']}" if row["accumulate"] > 1 else "")
        peak = row.get("peak_allocated_gib", row.get("peak_rss_gib"))
        base = row.get("baseline_step_ms")
        print(f"{label:<16} {row['data']:<9} {row['compile']:<4} {batch:>9} {row['items_per_s']:>12,.0f} "
              f"{row['step_ms_wall']:>9.1f} {data:>6} {fwd:<24} {bwd:<24} {opt:>5} "
              f"{pct(row['mfu_gemm']):>8} {pct(row['mfu_peak']):>8} "
              f"{fmt(peak, '.1f'):>8} {fmt(base):>8} {fmt(row.get('ratio'), '.2f'):>6}  {row.get('note', '')}")
    print("=" * 150, flush=True)


def print_kernel_profiles(rows: list[dict]) -> None:
    """After the main table: per profiled case, time by kind of kernel and the top kernels."""
    profiled = [r for r in rows if r.get("kernel_profile")]
    if not profiled:
        return
    print()
    print("kernel profile (--kernel-profile): self time per step by kind of kernel (GPU kernels; CPU ops on the "
          "CPU); busy = union of their intervals per step")
    for row in profiled:
        kp = row["kernel_profile"]
        title = f"{row['case']} {row['data']} compile={row['compile']}"
        if kp.get("status") != "ok":
            print(f"-- {title}: {kp.get('status')}: {kp.get('reason', '')}")
            continue
        unit = "GPU" if kp["time"].startswith("GPU") else "CPU op"
        print(f"-- {title}: {kp['steps']} profiled steps; {unit} busy {kp['busy_ms_per_step']:.2f} ms/step = "
              f"{pct(kp['busy_share'])} of the {kp.get('busy_share_of', 'step wall')} (timed "
              f"{kp['step_ms_wall']:.2f} ms, profiled {kp['profiled_step_ms_wall']:.2f} ms); {unit} self time "
              f"{kp['kernel_ms_per_step']:.2f} ms/step, {kp['launches_per_step']:.0f} launches/step"
              + (f"; trace {kp['trace']}" if kp.get("trace") else ""))
        print(f"   {'category':<18} {'ms/step':>9} {'share':>7} {'launches':>9}")
        for name, c in kp["categories"].items():
            print(f"   {name:<18} {c['ms_per_step']:>9.3f} {pct(c['share']):>7} {c['launches_per_step']:>9.1f}")
        print(f"   {'top kernels':<80} {'category':<18} {'ms/step':>9} {'calls':>7}")
        for k in kp["top_kernels"]:
            print(f"   {k['name']:<80} {k['category']:<18} {k['ms_per_step']:>9.3f} {k['calls_per_step']:>7.1f}")
    print(flush=True)


class Report:
    def __init__(self, path: str | None, meta: dict) -> None:
        self.path, self.meta, self.rows = path, meta, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        """Written after every row: a run stopped by a time limit still leaves its numbers."""
        if self.path:
            self.meta["seconds"] = round(time.perf_counter() - T_START, 1)
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(self.path) + ".tmp")
            tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1, default=str) + "\n")
            os.replace(tmp, self.path)


# =============================================================================================
# Main
# =============================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="lm_130m,vision_b16,vision_35m",
                   help="experiments, comma-separated; 'name:w1/w2' trains only those widths")
    p.add_argument("--data", default="synthetic,real", help="data modes: synthetic, real")
    p.add_argument("--compile", default="off,on",
                   help=f"torch.compile settings, comma-separated: {', '.join(COMPILE_SETTINGS)} (a mode "
                        "compiles with that torch.compile mode; reduce-overhead adds CUDA graphs)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the published-style mamba_ssm baseline (GPU)")
    p.add_argument("--baseline-impl", default="mamba_ssm", choices=["mamba_ssm", "dense"],
                   help="dense: our own dense blocks in the baseline's place (tests the wiring on the CPU)")
    p.add_argument("--steps", type=int, default=15, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per optimizer step on this device (default: the recipe's global batch / its devices)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="samples per forward (default: the recipe's data.micro_batch_size, at most --batch)")
    p.add_argument("--widths", default=None, help="widths for every case, comma-separated (default: the recipe's)")
    p.add_argument("--backward-per-width", action="store_true",
                   help="model.backward_per_width=true: per-width backward times (and less activation memory)")
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing of every residual block")
    p.add_argument("--lightning", action="store_true",
                   help="also run trainer.fit on real data and report its ThroughputMonitor figure")
    p.add_argument("--token-root", default=None,
                   help="token shards (generated there if it holds none; default: generated under --data-dir)")
    p.add_argument("--image-root", default=None,
                   help="ImageNet-format tree (generated there if absent; default: generated under --data-dir)")
    p.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "matmamba_bench_data"),
                   help="where generated data goes (reused by later runs)")
    p.add_argument("--gen-tokens", type=int, default=20_000_000)
    p.add_argument("--gen-images-per-class", type=int, default=4,
                   help="generated training JPEGs per class (1000 classes)")
    p.add_argument("--gen-workers", type=int, default=None)
    p.add_argument("--loader-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="time the real-data loader alone after each real-data run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--gemm-size", type=int, default=None, help="GEMM side for the measured rate (8192 GPU, 512 CPU)")
    p.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model config fields for every case (tiny models), e.g. n_layer=2 d_model=64")
    p.add_argument("--overrides", nargs="*", default=[], metavar="HYDRA_OVERRIDE",
                   help="extra Hydra overrides for every case, e.g. data.num_workers=12 data.seq_len=64")
    p.add_argument("--kernel-profile", action="store_true",
                   help="after each of our timed runs (not the baseline), profile --kernel-profile-steps more "
                        "steps with torch.profiler: GPU time and launches per step by kind of kernel (SSD scan, "
                        "conv1d, gated RMSNorm, GEMM, loss, optimizer, inductor, elementwise, NCCL), the top "
                        "kernels, and GPU busy time against the step's wall time (JSON 'kernel_profile')")
    p.add_argument("--kernel-profile-steps", type=int, default=3, metavar="N",
                   help="steps profiled per case with --kernel-profile (default: 3)")
    p.add_argument("--kernel-profile-trace", default=None, metavar="DIR",
                   help="also write each profiled case's Chrome trace (.json.gz) into DIR (implies --kernel-profile)")
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; cases that would start after this are skipped (listed in the table)")
    p.add_argument("--workdir", default=None, help="run folder for the composed configs (default: a temp dir)")
    args = p.parse_args(argv)
    args.cases = [Case.parse(c) for c in args.cases.split(",") if c]
    args.data = [d for d in args.data.split(",") if d]
    args.compile = [c for c in args.compile.split(",") if c]
    args.widths = [int(w) for w in args.widths.split(",")] if args.widths else None
    if not set(args.data) <= {"synthetic", "real"}:
        p.error(f"--data takes synthetic and/or real, got {args.data}")
    if not set(args.compile) <= set(COMPILE_SETTINGS):
        p.error(f"--compile takes {', '.join(COMPILE_SETTINGS)}; got {args.compile}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.kernel_profile_steps < 1:
        p.error("--kernel-profile-steps must be >= 1")
    if args.kernel_profile_trace and not args.kernel_profile:
        args.kernel_profile = True  # asking for traces implies the profile
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available; use --device cpu")
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="bench_train_")
    return args


def shm_free_gib() -> float | None:
    """Free space of /dev/shm, through which DataLoader workers hand their batches over."""
    import shutil

    try:
        return shutil.disk_usage("/dev/shm").free / GIB
    except OSError:
        return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from matmamba.training.callbacks import peak_flops_for

    # Data first: the generator forks worker processes, best done before CUDA is initialised.
    roots: dict[str, str | None] = {"lm": None, "vision": None}
    if "real" in args.data:
        if any(c.experiment.startswith("lm") for c in args.cases):
            roots["lm"] = ensure_token_root(args)
        if any(c.experiment.startswith("vision") for c in args.cases):
            roots["vision"] = ensure_image_root(args)
    device = bench_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    peak = peak_flops_for(name) if device.type == "cuda" else None
    gemm = measure_gemm(device, args.gemm_size or (8192 if device.type == "cuda" else 512))
    log(f"{name}: measured {gemm['dtype']} GEMM {gemm['flops_per_s'] / 1e12:.1f} TFLOP/s "
        f"({gemm['n']}^3, {gemm['ms']:.2f} ms); datasheet peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s")
    meta = {"device_name": name, "device": args.device, "peak_flops": peak, "gemm": gemm, "versions": versions(),
            "cpu_count": os.cpu_count(), "shm_free_gib": shm_free_gib(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "args": {k: (v if k != "cases" else [c.label for c in v]) for k, v in vars(args).items()},
            "timing": "CUDA events on the compute stream per phase; throughput from wall time over the timed "
                      "steps with synchronize at both ends" if device.type == "cuda" else "wall clock (CPU)"}
    meta["data_roots"] = roots
    report = Report(args.json, meta)

    def over_budget() -> bool:
        return args.time_budget is not None and time.perf_counter() - T_START > args.time_budget

    baselines: dict[str, dict] = {}
    for compile_mode in args.compile:
        for case in args.cases:
            compile_setting = compile_mode
            task = "lm" if case.experiment.startswith("lm") else "vision"
            recipe = recipe_facts(case, args)
            batch = args.batch or recipe.per_device_batch
            micro = args.micro_batch or min(batch, recipe.micro_batch or batch)
            notes: list[str] = []
            run: CaseRun | None = None
            our_rows: list[dict] = []
            for data in args.data:
                row_base = {"case": case.label, "data": data, "compile": compile_mode}
                while True:
                    if over_budget():
                        report.add({**row_base, "status": "skipped", "reason": "time budget"})
                        break
                    oom = None
                    source = None
                    try:
                        if run is None:
                            log(f"building {case.label} compile={compile_mode} batch={batch} micro-batch={micro}")
                            run = CaseRun(case, args, recipe, batch=batch, micro=micro, compile_setting=compile_setting,
                                          data_root=roots[task])
                        source = run.synthetic if data == "synthetic" else LoaderSource(
                            run.datamodule, device, run.module.items_in_batch)
                        result = measure(run, source, args, gemm, peak, tag=f"{case.label} {data} compile={compile_mode}")
                        if data == "real" and args.loader_probe:
                            result["loader"] = source.probe(batches=max(8, source.workers + 2), max_s=15.0)
                            result["loader_items_per_s"] = result["loader"]["items_per_s"]
                            result["prefetch_depth"] = source.depth
                        row = {**row_base, "status": "ok", **run.describe(), **result, "note": "; ".join(notes)}
                        our_rows.append(row)
                        report.add(row)
                        log(f"{case.label} {data} compile={compile_mode}: {row['items_per_s']:,.0f} items/s, "
                            f"step {row['step_ms_wall']:.1f} ms, MFU {row['mfu_gemm'] * 100:.1f}% of measured GEMM, "
                            f"peak {fmt(row.get('peak_allocated_gib'), '.1f')} GiB")
                        break
                    except torch.cuda.OutOfMemoryError as error:
                        oom = error_text(error)
                    except Exception as error:  # noqa: BLE001 - one broken case must not stop the others
                        import traceback

                        traceback.print_exc()
                        failed = error_text(error)
                        report.add({**row_base, "status": "error", "reason": failed})
                        log(f"{case.label} {data} compile={compile_mode}: {failed}")
                        break
                    finally:
                        if source is not None and source is not (run.synthetic if run else None):
                            source.close()
                        source = None
                    # Out of memory: drop everything, halve the micro-batch (accumulation keeps
                    # the step's batch, as the recipes do on fewer GPUs) and try again.
                    if run is not None:
                        run.close()
                    run = None
                    free_memory(device)
                    if micro % 2 or micro < 2:
                        report.add({**row_base, "status": "oom", "reason": oom})
                        break
                    notes.append(f"OOM at micro-batch {micro}, halved")
                    micro //= 2
                    log(f"{case.label}: out of memory ({oom}); retrying with micro-batch {micro}")

            # The baseline: once per case and batch layout, on the synthetic batch.
            key = f"{case.label}|{batch}|{micro}"
            if args.baseline and run is not None and key not in baselines:
                if over_budget():
                    baselines[key] = {"case": case.label, "status": "skipped", "reason": "time budget",
                                      "is_baseline": True}
                else:
                    baselines[key] = run_baseline(run, args, gemm, peak, case)
                report.add(baselines[key])
            # Real data against the model alone: how much the input pipeline costs.
            synthetic = next((r for r in our_rows if r["data"] == "synthetic"), None)
            for row in our_rows:
                if row["data"] == "real" and synthetic is not None:
                    row["real_vs_synthetic"] = row["items_per_s"] / synthetic["items_per_s"]
                    extra = [f"real/synthetic {row['real_vs_synthetic']:.2f}",
                             f"loader alone {fmt(row.get('loader_items_per_s'), ',.0f')}/s"]
                    row["note"] = "; ".join(filter(None, [row["note"], *extra]))
            base = baselines.get(key)
            for row in our_rows:
                if base and base.get("status") == "ok":
                    row["baseline_step_ms"] = base["step_ms_wall"]
                    if row["data"] == "synthetic":
                        row["ratio"] = base["step_ms_wall"] / row["step_ms_wall"]
            report.save()

            if args.lightning and "real" in args.data and run is not None and not over_budget():
                lightning_micro = run.micro
                run.close()
                run = None
                free_memory(device)
                try:
                    log(f"{case.label}: trainer.fit for comparison")
                    fit = lightning_throughput(case, args, recipe, batch=batch, micro=lightning_micro,
                                               compile_setting=compile_setting, data_root=roots[task])
                    fit["act_ckpt"] = False  # trainer.fit runs the recipe as configured
                    for row in our_rows:
                        if row["data"] == "real":
                            row["lightning"] = fit
                            if fit.get("items_per_s"):
                                row["lightning_vs_ours"] = fit["items_per_s"] / row["items_per_s"]
                                row["note"] = "; ".join(filter(None, [
                                    row["note"], f"trainer.fit {fit['items_per_s']:,.0f}/s "
                                                 f"({row['lightning_vs_ours']:.2f} of this loop)"]))
                except Exception as error:  # noqa: BLE001 - report it in the row, carry on
                    for row in our_rows:
                        if row["data"] == "real":
                            row["lightning"] = {"status": "failed", "reason": error_text(error)}
                    log(f"{case.label}: trainer.fit failed: {error_text(error)}")
                report.save()
            if run is not None:
                run.close()
            free_memory(device)

    report.rows.sort(key=lambda r: (r["case"], r.get("is_baseline", False)))
    report.save()
    print_table(report.rows, meta)
    print_kernel_profiles(report.rows)
    return {"meta": meta, "rows": report.rows}


def error_text(error: BaseException) -> str:
    first = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {first}"


def run_baseline(run: CaseRun, args, gemm: dict, peak: float | None, case: Case) -> dict:
    """The published-style baseline on ``run``'s synthetic batch; failures become a row."""
    import traceback

    row = {"case": case.label, "data": "synthetic", "compile": "off", "is_baseline": True}
    spec = None
    try:
        spec, info = build_baseline(run, args.baseline_impl)
        if spec is None:
            log(f"{case.label}: no baseline ({info})")
            return {**row, "status": "skipped", "reason": info}
        log(f"{case.label}: baseline ({info['path']})")
        result = timed_run(spec, run.synthetic, run.device, args.warmup, args.steps, drain=False)
    except torch.cuda.OutOfMemoryError as error:
        failed = {"status": "oom", "reason": error_text(error)}
    except Exception as error:  # noqa: BLE001 - a broken baseline must not stop the benchmark
        traceback.print_exc()
        failed = {"status": "error", "reason": error_text(error)}
        log(f"{case.label} baseline: {failed['reason']}")
    else:
        widths = list(spec.widths_for_step(0))
        items = run.items_per_step()
        flops = run.flops_per_step(widths)  # the same work, counted on our model
        wall_step = result["step_ms_wall"] / 1e3
        row.update(status="ok", baseline=info, widths=widths, batch=run.batch, micro_batch=run.micro,
                   accumulate=run.accumulate, items_per_step=items, items_per_s=items / wall_step,
                   mfu_gemm=flops / wall_step / gemm["flops_per_s"],
                   mfu_peak=(flops / wall_step / peak) if peak else None,
                   note=f"published style, {info['impl']}: one width per micro-step", **result)
        log(f"{case.label} baseline: {row['items_per_s']:,.0f} items/s, step {row['step_ms_wall']:.1f} ms")
        return row
    finally:
        spec = None
        free_memory(run.device)
    return {**row, **failed}


if __name__ == "__main__":
    main()
