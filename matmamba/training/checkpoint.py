"""Checkpoint writing that never leaves a half-written file under a checkpoint's name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves local checkpoints to ``<name>.tmp`` in the same folder, fsyncs, then ``os.replace``s.

    A crash mid-write leaves the previous file of that name intact (and at worst a stray
    ``.tmp``). Remote (fsspec) paths go through Lightning's own transactional writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class NestedModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last`` checkpoint is always written at the end of training.

    Lightning saves ``last`` after validation; when ``max_steps`` is not a multiple of the
    validation interval the final steps would otherwise be lost to a resume.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run:  # a smoke test writes no checkpoints
            return
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
