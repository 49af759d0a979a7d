"""Common base of the data modules: batch layout, rank-aware loaders, resumable position."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from matmamba.training.data.sampling import ShardSampler, StreamSampler

log = logging.getLogger(__name__)


class DataConfigError(ValueError):
    """A data setting is invalid or the data it points at is missing."""


class NestedDataModule(L.LightningDataModule):
    """Base of the MatMamba data modules.

    ``batch_size`` is the global batch of one optimizer step (all devices, all micro-batches),
    as the published recipes state it. Each device loads ``micro_batch_size`` samples at a time
    (default ``batch_size / world_size``) and the module accumulates
    ``accumulate = batch_size / (micro_batch_size * world_size)`` micro-batches per step.

    The training loader is an endless stream (see :class:`StreamSampler`); training length is
    set by ``trainer.max_steps``. The data position is saved in every checkpoint through
    :meth:`state_dict` and restored before the loader is built, so resuming is exact.

    Subclasses set ``task`` and implement :meth:`build_datasets`, which assigns
    ``self.train_set`` and ``self.val_set``.
    """

    task: ClassVar[str] = ""

    def __init__(
        self,
        *,
        batch_size: int,
        micro_batch_size: int | None = None,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if batch_size <= 0:
            raise DataConfigError(f"data.batch_size must be a positive integer, got {batch_size}")
        if micro_batch_size is not None and micro_batch_size <= 0:
            raise DataConfigError(f"data.micro_batch_size must be positive or null, got {micro_batch_size}")
        if num_workers < 0:
            raise DataConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.rank, self.world_size = 0, 1
        self.micro_batch_size = micro_batch_size or batch_size
        self.accumulate = 1
        # Resume bookkeeping: samples consumed (all ranks) and train batches processed at resume.
        self._resumed_samples = 0
        self._resumed_batches = 0

    # ----------------------------------------------------------------------------- layout
    def check_data(self) -> None:
        """Raise :class:`DataConfigError` with the command that prepares the data if it is missing."""

    def build_datasets(self) -> None:
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.check_data()

    def check_for(self, trainer: L.Trainer) -> None:
        """Raise :class:`DataConfigError` for anything :meth:`setup` would reject under ``trainer``:
        the sampler setting, a batch that does not split over its devices, missing data.

        The training entry point calls this before ``fit``, in the launching process: inside
        ``fit`` the strategy has already started the other ranks, and one clear message would
        come out once a rank, or be buried under the others' failed collectives."""
        self._check_sampler(trainer)
        self._batch_layout(trainer.world_size)
        self.check_data()

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if trainer is not None:
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
            self._check_sampler(trainer)
        self.micro_batch_size, self.accumulate = self._batch_layout(self.world_size)
        if self.train_set is None or self.val_set is None:
            self.check_data()
            self.build_datasets()

    @staticmethod
    def _check_sampler(trainer: L.Trainer) -> None:
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise DataConfigError(
                "trainer.use_distributed_sampler must be false: MatMamba's data modules split the "
                "data across ranks themselves (set it in the trainer config)"
            )

    def _batch_layout(self, world: int) -> tuple[int, int]:
        """(micro-batch per device, micro-batches accumulated per step) over ``world`` devices."""
        batch = self.hparams.batch_size
        micro = self.hparams.micro_batch_size
        if micro is None:
            if batch % world:
                raise DataConfigError(
                    f"data.batch_size={batch} is not divisible by the {world} devices; "
                    "pick a multiple or set data.micro_batch_size"
                )
            micro = batch // world
        if batch % (micro * world):
            raise DataConfigError(
                f"data.batch_size={batch} must be a multiple of data.micro_batch_size * devices "
                f"= {micro} * {world} = {micro * world}"
            )
        return micro, batch // (micro * world)

    # ----------------------------------------------------------------------------- loaders
    @property
    def _pin_memory(self) -> bool:
        pin = self.hparams.pin_memory
        return torch.cuda.is_available() if pin == "auto" else bool(pin)

    def collate_fn(self):
        return None

    def train_sampler(self) -> StreamSampler:
        return StreamSampler(
            len(self.train_set),
            shuffle=True,
            seed=self.hparams.seed,
            rank=self.rank,
            world_size=self.world_size,
            start=self._resumed_samples // self.world_size,
        )

    def train_dataloader(self) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.train_set,
            batch_size=self.micro_batch_size,
            sampler=self.train_sampler(),
            num_workers=workers,
            pin_memory=self._pin_memory,
            persistent_workers=workers > 0,
            collate_fn=self.collate_fn(),
            # The loader's own generator: creating an iterator then draws no global RNG, so
            # validation in between steps does not change the training randomness.
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def val_dataloader(self) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.val_set,
            batch_size=self.hparams.val_batch_size or self.micro_batch_size,
            sampler=ShardSampler(len(self.val_set), rank=self.rank, world_size=self.world_size),
            num_workers=workers,
            pin_memory=self._pin_memory,
            persistent_workers=workers > 0,
            collate_fn=self.collate_fn(),
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    # ----------------------------------------------------------------------------- resume
    def _processed_batches(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return self._resumed_batches
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def consumed_samples(self) -> int:
        """Training samples consumed so far by all ranks together."""
        new_batches = self._processed_batches() - self._resumed_batches
        return self._resumed_samples + new_batches * self.micro_batch_size * self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "samples": self.consumed_samples(),
            "batches": self._processed_batches(),
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "seed": self.hparams.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_samples = int(state["samples"])
        self._resumed_batches = int(state["batches"])
        if state.get("seed") != self.hparams.seed:
            log.warning(
                "Resuming with data.seed=%s but the checkpoint used %s: the data order changes",
                self.hparams.seed,
                state.get("seed"),
            )
        if self._resumed_samples % self.world_size:
            log.warning(
                "Resuming on %d devices from a position (%d samples) that does not split evenly; "
                "ranks start at the nearest earlier sample",
                self.world_size,
                self._resumed_samples,
            )

    # ----------------------------------------------------------------------------- metadata
    def describe(self) -> dict[str, Any]:
        """This data module as a plain dict that ``hydra.utils.instantiate`` rebuilds (stored in
        checkpoints for evaluation)."""
        cls = type(self)
        hparams = {k: _plain(v) for k, v in self.hparams.items()}
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **hparams}


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
