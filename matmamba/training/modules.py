"""Lightning modules that train the nested widths of a MatMamba model jointly.

Every optimizer step runs the model at each width of ``widths`` (or a random subset of them) on
the same batch and minimises the weighted sum of the per-width losses. Optionally the narrower
widths also learn from the widest width's detached outputs (distillation), and each width can be
backpropagated on its own to keep only one width's activations alive at a time.

Optimization is manual so that these options, gradient accumulation and clipping share one code
path on one device, under DDP and under FSDP.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torchmetrics import MeanMetric

from matmamba import create_model
from matmamba.training.losses import (
    LMHeadInput,
    chunked_lm_cross_entropy,
    distillation_kl,
    lm_cross_entropy,
)
from matmamba.training.optim import build_param_groups, cosine_with_warmup
from matmamba.training.strategies import check_not_fsdp1, is_fsdp, shard_model
from matmamba.training.utils import compile_mode

log = logging.getLogger(__name__)


def manual_sync_dtype(hook) -> torch.dtype:
    """dtype of the gradient all-reduce that backward_per_width / accumulation run themselves under
    DDP: that of the strategy's compressing comm hook, or fp32. Other hooks only act inside DDP's
    own reducer, so they are refused rather than silently skipped."""
    if hook is None:
        return torch.float32
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    known = {default_hooks.bf16_compress_hook: torch.bfloat16, default_hooks.fp16_compress_hook: torch.float16,
             default_hooks.allreduce_hook: torch.float32}
    if hook not in known:
        raise ValueError(f"trainer.strategy.ddp_comm_hook={getattr(hook, '__name__', hook)} is not applied to the "
                         "all-reduce that model.backward_per_width and gradient accumulation run once per step; "
                         "use bf16_compress_hook (trainer=ddp_bf16_grads), fp16_compress_hook or allreduce_hook "
                         "with them")
    return known[hook]


# Wrapper prefixes that FSDP, activation checkpointing and torch.compile insert in parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class NestedWidthModule(L.LightningModule):
    """Base module: joint training of nested widths.

    Args:
        name: registered model name (``matmamba.list_models()``).
        overrides: model config fields to override (``n_layer``, ``d_model``, ``drop_path_rate``...).
        widths: widths trained jointly, widest first; null = the model's default (D, D/2, D/4, D/8).
        width_weights: loss weight of each width (same order as ``widths``); null = all 1.
        widths_per_step: train a random subset of this many widths per step (null = all). The
            subset is drawn from ``(seed, step)``, identical on every rank; with distillation the
            widest width is always in it.
        distill: ``{weight, temperature}``; weight > 0 mixes, for every width but the widest,
            ``(1 - weight) * task loss + weight * KL(widest || width) * T^2``.
        backward_per_width: backpropagate each width right after its forward (bounds activation
            memory to one width at a time; same gradients).
        optim: ``lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio, total_steps,
            grad_clip, no_decay_1d, no_decay`` (see ``conf/optim/adamw.yaml``).
        compile: ``true`` wraps the model in ``torch.compile``; a torch.compile mode by name
            (``reduce-overhead``: also CUDA graphs; ``max-autotune``,
            ``max-autotune-no-cudagraphs``) compiles with that mode; ``false`` runs eagerly.
        seed: seed of the width subsets.
    """

    task: str = ""

    def __init__(
        self,
        name: str,
        overrides: dict[str, Any] | None = None,
        widths: Sequence[int] | None = None,
        width_weights: Sequence[float] | None = None,
        widths_per_step: int | None = None,
        distill: dict[str, float] | None = None,
        backward_per_width: bool = False,
        optim: dict[str, Any] | None = None,
        compile: bool | str = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        compile_mode(compile)  # a clear error for a mode torch.compile does not have
        self.save_hyperparameters()
        self.automatic_optimization = False

        overrides = dict(overrides or {})
        if widths is not None:
            overrides["widths"] = [int(w) for w in widths]
        self.net = create_model(name, **overrides)
        self.widths = self._check_widths(list(self.net.widths_default))
        self.full_width = self.widths[0]
        self.width_weights = self._check_weights(width_weights)
        self.widths_per_step = self._check_subset(widths_per_step)
        distill = dict(distill or {})
        self.distill_weight = float(distill.get("weight", 0.0))
        self.distill_temperature = float(distill.get("temperature", 1.0))
        self.distill_kl = distillation_kl  # the LM module compiles it with model.compile
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"model.distill.weight must be in [0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ValueError(f"model.distill.temperature must be > 0, got {self.distill_temperature}")
        self.backward_per_width = bool(backward_per_width)
        self.optim_cfg = dict(optim or {})
        self.no_decay = self._no_decay_names()

        self.accumulate = 1
        self._manual_grad_sync = False
        self._pending_rng: dict[str, Any] | None = None
        self._step_losses: dict[int, float] = {}
        self.val_metrics = torch.nn.ModuleDict()
        for w in self.widths:
            for metric in self.val_metric_names():
                self.val_metrics[f"{metric}@{w}"] = MeanMetric()

    # ------------------------------------------------------------------ checks
    def _check_widths(self, widths: list[int]) -> list[int]:
        valid = set(self.net.valid_widths())
        if not widths:
            raise ValueError("model.widths must list at least one width")
        bad = [w for w in widths if w not in valid]
        if bad:
            raise ValueError(
                f"model.widths {bad} are not valid for {self.hparams.name} (d_model="
                f"{self.net.config.d_model}); valid widths: {sorted(valid)}"
            )
        if len(set(widths)) != len(widths):
            raise ValueError(f"model.widths has duplicates: {widths}")
        return sorted(widths, reverse=True)

    def _check_weights(self, weights: Sequence[float] | None) -> dict[int, float]:
        given = list(self.hparams.widths or self.widths)
        if weights is None:
            return {w: 1.0 for w in self.widths}
        weights = [float(x) for x in weights]
        if len(weights) != len(given):
            raise ValueError(
                f"model.width_weights has {len(weights)} entries but model.widths has {len(given)} ({given})"
            )
        if any(x < 0 for x in weights) or sum(weights) <= 0:
            raise ValueError(f"model.width_weights must be >= 0 with a positive sum, got {weights}")
        return {int(w): x for w, x in zip(given, weights, strict=True)}

    def _check_subset(self, k: int | None) -> int | None:
        if k is None:
            return None
        if not 1 <= k <= len(self.widths):
            raise ValueError(f"model.widths_per_step must be in [1, {len(self.widths)}] or null, got {k}")
        return int(k)

    def _no_decay_names(self) -> set[str]:
        """Parameters without weight decay: 1-D ones (biases, norms, A_log, D, dt_bias) when
        ``optim.no_decay_1d``, those the model marks with ``_no_weight_decay``, and name globs."""
        patterns = list(self.optim_cfg.get("no_decay", []))
        no_1d = self.optim_cfg.get("no_decay_1d", True)
        names = set()
        for name, p in self.net.named_parameters():
            if (no_1d and p.ndim < 2) or getattr(p, "_no_weight_decay", False):
                names.add(name)
            elif any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                names.add(name)
        return names

    # ------------------------------------------------------------------ subclass API
    def val_metric_names(self) -> list[str]:
        return ["loss"]

    def task_loss(self, output: torch.Tensor, target: Any) -> torch.Tensor:
        raise NotImplementedError

    def distill_loss(self, output: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) over the last dim, averaged over everything else, times T^2."""
        return self.distill_kl(output, teacher, self.distill_temperature)

    def forward_width(self, inputs: torch.Tensor, width: int) -> torch.Tensor:
        raise NotImplementedError

    def split_batch(self, batch: Any, training: bool) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def items_in_batch(self, batch: Any) -> int:
        """Images or tokens in a batch (throughput)."""
        raise NotImplementedError

    def flops_per_item(self, width: int) -> float:
        """Forward FLOPs of one image or token at ``width`` (MFU)."""
        raise NotImplementedError

    def validation_update(self, width: int, output: torch.Tensor, target: Any) -> None:
        raise NotImplementedError

    def derived_val_metrics(self, width: int, values: dict[str, float]) -> dict[str, float]:
        return {}

    def train_forward(self, inputs: torch.Tensor, width: int):
        """The training step's forward at ``width``: what ``task_loss`` takes (default: the same
        output as evaluation; the LM can hand over hidden states for a chunked head + loss)."""
        return self.forward_width(inputs, width)

    def forward(self, inputs: torch.Tensor, width: int | None = None) -> torch.Tensor:
        return self.forward_width(inputs, width or self.full_width)

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        strategy = self._trainer.strategy if self._trainer is not None else None
        check_not_fsdp1(strategy)
        if is_fsdp(strategy):
            self._shard_model(strategy)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile(mode=compile_mode(self.hparams.compile))
            self._compiled = True
            # Each width is its own graph, once for training, once under no_grad (validation in
            # fit) and once under inference_mode (trainer.validate): 3 per width, more than
            # dynamo's default of 8 recompiles for 4 widths. Past the limit the rest runs eagerly
            # (seen on lm_pydoc: the final validation fell back to eager).
            import torch._dynamo.config as dynamo_config

            needed = 3 * len(self.widths) + 4  # + a few shape changes (a last, smaller batch)
            if dynamo_config.recompile_limit < needed:
                dynamo_config.recompile_limit = needed

    def _shard_model(self, strategy) -> None:
        """FSDP2 (``trainer=fsdp``): shard ``self.net`` in place, each residual block one unit
        (:func:`matmamba.training.strategies.shard_model`). Runs for fit and again for validate:
        a sharded model is left as it is."""
        mesh = self.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError("MatMamba models have no tensor-parallel plan: use ModelParallelStrategy with "
                             "tensor_parallel_size=1 (trainer=fsdp does)")
        if hasattr(strategy, "shard_mesh"):  # trainer=fsdp: its sharding options
            shard_model(self.net, strategy.shard_mesh(), **strategy.shard_options())
        else:  # a plain ModelParallelStrategy: FULL_SHARD over the data-parallel ranks
            shard_model(self.net, mesh["data_parallel"])

    def configure_optimizers(self):
        cfg = self.optim_cfg
        named = [(_clean_name(n), p) for n, p in self.net.named_parameters() if p.requires_grad]
        groups = build_param_groups(named, self.no_decay, cfg.get("weight_decay", 0.0))
        fused = cfg.get("fused", "auto")
        if fused == "auto":
            # not under FSDP: the parameters are DTensors (fused AdamW is not checked with them)
            fused = self.device.type == "cuda" and not is_fsdp(self.trainer.strategy)
        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.get("lr", 1e-3),
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            eps=cfg.get("eps", 1e-8),
            fused=bool(fused),
        )
        total = cfg.get("total_steps") or self.trainer.max_steps
        if not total or total <= 0:
            raise ValueError("the LR schedule needs trainer.max_steps (or optim.total_steps) > 0")
        scheduler = cosine_with_warmup(
            optimizer, warmup_steps=cfg.get("warmup_steps", 0), total_steps=total,
            min_lr_ratio=cfg.get("min_lr_ratio", 0.0),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.accumulate = int(getattr(datamodule, "accumulate", 1))
        strategy = self.trainer.strategy
        needs_several_backwards = self.backward_per_width or self.accumulate > 1
        # FSDP2 (trainer=fsdp) handles several backward passes per step itself (backward_per_width,
        # accumulation): each reduce-scatters into the sharded gradients, which add up.
        # DDP syncs gradients inside backward; with several backward passes per step we turn that
        # off and all-reduce once per optimizer step instead.
        self._manual_grad_sync = (
            isinstance(strategy, DDPStrategy) and self.trainer.world_size > 1 and needs_several_backwards
        )
        self._grad_comm_dtype = torch.float32
        hook = getattr(strategy, "_ddp_comm_hook", None) if isinstance(strategy, DDPStrategy) else None
        if self._manual_grad_sync:
            self._grad_comm_dtype = manual_sync_dtype(hook)
        elif hook is not None and strategy.root_device.type != "cuda" and self.trainer.world_size > 1:
            # Lightning registers DDP comm hooks on CUDA only; gloo runs them as well, and a config
            # that names one should not be silently ignored on CPU.
            strategy.model.register_comm_hook(getattr(strategy, "_ddp_comm_state", None), hook)
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError("trainer.precision=16-mixed is not supported (gradient clipping needs unscaled "
                             "gradients in manual optimization); use bf16-mixed")
        if datamodule is not None and hasattr(self, "check_data_compat"):
            self.check_data_compat(datamodule)

    # ------------------------------------------------------------------ training
    def widths_for_step(self, step: int) -> list[int]:
        """Widths trained at optimizer step ``step``: all, or a seeded random subset (same on all ranks)."""
        k = self.widths_per_step
        if k is None or k == len(self.widths):
            return list(self.widths)
        rng = random.Random(self.hparams.seed * 1_000_003 + step)
        if self.distill_weight > 0:
            chosen = [self.full_width] + rng.sample(self.widths[1:], k - 1)
        else:
            chosen = rng.sample(self.widths, k)
        return sorted(chosen, reverse=True)

    def _disable_ddp_sync(self) -> None:
        """DDP: turn off the all-reduce inside backward when we all-reduce once per step ourselves."""
        model = self.trainer.strategy.model
        if self._manual_grad_sync and hasattr(model, "require_backward_grad_sync"):
            model.require_backward_grad_sync = False

    def width_loss(self, width: int, output: torch.Tensor, target: Any, teacher: torch.Tensor | None):
        loss = self.task_loss(output, target)
        if teacher is not None and width != self.full_width and self.distill_weight > 0:
            kd = self.distill_loss(output, teacher)
            loss = (1.0 - self.distill_weight) * loss + self.distill_weight * kd
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        inputs, target = self.split_batch(batch, training=True)
        widths = self.widths_for_step(self.global_step)
        scale = 1.0 / self.accumulate
        teacher = None
        total = 0.0
        for width in widths:
            output = self.train_forward(inputs, width)
            loss = self.width_loss(width, output, target, teacher)
            if width == self.full_width and self.distill_weight > 0:
                teacher = output.detach()
            weighted = loss * self.width_weights[width]
            self._step_losses[width] = self._step_losses.get(width, 0.0) + loss.detach().float() * scale
            if self.backward_per_width:
                self.manual_backward(weighted * scale)
            else:
                total = total + weighted
        if not self.backward_per_width:
            self.manual_backward(total * scale)

        if (batch_idx + 1) % self.accumulate:
            return
        if self._manual_grad_sync:
            self._all_reduce_gradients()
        grad_norm = self._clip_gradients(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        logs = {f"train/loss@{w}": v for w, v in self._step_losses.items()}
        logs["train/loss"] = sum(self.width_weights[w] * v for w, v in self._step_losses.items())
        logs["train/grad_norm"] = grad_norm
        self._step_losses = {}
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        self.log("loss", logs["train/loss"], on_step=True, on_epoch=False, prog_bar=True, logger=False)

    def _all_reduce_gradients(self) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        world = self.trainer.world_size
        # Coalesce into flat buffers of one dtype to keep the number of collectives small. With a
        # compressing DDP comm hook (trainer=ddp_bf16_grads) the sum travels in its dtype, divided
        # first, as the hook does inside DDP.
        for dtype in {g.dtype for g in grads}:
            group = [g for g in grads if g.dtype == dtype]
            flat = torch._utils._flatten_dense_tensors(group)
            wire = flat.div(world).to(self._grad_comm_dtype) if self._grad_comm_dtype != dtype else flat
            dist.all_reduce(wire)
            if wire is flat:
                flat.div_(world)
            else:
                flat.copy_(wire)
            for g, synced in zip(group, torch._utils._unflatten_dense_tensors(flat, group), strict=True):
                g.copy_(synced)

    def _clip_gradients(self, optimizer) -> torch.Tensor:
        """Clip to ``optim.grad_clip`` (if set) and return the total gradient norm before clipping."""
        max_norm = self.optim_cfg.get("grad_clip") or float("inf")
        params = [p for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not is_fsdp(self.trainer.strategy):
            return norm
        from torch.distributed.tensor import DTensor

        # FSDP2: DTensor gradients give a DTensor norm (of the whole model); log it as a tensor
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, target = self.split_batch(batch, training=False)
        for width in self.widths:
            output = self.forward_width(inputs, width)
            self.validation_update(width, output, target)

    def on_validation_epoch_end(self) -> None:
        logs: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {}
        for width in self.widths:
            values = {}
            for metric in self.val_metric_names():
                m = self.val_metrics[f"{metric}@{width}"]
                values[metric] = float(m.compute())  # synced across ranks
                m.reset()
            values.update(self.derived_val_metrics(width, values))
            for metric, value in values.items():
                logs[f"val/{metric}@{width}"] = value
                per_metric.setdefault(metric, []).append(value)
        for metric, vals in per_metric.items():  # width-averaged summaries (checkpointing, sweeps)
            logs[f"val/{metric}"] = sum(vals) / len(vals)
        # Values are already reduced over ranks, so every rank logs the same numbers.
        self.log_dict(logs, sync_dist=False, rank_zero_only=False)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        checkpoint["matmamba"] = {
            "model_name": self.hparams.name,
            "model_config": self.net.config.to_dict(),
            "model_type": self.task,
            "widths": list(self.widths),
            "data": datamodule.describe() if hasattr(datamodule, "describe") else None,
        }
        checkpoint["rng_states"] = self._gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            return
        rank = self._trainer.global_rank if self._trainer else 0
        world = self._trainer.world_size if self._trainer else 1
        if len(states) != world:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: not restoring them",
                        len(states), world)
            return
        # Applied at the first training batch: anything before it (sanity checks, setup) must not
        # shift the random streams of training.
        self._pending_rng = states[rank]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._disable_ddp_sync()
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        state = _get_rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            return states
        return [state]


def _get_rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values, so checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


class VisionClassificationModule(NestedWidthModule):
    """Image classification (digits, ImageNet) with nested widths.

    Args (besides the base ones):
        label_smoothing: label smoothing of the cross-entropy (folded into the soft targets
            when Mixup/CutMix is on).
        mixup: null, or timm ``Mixup`` arguments (``mixup_alpha``, ``cutmix_alpha``, ``prob``,
            ``switch_prob``, ``mode``); applied to each training batch.
        top_k: accuracies reported in validation, e.g. ``[1, 5]`` logs ``val/acc@w`` and
            ``val/acc5@w``.
    """

    task = "vision"

    def __init__(
        self,
        name: str,
        *,
        label_smoothing: float = 0.0,
        mixup: dict[str, Any] | None = None,
        top_k: Sequence[int] = (1,),
        **kwargs: Any,
    ) -> None:
        super().__init__(name, **kwargs)
        self._top_k = sorted({int(k) for k in top_k})
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        n_classes = self.net.config.n_classes
        if self._top_k[0] < 1 or self._top_k[-1] > n_classes:
            raise ValueError(f"model.top_k must lie in [1, n_classes={n_classes}], got {self._top_k}")
        self.label_smoothing = label_smoothing
        self.mixup_fn = None
        if mixup:
            from timm.data import Mixup

            self.mixup_fn = Mixup(**dict(mixup), label_smoothing=label_smoothing, num_classes=n_classes)

    def val_metric_names(self) -> list[str]:
        top_k = sorted({int(k) for k in self.hparams.top_k})
        return ["loss"] + ["acc" if k == 1 else f"acc{k}" for k in top_k]

    def check_data_compat(self, datamodule) -> None:
        c = self.net.config
        n = getattr(datamodule, "num_classes", None)
        if n is not None and n != c.n_classes:
            raise ValueError(f"the data has {n} classes but the model has n_classes={c.n_classes}; "
                             f"set model.overrides.n_classes={n}")
        size = getattr(datamodule, "image_size", None)
        if size is None:
            size = getattr(datamodule, "hparams", {}).get("image_size")
        if size is not None and size != c.image_size:
            raise ValueError(f"the data has image_size={size} but the model has image_size={c.image_size}; "
                             f"set model.overrides.image_size={size}")
        chans = getattr(datamodule, "in_chans", None)
        if chans is not None and chans != c.in_chans:
            raise ValueError(f"the data has {chans} channels but the model has in_chans={c.in_chans}; "
                             f"set model.overrides.in_chans={chans}")

    def split_batch(self, batch, training: bool):
        images, labels = batch
        if training and self.mixup_fn is not None:
            if images.shape[0] % 2:
                raise ValueError(f"Mixup/CutMix needs an even micro-batch size, got {images.shape[0]}")
            images, labels = self.mixup_fn(images, labels)
        return images, labels

    def forward_width(self, inputs, width):
        return self.net(inputs, width=width)

    def task_loss(self, logits, target):
        logits = logits.float()
        if target.dtype.is_floating_point:  # soft targets from Mixup/CutMix (smoothing included)
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def validation_update(self, width, logits, labels):
        logits = logits.float()
        n = labels.shape[0]
        self.val_metrics[f"loss@{width}"].update(F.cross_entropy(logits, labels), weight=n)
        top = logits.topk(self._top_k[-1], dim=-1).indices
        hits = top == labels[:, None]
        for k in self._top_k:
            name = "acc" if k == 1 else f"acc{k}"
            self.val_metrics[f"{name}@{width}"].update(hits[:, :k].any(dim=-1).float().mean(), weight=n)

    def items_in_batch(self, batch) -> int:
        return int(batch[0].shape[0])

    def flops_per_item(self, width: int) -> float:
        return float(self.net.flops_per_image(width))


class LanguageModelModule(NestedWidthModule):
    """Next-token language modelling with nested widths.

    Batches are ``(batch, seq_len + 1)`` token tensors. Validation reports loss (nats/token),
    perplexity and bits per byte (``loss / ln 2 / bytes_per_token``, using the data module's
    ``bytes_per_token`` when it knows it).

    Args (besides the base ones):
        head_chunk: compute the training step's LM head and cross-entropy ``head_chunk`` tokens
            at a time, recomputing each chunk's logits in the backward, so the (tokens x vocab)
            logits of the widths never exist at once (null: the plain head). Costs one more
            forward GEMM of the head. Not combinable with distillation (it needs the logits) or,
            for now, with ``compile``. Works under ``trainer=fsdp`` (gradients checked on CPU).
    """

    task = "lm"

    def __init__(self, name: str, *, head_chunk: int | None = None, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.bytes_per_token: float | None = None
        if head_chunk is not None and head_chunk <= 0:
            raise ValueError(f"model.head_chunk must be a positive number of tokens or null, got {head_chunk}")
        if head_chunk is not None and self.distill_weight > 0:
            raise ValueError("model.head_chunk cannot be combined with model.distill.weight > 0 "
                             "(distillation compares full logits); set one of them to null / 0")
        if head_chunk is not None and self.hparams.compile:
            raise ValueError("model.head_chunk is not supported with model.compile=true yet (the chunked "
                             "loss reads the backbone outside the compiled forward); set one of them off")
        self.head_chunk = head_chunk
        self.token_loss = lm_cross_entropy  # compiled in configure_model when model.compile is on

    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.compile and self.token_loss is lm_cross_entropy:
            # The losses sit outside the compiled network (the widths' losses are weighted and
            # summed in the training step). Compiled alone they run as fused reductions over the
            # 16-bit logits instead of fp32 copies, log-softmaxes and their gradients (H200,
            # lm_130m, 4 widths: the loss and ATen copy/elementwise kernels 205 -> 71 ms a step;
            # docs/training_performance.md, session 5). Default mode whatever model.compile says: CUDA graphs would pin
            # (tokens x vocab) buffers per shape.
            self.token_loss = torch.compile(lm_cross_entropy)
            if self.distill_weight > 0:
                self.distill_kl = torch.compile(distillation_kl)

    def check_data_compat(self, datamodule) -> None:
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > self.net.config.vocab_size:
            raise ValueError(f"the data's tokenizer has {vocab} tokens but the model's vocab_size is "
                             f"{self.net.config.vocab_size}; set model.overrides.vocab_size={vocab}")
        self.bytes_per_token = getattr(datamodule, "bytes_per_token", None)

    def on_validation_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.bytes_per_token is None and datamodule is not None:
            self.bytes_per_token = getattr(datamodule, "bytes_per_token", None)

    def split_batch(self, batch, training: bool):
        tokens = batch[0] if isinstance(batch, (list, tuple)) else batch
        return tokens[:, :-1], tokens[:, 1:]

    def forward_width(self, inputs, width):
        return self.net(inputs, width=width).logits

    def train_forward(self, inputs, width):
        if self.head_chunk is None:
            return self.forward_width(inputs, width)
        return LMHeadInput(self.net.hidden_states(inputs, width=width), self.net.lm_head.weight)

    def task_loss(self, output, target):
        if isinstance(output, LMHeadInput):
            return chunked_lm_cross_entropy(output, target, self.head_chunk)
        return self.token_loss(output, target)

    def validation_update(self, width, logits, target):
        loss = self.token_loss(logits, target)
        self.val_metrics[f"loss@{width}"].update(loss, weight=target.numel())

    def derived_val_metrics(self, width, values):
        loss = values["loss"]
        out = {"ppl": math.exp(min(loss, 50.0))}
        if self.bytes_per_token:
            out["bpb"] = loss / math.log(2) / self.bytes_per_token
        return out

    def items_in_batch(self, batch) -> int:
        tokens = batch[0] if isinstance(batch, (list, tuple)) else batch
        return int(tokens.shape[0] * (tokens.shape[1] - 1))

    def flops_per_item(self, width: int) -> float:
        return float(self.net.flops_per_token(width))
