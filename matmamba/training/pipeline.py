"""The training run behind ``train.py``: build everything from the config, fit, evaluate, report."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from matmamba.training.checkpoint import AtomicCheckpointIO
from matmamba.training.data import NestedDataModule
from matmamba.training.strategies import gather_full_model, is_fsdp
from matmamba.training.utils import (
    ConfigError,
    close_loggers,
    instantiate_callbacks,
    instantiate_loggers,
    print_config,
    report,
    resolve_precision,
    validate_config,
)

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build(cfg: DictConfig):
    """Instantiate (datamodule, module, trainer, loggers) from a composed config."""
    validate_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    log.info("data <%s>", cfg.data._target_)
    datamodule = _instantiate(cfg.data, "the data module")
    log.info("model <%s> %s", cfg.model._target_, cfg.model.name)
    module = _instantiate(cfg.model, f"the model {cfg.model.get('name')}", optim=_plain(cfg.optim))

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg.get("enable_progress_bar") is False:  # the switch wins over a configured bar
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision", "auto"), trainer_cfg.get("accelerator"))
    trainer: L.Trainer = instantiate(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], _convert_="all"
    )
    return datamodule, module, trainer, loggers


def _instantiate(node: DictConfig, what: str, **kwargs: Any):
    """Hydra instantiation whose errors name the part and keep the original message up front."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"could not build {what}: {cause}") from cause


def _checkpoint_paths(trainer: L.Trainer) -> dict[str, str | None]:
    cb = trainer.checkpoint_callback
    if cb is None:
        return {"best_ckpt": None, "last_ckpt": None}
    return {"best_ckpt": cb.best_model_path or None, "last_ckpt": cb.last_model_path or None}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (optionally resuming from ``ckpt_path``), validate every width, report.

    Returns the final metrics (a dict of floats, including ``val/<metric>@<width>``). Loggers are
    closed on success and on failure.
    """
    output_dir = cfg.paths.get("output_dir")
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.get("extras", {}).get("print_config"):
        print_config(cfg, output_dir)

    datamodule, module, trainer, loggers = build(cfg)
    status = "failed"
    try:
        if isinstance(datamodule, NestedDataModule) and cfg.get("train", True):
            # missing data, a batch that does not split: here, once (a validate-only run needs
            # only its validation split, which the data module's setup checks for that stage)
            datamodule.check_for(trainer)
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        started = time.perf_counter()
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        train_seconds = time.perf_counter() - started

        metrics: dict[str, Any] = {}
        if cfg.get("validate", True):
            ckpt = _final_checkpoint(cfg, trainer)
            log.info("final validation with %s", ckpt or "the current weights")
            trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

        extra = {
            "experiment": cfg.get("name"),
            "optimized_metric": cfg.get("optimized_metric"),
            "optimized_value": metrics.get(cfg.get("optimized_metric")),
            "global_step": trainer.global_step,
            "train_seconds": round(train_seconds, 2),
            **_checkpoint_paths(trainer),
        }
        export_dir = cfg.get("export_dir")
        if export_dir:
            # FSDP: every rank takes part in gathering the full weights onto rank 0
            net = gather_full_model(module.net) if is_fsdp(trainer.strategy) else module.net
            if trainer.is_global_zero:
                net.save_pretrained(export_dir)
                extra["export_dir"] = str(export_dir)
        if metrics:
            report(module, metrics, output_dir if trainer.is_global_zero else None, extra)
        status = "success"
        return metrics
    finally:
        close_loggers(loggers, status)


def _final_checkpoint(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """Which weights the final validation uses: ``final_eval=best`` (the best checkpoint, if
    any), ``last`` (the weights at the end of training), or, without training, ``ckpt_path``."""
    if not cfg.get("train", True):
        return cfg.get("ckpt_path")
    if cfg.get("final_eval", "best") == "best" and trainer.checkpoint_callback is not None:
        if trainer.checkpoint_callback.best_model_path:
            return "best"
    return None


def metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value sweepers optimise; a clear error if the run never logged it."""
    if not name:
        return None
    if name not in metrics:
        known = ", ".join(sorted(k for k in metrics if k.startswith("val/")))
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {known}")
    return float(metrics[name])
