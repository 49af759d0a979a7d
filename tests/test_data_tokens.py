"""Token shards: format, validation on read, the prepare script on local files, the data module."""

import json
import struct
import sys

import numpy as np
import pytest
import torch
from training_helpers import ROOT, make_text_jsonl, make_text_parquet, make_token_shards, one_thread

from matmamba.training.data.base import DataConfigError
from matmamba.training.data.tokens import (
    HEADER_BYTES,
    TokenShardDataModule,
    TokenShardError,
    TokenShardWindows,
    read_header,
    write_shard,
)

sys.path.insert(0, str(ROOT / "scripts"))
import prepare_fineweb  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_shard_round_trip_and_windows(tmp_path):
    tokens = np.arange(1000) % 300
    write_shard(tmp_path / "train_000000.bin", tokens, vocab_size=300)
    header = read_header(tmp_path / "train_000000.bin")
    assert header.num_tokens == 1000 and header.vocab_size == 300 and header.dtype == np.dtype("<u2")
    windows = TokenShardWindows([tmp_path / "train_000000.bin"], seq_len=100)
    assert len(windows) == 9  # (1000 - 1) // 100
    w = windows[3]
    assert w.dtype == torch.int64 and w.shape == (101,)
    assert torch.equal(w, torch.as_tensor(tokens[300:401], dtype=torch.int64))


def test_large_vocab_uses_uint32(tmp_path):
    write_shard(tmp_path / "s.bin", np.array([70000, 1, 2]), vocab_size=100_000)
    assert read_header(tmp_path / "s.bin").dtype == np.dtype("<u4")


def test_windows_do_not_cross_shards(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.zeros(25, dtype=np.int64), 256)
    write_shard(tmp_path / "train_000001.bin", np.ones(25, dtype=np.int64), 256)
    windows = TokenShardWindows(sorted(tmp_path.glob("train_*.bin")), seq_len=8)
    assert len(windows) == 6
    assert all(int(windows[i].max()) == 0 for i in range(3))
    assert all(int(windows[i].min()) == 1 for i in range(3, 6))


def test_corrupt_shards_give_clear_errors(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100), 256)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(TokenShardError, match="truncated or corrupt"):
        read_header(path)
    path.write_bytes(b"NOTTOKEN" + raw[8:])
    with pytest.raises(TokenShardError, match="magic"):
        read_header(path)
    path.write_bytes(raw[:8] + struct.pack("<I", 99) + raw[12:])
    with pytest.raises(TokenShardError, match="version 99"):
        read_header(path)
    path.write_bytes(raw[:12] + struct.pack("<I", 7) + raw[16:])
    with pytest.raises(TokenShardError, match="dtype code 7"):
        read_header(path)
    path.write_bytes(raw[: HEADER_BYTES // 2])
    with pytest.raises(TokenShardError, match="shorter than the header"):
        read_header(path)
    with pytest.raises(TokenShardError, match="vocab_size"):
        write_shard(tmp_path / "bad.bin", np.array([300]), vocab_size=256)


def test_prepare_script_on_parquet_writes_valid_shards(tmp_path):
    source = make_text_parquet(tmp_path / "docs.parquet", docs=50)
    out = tmp_path / "shards"
    meta = prepare_fineweb.main(["--data-files", str(source), "--tokenizer", "bytes", "--out", str(out),
                                 "--val-tokens", "500", "--shard-tokens", "1000"])
    import pyarrow.parquet as pq

    texts = pq.read_table(str(source)).column("text").to_pylist()
    total = sum(len(t.encode()) + 1 for t in texts)  # + one separator per document
    assert meta["splits"]["val"]["tokens"] == 500
    assert meta["splits"]["val"]["tokens"] + meta["splits"]["train"]["tokens"] == total
    assert meta["splits"]["val"]["documents"] + meta["splits"]["train"]["documents"] == 50
    assert json.loads((out / "meta.json").read_text()) == meta
    train = sorted(out.glob("train_*.bin"))
    assert len(train) == -(-(total - 500) // 1000)
    # The shards hold the documents, each preceded by the separator, in order.
    shards = sorted(out.glob("val_*.bin")) + train
    stream = np.concatenate([np.fromfile(p, dtype="<u2", offset=HEADER_BYTES) for p in shards])
    expected = np.concatenate([np.frombuffer(b"\0" + t.encode(), dtype=np.uint8) for t in texts])
    assert np.array_equal(stream, expected)


def test_prepare_script_on_jsonl_with_token_budget(tmp_path):
    source = make_text_jsonl(tmp_path / "docs.jsonl")
    meta = prepare_fineweb.main(["--data-files", str(source), "--tokenizer", "bytes", "--out", str(tmp_path / "o"),
                                 "--val-tokens", "100", "--max-tokens", "700"])
    assert meta["splits"]["val"]["tokens"] + meta["splits"]["train"]["tokens"] == 700


def test_prepare_script_refuses_to_overwrite_and_checks_columns(tmp_path):
    source = make_text_parquet(tmp_path / "docs.parquet", docs=10)
    out = tmp_path / "o"
    args = ["--data-files", str(source), "--tokenizer", "bytes", "--out", str(out), "--val-tokens", "50"]
    prepare_fineweb.main(args)
    with pytest.raises(SystemExit, match="--overwrite"):
        prepare_fineweb.main(args)
    with pytest.raises(SystemExit, match="no column 'body'"):
        prepare_fineweb.main(args + ["--overwrite", "--text-column", "body"])


def test_datamodule_reads_shards_and_splits_ranks(tmp_path):
    root = make_token_shards(tmp_path / "fw", val_tokens=1000, max_tokens=9000, shard_tokens=3000)
    dms = []
    for rank in range(2):
        dm = TokenShardDataModule(root=str(root), seq_len=32, batch_size=8, num_workers=0)
        dm.rank, dm.world_size = rank, 2
        dm.setup("fit")
        dms.append(dm)
    assert dms[0].micro_batch_size == 4 and dms[0].vocab_size == 256
    assert dms[0].bytes_per_token == pytest.approx(
        dms[0].meta["splits"]["val"]["bytes"] / dms[0].meta["splits"]["val"]["tokens"])
    batches = [next(iter(dm.train_dataloader())) for dm in dms]
    assert batches[0].shape == (4, 33) and batches[0].dtype == torch.int64
    rows = {tuple(r.tolist()) for b in batches for r in b}
    assert len(rows) == 8  # disjoint across ranks
    val = [sum(b.shape[0] for b in dm.val_dataloader()) for dm in dms]
    assert sum(val) == len(dms[0].val_set)


def test_missing_shards_name_the_prepare_command(tmp_path):
    dm = TokenShardDataModule(root=str(tmp_path / "nowhere"), batch_size=4,
                              prepare_args="--subset sample-10BT --tokenizer gpt2")
    with pytest.raises(DataConfigError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "python scripts/prepare_fineweb.py --subset sample-10BT --tokenizer gpt2 --out" in message
    assert str(tmp_path / "nowhere") in message
