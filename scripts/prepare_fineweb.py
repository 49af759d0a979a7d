#!/usr/bin/env python
"""Tokenize FineWeb (or any text dataset) into MatMamba token shards.

Streams the dataset through Hugging Face ``datasets`` (nothing but the shards is kept), tokenizes
each document with GPT-2's BPE (tiktoken) or as raw UTF-8 bytes, separates documents with the
end-of-text token, and writes ``val_000000.bin`` (the first ``--val-tokens`` tokens) then
``train_XXXXXX.bin`` shards of ``--shard-tokens`` tokens, plus ``meta.json``, under ``--out``.
The shard format is described in ``matmamba/training/data/tokens.py``.

    # the 10B-token FineWeb sample, GPT-2 tokens (about 20 GB of shards)
    python scripts/prepare_fineweb.py --dataset HuggingFaceFW/fineweb --subset sample-10BT \\
        --tokenizer gpt2 --out data/fineweb/sample-10BT
    # a local parquet or jsonl file with a "text" column
    python scripts/prepare_fineweb.py --data-files my_corpus.parquet --tokenizer bytes --out data/my_corpus
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from matmamba.training.data.tokens import META_FILE, dtype_for_vocab, write_shard  # noqa: E402

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv"}


class Tokenizer:
    """GPT-2 BPE via tiktoken, or UTF-8 bytes; ``eot`` separates documents."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "bytes":
            self.vocab_size, self.eot = 256, 0  # NUL never occurs in text: a safe separator
            self._enc = None
        elif name == "gpt2":
            import tiktoken

            try:
                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # noqa: BLE001 - any failure here means the BPE files are unavailable
                raise SystemExit(
                    f"could not load the GPT-2 BPE through tiktoken ({type(e).__name__}: {e}).\n"
                    "tiktoken downloads it on first use; on an offline machine copy its cache and set "
                    "TIKTOKEN_CACHE_DIR, or use --tokenizer bytes."
                ) from None
            self.vocab_size, self.eot = self._enc.n_vocab, self._enc.eot_token
        else:
            raise SystemExit(f"--tokenizer must be gpt2 or bytes, got {name!r}")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._enc is None:
            return [list(t.encode("utf-8")) for t in texts]
        return self._enc.encode_ordinary_batch(texts)


def open_stream(args: argparse.Namespace) -> Iterable[dict]:
    """The dataset as a stream of rows, from the Hub or from local files."""
    import datasets

    if args.data_files:
        files = [str(Path(f)) for f in args.data_files]
        for f in files:
            if not Path(f).exists():
                raise SystemExit(f"--data-files: {f} does not exist")
        suffixes = {Path(f).suffix for f in files}
        if len(suffixes) != 1 or suffixes.pop() not in LOCAL_FORMATS:
            raise SystemExit(f"--data-files must all be one of {sorted(LOCAL_FORMATS)}, got {files}")
        builder = LOCAL_FORMATS[Path(files[0]).suffix]
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    return datasets.load_dataset(args.dataset, name=args.subset, split=args.split, streaming=True)


