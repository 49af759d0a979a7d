"""Helpers of the training entry point: config checks, instantiation, logging, reporting."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "64-true", "64")


class ConfigError(ValueError):
    """The composed config is invalid; the message lists every problem found."""


# --------------------------------------------------------------------------------- validation
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# torch.compile's modes, accepted by name as model.compile (true/false: compile with the default
# mode, or not at all). reduce-overhead also captures CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(setting: bool | str | None) -> str | None:
    """``model.compile`` -> the ``mode`` passed to torch.compile (None: its default)."""
    if setting is None or isinstance(setting, bool):
        return None
    if setting not in COMPILE_MODES:
        raise ValueError(f"model.compile must be true, false or a torch.compile mode ({', '.join(COMPILE_MODES)}), "
                         f"got {setting!r}")
    return setting


def validate_config(cfg: DictConfig) -> None:
    """Check the settings that can be checked before anything is built; raise one ConfigError
    listing every problem with what is valid. (Model-dependent checks, such as which widths a
    model has, run when the module is built.)"""
    problems: list[str] = []
    for key in ("data", "model", "trainer", "optim"):
        if cfg.get(key) is None:
            problems.append(f"'{key}' is missing: pick one with {key}=<name> (see conf/{key}/)")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))

    data_cls = model_cls = None
    for key in ("data", "model"):
        target = cfg[key].get("_target_")
        try:
            cls = get_class(target)
        except Exception as e:  # noqa: BLE001 - report any import problem as a config error
            problems.append(f"{key}._target_={target!r} cannot be imported ({e})")
            continue
        data_cls, model_cls = (cls, model_cls) if key == "data" else (data_cls, cls)
    if data_cls is not None and model_cls is not None:
        dt, mt = getattr(data_cls, "task", None), getattr(model_cls, "task", None)
        if dt and mt and dt != mt:
            problems.append(
                f"data '{data_cls.__name__}' is {dt} data but model '{model_cls.__name__}' trains a {mt} "
                "model; choose a matching pair (or an experiment=...)"
            )

    trainer = cfg.trainer
    max_steps = trainer.get("max_steps", -1)
    if not _is_int(max_steps) or max_steps <= 0:
        problems.append(f"trainer.max_steps must be a positive integer (training is counted in steps), got {max_steps}")
    precision = str(trainer.get("precision", "auto"))
    if precision not in PRECISIONS:
        problems.append(f"trainer.precision={precision!r} is not supported; valid: {', '.join(PRECISIONS)}")

    model = cfg.model
    widths = model.get("widths")
    if widths is not None:
        if not isinstance(widths, (list, ListConfig)) or not widths or not all(_is_int(w) and w > 0 for w in widths):
            problems.append(f"model.widths must be null or a non-empty list of positive integers, got {widths}")
        elif len(set(widths)) != len(widths):
            problems.append(f"model.widths has duplicates: {list(widths)}")
    weights = model.get("width_weights")
    if weights is not None:
        if not isinstance(weights, (list, ListConfig)) or not all(_is_num(x) and x >= 0 for x in weights):
            problems.append(f"model.width_weights must be null or a list of numbers >= 0, got {weights}")
        elif widths is not None and len(weights) != len(widths):
            problems.append(f"model.width_weights has {len(weights)} entries for {len(widths)} widths {list(widths)}")
    k = model.get("widths_per_step")
    if k is not None and (not _is_int(k) or k < 1 or (widths is not None and k > len(widths))):
        problems.append(f"model.widths_per_step must be null or an integer in [1, number of widths], got {k}")
    try:
        compile_mode(model.get("compile", False))
    except ValueError as e:
        problems.append(str(e))
    distill = model.get("distill") or {}
    weight = distill.get("weight", 0.0)
    if not _is_num(weight) or not 0 <= weight <= 1:
        problems.append(f"model.distill.weight must be in [0, 1], got {weight}")
    temperature = distill.get("temperature", 1.0)
    if not _is_num(temperature) or temperature <= 0:
        problems.append(f"model.distill.temperature must be > 0, got {temperature}")

    optim = cfg.optim
    lr = optim.get("lr")
    if not _is_num(lr) or lr <= 0:
        problems.append(f"optim.lr must be a positive number, got {lr}")
    wd = optim.get("weight_decay", 0.0)
    if not _is_num(wd) or wd < 0:
        problems.append(f"optim.weight_decay must be >= 0, got {wd}")
    betas = optim.get("betas", [0.9, 0.999])
    if len(betas) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in betas):
        problems.append(f"optim.betas must be two numbers in [0, 1), got {list(betas)}")
    warmup = optim.get("warmup_steps", 0)
    total = optim.get("total_steps") or max_steps
    if not _is_int(warmup) or warmup < 0:
        problems.append(f"optim.warmup_steps must be an integer >= 0, got {warmup}")
    elif _is_int(total) and total > 0 and warmup >= total:
        problems.append(f"optim.warmup_steps={warmup} must be below the schedule's {total} steps")
    ratio = optim.get("min_lr_ratio", 0.0)
    if not _is_num(ratio) or not 0 <= ratio <= 1:
        problems.append(f"optim.min_lr_ratio must be in [0, 1], got {ratio}")
    clip = optim.get("grad_clip")
    if clip is not None and (not _is_num(clip) or clip <= 0):
        problems.append(f"optim.grad_clip must be null or > 0, got {clip}")

    batch = cfg.data.get("batch_size")
    if not _is_int(batch) or batch <= 0:
        problems.append(f"data.batch_size must be a positive integer, got {batch}")

    metric = cfg.get("optimized_metric")
    if metric is not None and not str(metric).startswith(("val/", "train/")):
        problems.append(f"optimized_metric must name a logged metric such as val/loss or val/acc@128, got {metric!r}")
    mode = cfg.get("optimized_mode", "min")
    if mode not in ("min", "max"):
        problems.append(f"optimized_mode must be 'min' or 'max', got {mode!r}")

    ckpt = cfg.get("ckpt_path")
    # a file, or the folder of a sharded checkpoint (trainer=fsdp with state_dict_type=sharded)
    if ckpt is not None and "://" not in str(ckpt) and not Path(ckpt).exists():
        problems.append(f"ckpt_path={ckpt} does not exist")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def resolve_precision(precision: Any, accelerator: Any) -> str:
    """``auto``: bf16 mixed precision on a CUDA GPU that supports it, float32 otherwise."""
    precision = str(precision)
    if precision != "auto":
        return precision
    wants_gpu = str(accelerator) in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


# --------------------------------------------------------------------------------- instantiation
def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    for name, conf in (cfg or {}).items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("callback %s: <%s>", name, conf._target_)
            callbacks.append(instantiate(conf, _convert_="all"))
    return callbacks


def wandb_logged_in() -> bool:
    """Whether W&B has an API key here (environment, or netrc for the configured host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _multirun_name() -> str | None:
    """The sweep folder's name when running under ``-m`` (multirun), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir).name


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    loggers: list[Logger] = []
    for name, conf in (cfg or {}).items():
        if not (isinstance(conf, DictConfig) and "_target_" in conf):
            continue
        if conf._target_.endswith("WandbLogger"):
            sweep = _multirun_name()
            if sweep and conf.get("group"):  # the jobs of one multirun form a group of their own
                conf = OmegaConf.merge(conf, {"group": f"{conf.group}-{sweep}"})
            mode = os.environ.get("WANDB_MODE", "")
            if not conf.get("offline") and mode not in ("offline", "disabled", "dryrun") and not wandb_logged_in():
                log.warning("W&B: no login found (WANDB_API_KEY or `wandb login`); logging offline to %s. "
                            "Upload later with `wandb sync <run dir>`.", conf.get("save_dir"))
                conf = OmegaConf.merge(conf, {"offline": True})
        log.info("logger %s: <%s>", name, conf._target_)
        loggers.append(instantiate(conf, _convert_="all"))
    return loggers


def close_loggers(loggers: list[Logger], status: str) -> None:
    """Finalize every logger (flushes files, ends W&B runs) even after a failure."""
    for logger in loggers:
        try:
            logger.finalize(status)
        except Exception as e:  # noqa: BLE001 - closing must not mask the original error
            log.warning("closing logger %s failed: %s", type(logger).__name__, e)
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=0 if status == "success" else 1)
    except ImportError:
        pass


# --------------------------------------------------------------------------------- reporting
@rank_zero_only
def print_config(cfg: DictConfig, save_dir: str | None = None) -> None:
    """Print the composed config as a rich tree (and save it next to the run)."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim")
    order = ["data", "model", "optim", "trainer", "callbacks", "logger", "paths"]
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order and k != "hydra"]
    for key in keys:
        branch = tree.add(key, style="bold")
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_dir:
        with open(Path(save_dir) / "config_tree.log", "w") as f:
            rich.print(tree, file=f)


