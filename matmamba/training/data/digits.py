"""scikit-learn's bundled handwritten digits: 1,797 grayscale 8x8 images, 10 classes, no download."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from matmamba.training.data.base import DataConfigError, NestedDataModule


def load_digits_split(val_fraction: float, split_seed: int):
    """Stratified train/val split of the digits, scaled to [0, 1] and standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        images, labels, test_size=val_fraction, stratify=labels, random_state=split_seed
    )
    mean, std = x_train.mean(), x_train.std()
    x_train = (x_train - mean) / std
    x_val = (x_val - mean) / std
    return (x_train, y_train), (x_val, y_val)


class DigitsDataModule(NestedDataModule):
    """Digits as (1, 8, 8) float images and integer labels.

    Args:
        val_fraction: share of the 1,797 images held out for validation (stratified).
        split_seed: seed of the train/val split, kept apart from the run seed so that every run
            is measured on the same validation images.
    """

    task = "vision"
    num_classes = 10
    image_size = 8
    in_chans = 1

    def __init__(
        self,
        *,
        batch_size: int = 64,
        micro_batch_size: int | None = None,
        val_batch_size: int | None = 256,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        seed: int = 0,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
        )
        if not 0.0 < val_fraction < 1.0:
            raise DataConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")

    def build_datasets(self) -> None:
        (x_train, y_train), (x_val, y_val) = load_digits_split(
            self.hparams.val_fraction, self.hparams.split_seed
        )
        self.train_set = TensorDataset(torch.from_numpy(x_train[:, None]), torch.from_numpy(y_train))
        self.val_set = TensorDataset(torch.from_numpy(x_val[:, None]), torch.from_numpy(y_val))
