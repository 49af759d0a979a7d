"""The bundled data sets: scikit-learn digits and the pydoc text."""

import pytest
import torch
from training_helpers import one_thread

from matmamba.training.data import DigitsDataModule, PydocDataModule
from matmamba.training.data.pydoc_text import ByteTokenizer, pydoc_text


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_digits_split_shapes_and_stratification():
    dm = DigitsDataModule(batch_size=32, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert abs(len(dm.val_set) - 0.2 * 1797) <= 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    val_labels = torch.stack([dm.val_set[i][1] for i in range(len(dm.val_set))])
    counts = torch.bincount(val_labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # every class ~20% held out
    # standardised with the training statistics
    train_x = dm.train_set.tensors[0]
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-3


def test_digits_validation_split_is_fixed_across_run_seeds():
    a, b = DigitsDataModule(batch_size=8, seed=1), DigitsDataModule(batch_size=8, seed=2)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert not torch.equal(next(iter(a.train_dataloader()))[0], next(iter(b.train_dataloader()))[0])


def test_pydoc_bytes_windows():
    text = pydoc_text()
    assert len(text.encode()) > 400_000
    assert ByteTokenizer().decode(ByteTokenizer().encode("héllo")) == "héllo"
    dm = PydocDataModule(batch_size=4, seq_len=64, val_fraction=0.1)
    dm.setup("fit")
    tokens = next(iter(dm.train_dataloader()))
    assert tokens.shape == (4, 65) and tokens.dtype == torch.int64 and int(tokens.max()) < 256
    data = text.encode()
    split = int(len(data) * 0.9)
    assert len(dm.val_set) == (len(data) - split - 1) // 64
    assert bytes(dm.val_set[0].tolist()) == data[split : split + 65]


def test_batch_layout_and_accumulation():
    dm = DigitsDataModule(batch_size=64, micro_batch_size=16)
    dm.setup("fit")
    assert dm.micro_batch_size == 16 and dm.accumulate == 4
    bad = DigitsDataModule(batch_size=60, micro_batch_size=16)
    try:
        bad.setup("fit")
    except ValueError as e:
        assert "multiple of data.micro_batch_size" in str(e)
    else:
        raise AssertionError("a batch size that does not split into micro-batches must fail")


def test_state_dict_restores_the_position():
    dm = PydocDataModule(batch_size=4, seq_len=32)
    dm.setup("fit")
    stream = iter(dm.train_dataloader())
    batches = [next(stream) for _ in range(5)]
    resumed = PydocDataModule(batch_size=4, seq_len=32)
    resumed.setup("fit")
    resumed.load_state_dict({"samples": 12, "batches": 3, "micro_batch_size": 4, "world_size": 1, "seed": 0})
    assert resumed.consumed_samples() == 12
    again = iter(resumed.train_dataloader())
    assert torch.equal(next(again), batches[3]) and torch.equal(next(again), batches[4])
