"""The validation data of a sweep, built with the training data modules (``matmamba.training.data``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64


class DataError(ValueError):
    """The sweep's data cannot be found, built, or does not fit the model."""


def data_description(cfg_data: Mapping[str, Any] | None, stored: Mapping[str, Any] | None,
                     source: str = "the checkpoint") -> dict[str, Any]:
    """Which data module to build.

    ``cfg_data`` (the eval config's ``data``) wins when it names a ``_target_`` (``experiment=``
    or ``data=``); otherwise its keys override the description stored with the checkpoint.
    """
    cfg_data = dict(cfg_data or {})
    if cfg_data.get("_target_"):
        return cfg_data
    if not stored:
        raise DataError(f"which data? {source} does not record it; pass experiment=<name> (a recipe, "
                        f"conf/experiment/) or data=<name> (conf/data/)")
    description = {**stored, **cfg_data}
    description.pop("task", None)  # recorded for information; not a constructor argument
    return description


def build_datamodule(description: Mapping[str, Any], batch_size: int | None = None):
    """Instantiate and set up the data module for validation, at ``batch_size`` per forward."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    description = dict(description)
    description["val_batch_size"] = batch_size or description.get("val_batch_size") or DEFAULT_BATCH_SIZE
    try:
        datamodule = instantiate(description, _convert_="all")
    except InstantiationException as e:
        raise DataError(f"cannot build the data module {description.get('_target_')}: {e}") from None
    datamodule.setup("validate")
    return datamodule


def check_compatible(datamodule, model: nn.Module, task: str) -> None:
    """Fail early, naming both sides, when the data cannot feed the model."""
    data_task = getattr(datamodule, "task", None)
    if data_task and data_task != task:
        raise DataError(f"{type(datamodule).__name__} is {data_task} data but the model is a {task} model; "
                        f"pick the recipe's data with experiment=<name>")
    c = model.config
    if task == "vision":
        n = getattr(datamodule, "num_classes", None)
        if n is not None and n != c.n_classes:
            raise DataError(f"the data has {n} classes but the model has n_classes={c.n_classes}")
        size = getattr(datamodule, "image_size", None) or getattr(datamodule, "hparams", {}).get("image_size")
        if size is not None and size != c.image_size:
            raise DataError(f"the data has image_size={size} but the model takes image_size={c.image_size}")
        chans = getattr(datamodule, "in_chans", None)
        if chans is not None and chans != c.in_chans:
            raise DataError(f"the data has {chans} channels but the model takes in_chans={c.in_chans}")
    else:
        vocab = getattr(datamodule, "vocab_size", None)
        if vocab is not None and vocab > c.vocab_size:
            raise DataError(f"the data's tokenizer has {vocab} tokens but the model's vocab_size is {c.vocab_size}")


def validation_loader(datamodule) -> DataLoader:
    loader = datamodule.val_dataloader()
    if len(loader) == 0:
        raise DataError(f"{type(datamodule).__name__} has an empty validation set")
    return loader
