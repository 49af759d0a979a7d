"""Load the model to sweep: a Lightning checkpoint (or a training run folder), a ``save_pretrained``
folder, or a published checkpoint folder (``config.json`` + weights in the published key layout).
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from matmamba.models import MatMamba2Vision, MatMambaLMHeadModel, load_weights_file
from matmamba.models.common import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, read_config_file

log = logging.getLogger(__name__)

MODEL_CLASSES = {"vision": MatMamba2Vision, "lm": MatMambaLMHeadModel}
# model_type in config.json -> task
MODEL_TYPES = {cls.model_type: task for task, cls in MODEL_CLASSES.items()}
# The attribute the Lightning modules keep the model in (``module.net``), and wrapper prefixes
# that torch.compile / FSDP / activation checkpointing put in front of parameter names.
MODULE_PREFIX = "net."
WRAPPER_PREFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not describe a MatMamba model."""


@dataclass
class LoadedModel:
    """A model ready to sweep, with what is known about how it was trained."""

    model: nn.Module
    task: str  # "vision" | "lm"
    source: str
    data: dict[str, Any] | None = None  # the data module description (``_target_`` + arguments)
    info: dict[str, Any] = field(default_factory=dict)


def task_of(model: nn.Module) -> str:
    for task, cls in MODEL_CLASSES.items():
        if isinstance(model, cls):
            return task
    raise TypeError(f"not a MatMamba model: {type(model).__name__}")


# --------------------------------------------------------------------------- Lightning checkpoints
def resolve_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file as given; for a folder (a run, or its ``checkpoints/``) the best checkpoint,
    else ``last.ckpt``."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"ckpt_path={path} does not exist")
    if (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} is a save_pretrained folder, not a Lightning checkpoint; "
                              f"evaluate it with pretrained={path}")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    others = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if others:
        return others[-1]
    raise CheckpointError(f"no checkpoint (*.ckpt) in {folder}; pass ckpt_path=<file.ckpt>")


def _numpy_globals() -> list[Any]:
    """The numpy types a Lightning checkpoint's RNG state pickles (allowed under weights_only)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in ("UInt32DType", "Float64DType", "Int64DType")
                    if hasattr(dtypes, name)]
    return allowed


def read_checkpoint(path: Path, trust: bool = False) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` (plus the numpy types of RNG states), turning every
    failure into a :class:`CheckpointError` that says what is wrong."""
    try:
        if trust:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_numpy_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        if "Unsupported global" in reason and not trust:
            raise CheckpointError(
                f"{path} holds pickled objects that are not plain tensors or containers ({reason}). "
                f"If you trust this file, pass trust_checkpoint=true") from None
        raise CheckpointError(f"cannot read checkpoint {path} ({reason}): the file is corrupt or truncated, "
                              f"or not a PyTorch checkpoint") from None
    except Exception as e:  # noqa: BLE001 - unpickling random bytes can raise nearly any type
        # (seen: IndexError, KeyError, struct.error, UnicodeDecodeError besides the usual ones)
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}). The file is "
                              f"corrupt or truncated, or not a PyTorch checkpoint") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' in it)")
    return checkpoint


def _model_from_hparams(checkpoint: dict[str, Any]) -> tuple[nn.Module, str, str]:
    """Build the model a checkpoint describes: from its ``matmamba`` record, else from the
    module's hyperparameters (registry name + overrides)."""
    from matmamba.models.registry import create_model, model_entry

    meta = checkpoint.get("matmamba")
    if meta:
        task = meta.get("model_type")
        if task not in MODEL_CLASSES:
            raise CheckpointError(f"checkpoint model_type {task!r} is not one of {sorted(MODEL_CLASSES)}")
        cls = MODEL_CLASSES[task]
        config = cls.config_class.from_dict(meta["model_config"])
        return cls(config), task, meta.get("model_name", "?")
    hparams = checkpoint.get("hyper_parameters") or {}
    name = hparams.get("name")
    if not name:
        raise CheckpointError("the checkpoint has neither a 'matmamba' record nor the module's "
                              "hyperparameters (name); it was not written by matmamba's training")
    overrides = dict(hparams.get("overrides") or {})
    if hparams.get("widths") is not None:
        overrides["widths"] = list(hparams["widths"])
    cls = model_entry(name)[0]
    return create_model(name, **overrides), task_of_class(cls), name


def task_of_class(cls: type) -> str:
    for task, candidate in MODEL_CLASSES.items():
        if issubclass(cls, candidate):
            return task
    raise CheckpointError(f"{cls.__name__} is not a MatMamba model class")


def model_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own entries of a LightningModule state dict (``net.`` prefix and wrappers removed)."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(MODULE_PREFIX):
            continue
        key = key[len(MODULE_PREFIX):]
        for wrapper in WRAPPER_PREFIXES:
            key = key.replace(wrapper, "")
        out[key] = value
    return out


def _run_data_config(ckpt: Path) -> dict[str, Any] | None:
    """The ``data`` node of the training run's saved Hydra config, if the checkpoint sits in a run."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        config = folder / ".hydra" / "config.yaml"
        if config.is_file():
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(config)
            if cfg.get("data") is not None:
                return OmegaConf.to_container(cfg.data, resolve=True)
    return None


def load_lightning_checkpoint(path: str | Path, trust: bool = False) -> LoadedModel:
    ckpt = resolve_checkpoint(path)
    log.info("loading Lightning checkpoint %s", ckpt)
    checkpoint = read_checkpoint(ckpt, trust=trust)
    model, task, name = _model_from_hparams(checkpoint)
    state = model_state_dict(checkpoint["state_dict"])
    if not state:
        raise CheckpointError(f"{ckpt}: no '{MODULE_PREFIX}*' weights in its state_dict; it is not a "
                              f"checkpoint of matmamba's Lightning modules")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: the weights do not fit the model it describes: {e}") from None
    meta = checkpoint.get("matmamba") or {}
    data = meta.get("data") or _run_data_config(ckpt)
    info = {"model_name": name, "global_step": checkpoint.get("global_step"), "checkpoint": str(ckpt)}
    return LoadedModel(model.eval(), task, str(ckpt), data=data, info=info)


# --------------------------------------------------------------------------- pretrained folders
def load_pretrained(path: str | Path, task: str | None = None) -> LoadedModel:
    """A ``save_pretrained`` folder or a published one. The class comes from ``model_type`` in
    ``config.json``; published configs have none, so ``task`` (from the data) decides."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise CheckpointError(f"pretrained={directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"pretrained={directory} is a file; expected a folder with {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}); for a Lightning .ckpt use ckpt_path=")
    try:
        config = read_config_file(directory)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    config_file = directory / CONFIG_NAME
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        found = MODEL_TYPES[model_type]
        if task is not None and task != found:
            raise CheckpointError(f"{directory} holds a {found} model but the data is {task} data")
        task = found
    elif task is None:
        raise CheckpointError(f"{config_file} does not say which model it is (model_type "
                              f"{model_type!r}); pass experiment=<name> or data=<name> so the data decides")
    cls = MODEL_CLASSES[task]
    try:
        model = cls(cls.config_class.from_dict(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file} does not describe a {cls.__name__}: {e}") from None
    try:
        weights = load_weights_file(directory)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: the weights do not fit {CONFIG_NAME}: {e}") from None
    return LoadedModel(model.eval(), task, str(directory), data=None,
                       info={"model_name": config.get("model_name", directory.name)})