def width_metrics(metrics: dict[str, Any], widths: list[int]) -> dict[int, dict[str, float]]:
    """``{"val/acc@128": x, ...}`` -> ``{128: {"acc": x, ...}}`` for the given widths."""
    table: dict[int, dict[str, float]] = {w: {} for w in widths}
    for key, value in metrics.items():
        if not key.startswith("val/") or "@" not in key:
            continue
        name, _, width = key[len("val/"):].partition("@")
        if width.isdigit() and int(width) in table:
            table[int(width)][name] = float(value)
    return table


@rank_zero_only
def report(
    module, metrics: dict[str, Any], output_dir: str | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """Print the per-width table of final validation metrics and write ``metrics.json``."""
    import rich
    from rich.table import Table

    per_width = width_metrics(metrics, module.widths)
    names = sorted({n for row in per_width.values() for n in row}, key=lambda n: (n != "loss", n))
    table = Table(title=f"final validation per width ({module.hparams.name})")
    table.add_column("width", justify="right")
    table.add_column("params", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for width, row in per_width.items():
        params = module.net.num_params(width)
        table.add_row(str(width), f"{params / 1e6:.2f}M", *[f"{row[n]:.4f}" if n in row else "-" for n in names])
    rich.print(table)

    summary = {k: float(v) for k, v in metrics.items() if k.startswith("val/") and "@" not in k}
    result = {
        "model": module.hparams.name,
        "task": module.task,
        "widths": list(module.widths),
        "per_width": {str(w): row for w, row in per_width.items()},
        "summary": summary,
        **extra,
    }
    if output_dir:
        path = Path(output_dir) / "metrics.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", path)
    return result