def batched(rows: Iterable[dict], column: str, size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for row in rows:
        if column not in row:
            raise SystemExit(f"the dataset has no column {column!r} (columns: {sorted(row)}); set --text-column")
        batch.append(row[column])
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardWriter:
    """Fills fixed-size buffers and writes them as shards: the first ``val_tokens`` to val, then train."""

    def __init__(self, out: Path, vocab_size: int, shard_tokens: int, val_tokens: int) -> None:
        self.out, self.vocab_size = out, vocab_size
        self.shard_tokens, self.val_tokens = shard_tokens, val_tokens
        self.dtype = dtype_for_vocab(vocab_size)
        self.split = "val" if val_tokens > 0 else "train"
        self.buffer = np.empty(self._capacity(), dtype=self.dtype)
        self.filled = 0
        self.index = {"val": 0, "train": 0}
        self.stats = {s: {"tokens": 0, "bytes": 0, "documents": 0, "shards": []} for s in ("val", "train")}

    def _capacity(self) -> int:
        return self.val_tokens if self.split == "val" else self.shard_tokens

    def add(self, tokens: np.ndarray, nbytes: int) -> None:
        """Add one document; its bytes are attributed to the split where the document starts."""
        self.stats[self.split]["documents"] += 1
        self.stats[self.split]["bytes"] += nbytes
        while tokens.size:
            take = min(tokens.size, self._capacity() - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self._capacity():
                self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        name = f"{self.split}_{self.index[self.split]:06d}.bin"
        write_shard(self.out / name, self.buffer[: self.filled], self.vocab_size)
        self.stats[self.split]["tokens"] += self.filled
        self.stats[self.split]["shards"].append(name)
        self.index[self.split] += 1
        self.filled = 0
        if self.split == "val":
            self.split = "train"
            self.buffer = np.empty(self._capacity(), dtype=self.dtype)


def write_meta(out: Path, source: str, tokenizer: Tokenizer, writer: ShardWriter, seconds: float) -> dict:
    """Write ``meta.json`` beside the shards (tokenizer, vocabulary, per-split token and byte
    counts; the data module reads it) and return it."""
    meta = {
        "format": "matmamba-token-shards",
        "version": 1,
        "source": source,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_token": tokenizer.eot,
        "dtype": np.dtype(writer.dtype).name,
        "splits": writer.stats,
        "seconds": round(seconds, 1),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument("--dataset", default="HuggingFaceFW/fineweb", help="Hugging Face dataset name")
    src.add_argument("--subset", default="sample-10BT",
                     help="dataset config name (FineWeb: sample-10BT, sample-100BT, CC-MAIN-...)")
    src.add_argument("--split", default="train")
    src.add_argument("--data-files", nargs="+", help="local parquet/jsonl/txt/csv files instead of the Hub")
    src.add_argument("--text-column", default="text")
    tok = p.add_argument_group("tokens")
    tok.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bytes"])
    tok.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens in all (val + train)")
    tok.add_argument("--val-tokens", type=int, default=10_000_000, help="tokens in the validation shard")
    tok.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per training shard")
    tok.add_argument("--batch-docs", type=int, default=512, help="documents tokenized per batch")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=str(ROOT / "data" / "fineweb" / "sample-10BT"))
    out.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    args = p.parse_args(argv)
    for name in ("val_tokens", "shard_tokens", "batch_docs"):
        if getattr(args, name) < (0 if name == "val_tokens" else 1):
            p.error(f"--{name.replace('_', '-')} is out of range: {getattr(args, name)}")
    if args.max_tokens is not None and args.max_tokens <= args.val_tokens:
        p.error(f"--max-tokens ({args.max_tokens}) must exceed --val-tokens ({args.val_tokens}) to leave training data")
    return args


def main(argv: list[str] | None = None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(args.tokenizer)
    writer = ShardWriter(out, tokenizer.vocab_size, args.shard_tokens, args.val_tokens)
    budget = args.max_tokens
    total = 0
    started = time.time()
    if args.data_files:
        source = "local files " + " ".join(args.data_files)
    else:
        source = f"{args.dataset}/{args.subset}:{args.split}"
    with tqdm(total=budget, unit="tok", unit_scale=True, desc=f"tokenizing {source}") as bar:
        for texts in batched(open_stream(args), args.text_column, args.batch_docs):
            for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
                tokens = np.asarray([tokenizer.eot, *ids], dtype=np.int64)
                if budget is not None:
                    tokens = tokens[: budget - total]
                writer.add(tokens, len(text.encode("utf-8")))
                total += tokens.size
                bar.update(tokens.size)
                if budget is not None and total >= budget:
                    break
            if budget is not None and total >= budget:
                break
    writer.flush()
    if writer.stats["train"]["tokens"] == 0:
        raise SystemExit(f"only {total} tokens were read, all of them taken by the validation split "
                         f"(--val-tokens {args.val_tokens}); lower --val-tokens or add data")

    meta = write_meta(out, source, tokenizer, writer, seconds=time.time() - started)
    print(f"wrote {total:,} tokens to {out}: "
          f"{len(writer.stats['val']['shards'])} val and {len(writer.stats['train']['shards'])} train shards")
    return meta


if __name__ == "__main__":
    main()
