"""Binary token shards: the on-disk format of tokenized corpora, and the data module reading them.

A shard is a 64-byte little-endian header followed by the tokens::

    offset  size  field
    0       8     magic  b"MMTOKENS"
    8       4     format version (uint32, currently 1)
    12      4     dtype code (uint32: 1 = uint16, 2 = uint32)
    16      8     number of tokens (uint64)
    24      4     vocabulary size (uint32)
    28      36    zero padding

A prepared corpus is a folder with ``train_XXXXXX.bin`` and ``val_XXXXXX.bin`` shards and a
``meta.json`` describing the tokenizer and the byte counts (``scripts/prepare_fineweb.py``
writes both). Readers validate every header and the file size before memory-mapping.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from matmamba.training.data.base import DataConfigError, NestedDataModule

MAGIC = b"MMTOKENS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQI")
DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
META_FILE = "meta.json"


class TokenShardError(DataConfigError):
    """A token shard or its folder is malformed."""


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    dtype: np.dtype
    num_tokens: int
    vocab_size: int


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return DTYPE_CODES[1] if vocab_size <= 2**16 else DTYPE_CODES[2]


def _dtype_code(dtype: np.dtype) -> int:
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(dtype) == candidate:
            return code
    raise TokenShardError(f"token dtype must be uint16 or uint32, got {dtype}")


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write one shard atomically (temporary file, then rename)."""
    path = Path(path)
    dtype = dtype_for_vocab(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise TokenShardError(f"token id {int(tokens.max())} >= vocab_size {vocab_size} in {path}")
    header = _HEADER.pack(MAGIC, VERSION, _dtype_code(dtype), tokens.size, vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(tokens.astype(dtype, copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and validate a shard header against the file size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise TokenShardError(f"cannot read token shard {path}: {e}") from e
    if len(raw) < HEADER_BYTES:
        raise TokenShardError(f"{path} is not a token shard: {len(raw)} bytes, shorter than the header")
    magic, version, code, num_tokens, vocab_size = _HEADER.unpack(raw[: _HEADER.size])
    if magic != MAGIC:
        raise TokenShardError(f"{path} is not a token shard: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise TokenShardError(f"{path}: shard format version {version}, this reader knows {VERSION}")
    if code not in DTYPE_CODES:
        raise TokenShardError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    dtype = DTYPE_CODES[code]
    expected = HEADER_BYTES + num_tokens * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise TokenShardError(
            f"{path}: header says {num_tokens} {dtype.name} tokens ({expected} bytes with the header) "
            f"but the file has {actual} bytes; it is truncated or corrupt, prepare it again"
        )
    return ShardHeader(path, dtype, int(num_tokens), int(vocab_size))


def open_shard(header: ShardHeader) -> np.memmap:
    return np.memmap(header.path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))


def shard_paths(root: str | os.PathLike, split: str) -> list[Path]:
    return sorted(Path(root).glob(f"{split}_*.bin"))


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TokenShardError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise TokenShardError(f"{path} is not valid JSON: {e}") from e


class TokenShardWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens over a list of shards (windows never cross a shard).

    Shards are memory-mapped lazily in each process (data loader workers included).
    """

    def __init__(self, paths: list[Path], seq_len: int) -> None:
        if not paths:
            raise TokenShardError("no token shards given")
        self.headers = [read_header(p) for p in paths]
        vocabs = {h.vocab_size for h in self.headers}
        if len(vocabs) != 1:
            raise TokenShardError(f"shards disagree on vocab_size: {sorted(vocabs)}")
        self.vocab_size = vocabs.pop()
        self.seq_len = seq_len
        counts = [max(0, (h.num_tokens - 1) // seq_len) for h in self.headers]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_tokens = sum(h.num_tokens for h in self.headers)
        if self.offsets[-1] == 0:
            raise TokenShardError(
                f"shards {[str(p) for p in paths]} hold {self.num_tokens} tokens, too few for one "
                f"window of seq_len + 1 = {seq_len + 1}"
            )
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        if shard not in self._maps:
            self._maps[shard] = open_shard(self.headers[shard])
        start = (index - int(self.offsets[shard])) * self.seq_len
        window = self._maps[shard][start : start + self.seq_len + 1]
        return torch.from_numpy(window.astype(np.int64))


class TokenShardDataModule(NestedDataModule):
    """Language-model data from prepared token shards (e.g. FineWeb).

    Args:
        root: folder with ``meta.json``, ``train_*.bin`` and ``val_*.bin``.
        seq_len: tokens per training sequence (windows hold one more for the shifted targets).
        prepare_args: arguments of ``scripts/prepare_fineweb.py`` quoted in the error raised when
            the folder is missing, so the message carries the exact command to run.
    """

    task = "lm"

    def __init__(
        self,
        *,
        root: str,
        seq_len: int = 1024,
        batch_size: int = 512,
        micro_batch_size: int | None = None,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool | str = "auto",
        seed: int = 0,
        prepare_args: str = "--dataset HuggingFaceFW/fineweb --subset sample-10BT --tokenizer gpt2",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
        )
        if seq_len <= 0:
            raise DataConfigError(f"data.seq_len must be positive, got {seq_len}")
        self.meta: dict[str, Any] | None = None

    @property
    def prepare_command(self) -> str:
        return f"python scripts/prepare_fineweb.py {self.hparams.prepare_args} --out {self.hparams.root}"

    def check_data(self) -> None:
        root = Path(self.hparams.root)
        missing = []
        if not (root / META_FILE).is_file():
            missing.append(META_FILE)
        for split in ("train", "val"):
            if not shard_paths(root, split):
                missing.append(f"{split}_*.bin")
        if missing:
            raise DataConfigError(
                f"token shards not found in {root} (missing: {', '.join(missing)}). "
                f"Prepare them with:\n    {self.prepare_command}"
            )

    def load_meta(self) -> dict[str, Any]:
        if self.meta is None:
            self.check_data()
            self.meta = read_meta(self.hparams.root)
        return self.meta

    @property
    def vocab_size(self) -> int:
        return int(self.load_meta()["vocab_size"])

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per token of the validation split (for bits per byte), when recorded."""
        val = self.load_meta().get("splits", {}).get("val", {})
        if val.get("tokens") and val.get("bytes"):
            return val["bytes"] / val["tokens"]
        return None

    def build_datasets(self) -> None:
        meta = self.load_meta()
        root = self.hparams.root
        self.train_set = TokenShardWindows(shard_paths(root, "train"), self.hparams.seq_len)
        self.val_set = TokenShardWindows(shard_paths(root, "val"), self.hparams.seq_len)
        for split in (self.train_set, self.val_set):
            if split.vocab_size != int(meta["vocab_size"]):
                raise TokenShardError(
                    f"{root}: shards have vocab_size {split.vocab_size} but meta.json says {meta['vocab_size']}"
                )
