"""ImageNet-style data: a generated JPEG ImageFolder tree and a generated parquet read through
Hugging Face datasets, with timm augmentation."""

import pytest
import torch
from training_helpers import make_image_folder, make_image_parquet, one_thread

from matmamba.training.data import DataConfigError, ImageNetDataModule


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def dm_for(**kwargs):
    base = dict(image_size=32, batch_size=4, num_workers=0, pin_memory=False, seed=0)
    return ImageNetDataModule(**{**base, **kwargs})


def test_image_folder_batches(tmp_path):
    root = make_image_folder(tmp_path / "imnet", classes=3, per_class=4)
    dm = dm_for(source="folder", root=str(root))
    dm.setup("fit")
    assert dm.num_classes == 3 and len(dm.train_set) == 12 and len(dm.val_set) == 6
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and int(labels.max()) < 3
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 32, 32)


def test_augmentation_depends_only_on_stream_position(tmp_path):
    root = make_image_folder(tmp_path / "imnet", classes=2, per_class=4)
    dm = dm_for(source="folder", root=str(root), batch_size=2)
    dm.setup("fit")
    ds = dm.train_set
    a = ds[(3, 17)][0]
    torch.manual_seed(123)  # global RNG state must not matter ...
    b = ds[(3, 17)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(3, 18)][0])  # ... but the position does
    state = torch.get_rng_state()
    ds[(1, 5)]
    assert torch.equal(state, torch.get_rng_state())  # and the global RNG is left untouched
    # Same batches with and without workers.
    plain = next(iter(dm.train_dataloader()))[0]
    dm_workers = dm_for(source="folder", root=str(root), batch_size=2, num_workers=2)
    dm_workers.setup("fit")
    assert torch.equal(plain, next(iter(dm_workers.train_dataloader()))[0])


def test_hf_parquet_source(tmp_path):
    files = make_image_parquet(tmp_path / "pq", classes=3, per_class=4)
    dm = dm_for(source="hf", data_files={"train": files["train"], "validation": files["validation"]})
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 3 and len(dm.train_set) == 12
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {0, 1, 2}


def test_missing_imagenet_explains_the_layout(tmp_path):
    dm = dm_for(source="folder", root=str(tmp_path / "absent"))
    with pytest.raises(DataConfigError, match=r"absent/train/<class>/\*\.JPEG.*data\.source=hf"):
        dm.setup("fit")
    with pytest.raises(DataConfigError, match="data.source must be one of"):
        dm_for(source="s3")
    with pytest.raises(DataConfigError, match="does not exist"):
        dm_for(source="hf", data_files={"train": str(tmp_path / "x.parquet")}).setup("fit")


def test_validation_alone_reads_only_the_val_split(tmp_path):
    import shutil

    root = make_image_folder(tmp_path / "imnet", classes=3, per_class=4)
    shutil.rmtree(root / "train")  # evaluation must not need (or scan) the training images
    dm = dm_for(source="folder", root=str(root))
    dm.setup("validate")
    assert dm.train_set is None and dm.num_classes == 3 and len(dm.val_set) == 6
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 32, 32)
    with pytest.raises(DataConfigError, match="train missing"):
        dm_for(source="folder", root=str(root)).setup("fit")
