"""ImageNet-1k (or any image classification set) from an ImageFolder tree or Hugging Face ``datasets``.

Training images go through timm's augmentation (RandomResizedCrop, horizontal flip, RandAugment,
RandomErasing); Mixup/CutMix and label smoothing act on the batch in the Lightning module.
Augmentation randomness is seeded per sample from its position in the training stream, so it is
the same whatever the number of workers and across a resume.
"""

from __future__ import annotations

import contextlib
import glob
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from matmamba.training.data.base import DataConfigError, NestedDataModule
from matmamba.training.data.sampling import StreamSampler

SOURCES = ("folder", "hf")


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Seed python, numpy and torch (CPU) RNGs inside the block and restore them after it."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class HFImageDataset(Dataset):
    """(PIL RGB image, int label) pairs from a Hugging Face dataset split."""

    def __init__(self, dataset, image_column: str, label_column: str) -> None:
        missing = {image_column, label_column} - set(dataset.column_names)
        if missing:
            raise DataConfigError(
                f"dataset has columns {dataset.column_names}; missing {sorted(missing)} "
                "(set data.image_column / data.label_column)"
            )
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        row = self.dataset[int(index)]
        return row[self.image_column].convert("RGB"), int(row[self.label_column])

    @property
    def num_classes(self) -> int:
        feature = self.dataset.features[self.label_column]
        if hasattr(feature, "num_classes"):
            return int(feature.num_classes)
        return int(max(self.dataset[self.label_column])) + 1


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image; keys ``(index, position)`` seed the augmentation."""

    def __init__(self, base: Dataset, transform, seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, position = key
            image, label = self.base[index]
            with seeded_rng(self.seed * 1_000_003 + position):
                return self.transform(image), label
        image, label = self.base[key]
        return self.transform(image), label


class ImageNetDataModule(NestedDataModule):
    """Image classification data with timm augmentation.

    Args:
        source: ``folder`` (``root/train/<class>/*`` and ``root/val/<class>/*``) or ``hf``.
        root: the ImageFolder root (source=folder).
        hf_name: a Hugging Face dataset name (source=hf), e.g. ``ILSVRC/imagenet-1k``, or null to
            read local files given by ``data_files``.
        data_files: for source=hf without a name: ``{train: [...], val: [...]}`` parquet files.
        train_split, val_split: split names of the HF dataset.
        image_size: training and evaluation resolution.
        auto_augment: timm RandAugment spec (null disables).
        re_prob, re_mode: RandomErasing probability and fill mode.
        crop_pct: evaluation center-crop fraction.
    """

    task = "vision"
    in_chans = 3

    def __init__(
        self,
        *,
        source: str = "folder",
        root: str | None = None,
        hf_name: str | None = None,
        hf_config: str | None = None,
        data_files: dict[str, Any] | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        image_column: str = "image",
        label_column: str = "label",
        cache_dir: str | None = None,
        image_size: int = 224,
        auto_augment: str | None = "rand-m9-mstd0.5",
        re_prob: float = 0.25,
        re_mode: str = "pixel",
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        batch_size: int = 4096,
        micro_batch_size: int | None = None,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool | str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
        )
        if source not in SOURCES:
            raise DataConfigError(f"data.source must be one of {SOURCES}, got {source!r}")
        if source == "folder" and not root:
            raise DataConfigError("data.root must point at an ImageFolder tree when data.source=folder")
        if source == "hf" and not (hf_name or data_files):
            raise DataConfigError("data.source=hf needs data.hf_name or data.data_files")
        self.num_classes: int | None = None

    # ---------------------------------------------------------------------------- sources
    def setup(self, stage: str | None = None) -> None:
        # Validation alone (eval.py, trainer.validate) needs only the val split: skip scanning or
        # loading the 1.28M training images. Fitting later still builds both.
        self._val_only = stage in ("validate", "test", "predict")
        super().setup(stage)

    def _splits(self) -> tuple[str, ...]:
        return ("val",) if getattr(self, "_val_only", False) else ("train", "val")

    def check_data(self) -> None:
        hp = self.hparams
        if hp.source == "folder":
            root = Path(hp.root)
            missing = [str(root / split) for split in self._splits() if not (root / split).is_dir()]
            if missing:
                raise DataConfigError(
                    f"ImageNet not found: {', '.join(missing)} missing. Expected an ImageFolder tree "
                    f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG (ILSVRC2012 with the "
                    "validation images sorted into class folders); pass its location as data.root=..., "
                    "or read it through Hugging Face with data.source=hf data.hf_name=ILSVRC/imagenet-1k "
                    "(after `huggingface-cli login` and accepting the dataset's terms)."
                )
        elif hp.data_files and not hp.hf_name:
            for split, files in dict(hp.data_files).items():
                for pattern in [files] if isinstance(files, str) else list(files):
                    if not glob.glob(str(pattern)):
                        raise DataConfigError(f"data.data_files.{split}: {pattern} does not exist")

    def prepare_data(self) -> None:
        self.check_data()
        if self.hparams.source == "hf":  # download (or build the cache) once, on one process
            self._load_hf(self.hparams.train_split)
            self._load_hf(self.hparams.val_split)

    def _load_hf(self, split: str):
        import datasets

        hp = self.hparams
        if hp.hf_name:
            return datasets.load_dataset(hp.hf_name, hp.hf_config, split=split, cache_dir=hp.cache_dir)
        files = dict(hp.data_files)
        if split not in files:
            raise DataConfigError(f"data.data_files has no '{split}' entry (has {sorted(files)})")
        fmt = "parquet" if str(_first(files[split])).endswith(".parquet") else "imagefolder"
        return datasets.load_dataset(fmt, data_files={split: files[split]}, split=split, cache_dir=hp.cache_dir)

    def _base_datasets(self):
        """(train or None when validating only, val, number of classes)."""
        hp = self.hparams
        val_only = self._splits() == ("val",)
        if hp.source == "folder":
            from torchvision.datasets import ImageFolder

            val = ImageFolder(str(Path(hp.root) / "val"))
            if val_only:
                return None, val, len(val.classes)
            train = ImageFolder(str(Path(hp.root) / "train"))
            if train.classes != val.classes:
                raise DataConfigError(f"{hp.root}: train and val class folders differ")
            return train, val, len(train.classes)
        val = HFImageDataset(self._load_hf(hp.val_split), hp.image_column, hp.label_column)
        if val_only:
            return None, val, val.num_classes
        train = HFImageDataset(self._load_hf(hp.train_split), hp.image_column, hp.label_column)
        return train, val, train.num_classes

    # ---------------------------------------------------------------------------- transforms
    def train_transform(self):
        from timm.data import create_transform

        hp = self.hparams
        return create_transform(
            hp.image_size,
            is_training=True,
            scale=tuple(hp.scale),
            hflip=hp.hflip,
            auto_augment=hp.auto_augment,
            interpolation=hp.interpolation,
            re_prob=hp.re_prob,
            re_mode=hp.re_mode,
            mean=tuple(hp.mean),
            std=tuple(hp.std),
        )

    def val_transform(self):
        from timm.data import create_transform

        hp = self.hparams
        return create_transform(
            hp.image_size,
            is_training=False,
            interpolation=hp.interpolation,
            crop_pct=hp.crop_pct,
            mean=tuple(hp.mean),
            std=tuple(hp.std),
        )

    def build_datasets(self) -> None:
        train, val, self.num_classes = self._base_datasets()
        if train is not None:
            self.train_set = TransformedDataset(train, self.train_transform(), self.hparams.seed)
        self.val_set = TransformedDataset(val, self.val_transform(), self.hparams.seed)

    def train_sampler(self) -> StreamSampler:
        sampler = super().train_sampler()
        sampler.with_position = True
        return sampler


def _first(files):
    return files if isinstance(files, str) else list(files)[0]
