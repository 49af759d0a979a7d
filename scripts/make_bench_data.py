#!/usr/bin/env python
"""Generate benchmark data in the real on-disk formats, with nothing downloaded.

Two kinds, both read by the same data modules as the real recipes:

    # an ImageNet-format ImageFolder tree of JPEGs: DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG
    python scripts/make_bench_data.py imagenet --out /tmp/bench/imagenet --classes 100 --train-per-class 40
    # token shards (byte tokenizer) made from real text: the running Python's standard library sources
    python scripts/make_bench_data.py tokens --out /tmp/bench/tokens --tokens 50000000

The images are not constant: each class has its own colour gradient, each image its own smooth
noise at three scales plus pixel noise, sides of 256 to 500 px (ImageNet's are mostly 500 x 375),
saved at JPEG quality 90, about 75 KB each (ImageNet's average about 110 KB). Decoding and
augmenting them therefore costs close to, if slightly less than, ImageNet's JPEGs (about 5 ms per
image on one CPU core for the vision recipes' full augmentation), which is what a data-pipeline
benchmark needs; their content is meaningless.

The token shards are what ``scripts/prepare_fineweb.py --tokenizer bytes`` writes (its shard
writer and ``meta.json`` are reused): documents separated by the end-of-text byte, the first
``--val-tokens`` tokens in ``val_000000.bin``. Read them with ``experiment=lm_130m data.root=DIR``:
the byte vocabulary (256) fits inside any LM's vocabulary, so the model and its cost are the
recipe's.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from prepare_fineweb import ShardWriter, Tokenizer, write_meta  # noqa: E402

# ------------------------------------------------------------------------------------- images

MIN_SIDE, MAX_SIDE = 256, 500     # random side lengths at the default --size (ImageNet-like)
NOISE_OCTAVES = ((4, 60.0), (16, 35.0), (64, 20.0))  # (grid size, amplitude): smooth structure
PIXEL_NOISE = 18.0                # per-pixel noise: gives the JPEGs ImageNet-like entropy (~70 KB)


def class_name(c: int) -> str:
    """ImageNet-style synset-like folder names, sorted in class order."""
    return f"n{c:08d}"


def make_image(seed: tuple[int, ...], class_index: int, min_side: int):
    """One RGB PIL image: the class's colour gradient plus this image's noise (``seed`` is a
    numpy seed sequence, e.g. (run seed, split, class, index))."""
    from PIL import Image

    crng = np.random.default_rng([1234, class_index])  # the class look: two colours and a direction
    c0, c1 = crng.uniform(30, 225, 3).astype(np.float32), crng.uniform(30, 225, 3).astype(np.float32)
    angle = crng.uniform(0, 2 * np.pi)
    rng = np.random.default_rng(seed)
    high = max(min_side, round(min_side * MAX_SIDE / MIN_SIDE))
    w, h = (int(x) for x in rng.integers(min_side, high + 1, 2))
    ramp = np.cos(angle) * np.linspace(0, 1, w, dtype=np.float32)[None, :] + \
        np.sin(angle) * np.linspace(0, 1, h, dtype=np.float32)[:, None]
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
    img = c0 + (c1 - c0) * ramp[..., None]
    for grid, amplitude in NOISE_OCTAVES:
        small = rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img += (up - 127.5) * (amplitude / 127.5)
    img += rng.standard_normal(img.shape, dtype=np.float32) * PIXEL_NOISE
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write_images(jobs: list[tuple[str, tuple[int, ...], int, int, int]]) -> int:
    """Worker: write a list of (path, seed, class, min side, quality) images; returns bytes written."""
    total = 0
    for path, seed, c, min_side, quality in jobs:
        make_image(seed, c, min_side).save(path, format="JPEG", quality=quality)
        total += os.path.getsize(path)
    return total


def make_imagenet(out: str | os.PathLike, classes: int = 100, train_per_class: int = 40,
                  val_per_class: int = 10, size: int = MIN_SIDE, quality: int = 90,
                  workers: int | None = None, seed: int = 0, quiet: bool = False) -> dict:
    """Write the ImageFolder tree ``out/{train,val}/<class>/*.JPEG`` in parallel processes.

    ``size`` is the shortest side; sides are drawn from [size, size * 500/256] (256 to 500 px by
    default, like most of ImageNet's). Returns a summary.
    """
    out = Path(out)
    started = time.perf_counter()
    jobs = []
    for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for c in range(classes):
            folder = out / split / class_name(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # A distinct seed per (split, class, image), the same on every run.
                jobs.append((str(folder / f"{class_name(c)}_{i}.JPEG"), (seed, split_id, c, i), c, size, quality))
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    chunks = [jobs[i::workers * 4] for i in range(workers * 4)]  # interleaved: similar work per chunk
    if workers == 1:
        nbytes = sum(_write_images(chunk) for chunk in chunks)
    else:
        with ProcessPoolExecutor(workers) as pool:
            nbytes = sum(pool.map(_write_images, chunks))
    seconds = time.perf_counter() - started
    summary = {"root": str(out), "classes": classes, "train_images": classes * train_per_class,
               "val_images": classes * val_per_class, "bytes": nbytes, "seconds": round(seconds, 2),
               "workers": workers}
    if not quiet:
        n = len(jobs)
        print(f"wrote {n:,} JPEGs ({summary['train_images']:,} train, {summary['val_images']:,} val, "
              f"{classes} classes, {nbytes / max(n, 1) / 1e3:.0f} KB each on average) to {out} "
              f"in {seconds:.1f} s with {workers} processes")
    return summary


# ------------------------------------------------------------------------------------- tokens

def stdlib_sources() -> list[Path]:
    """The running Python's standard-library ``*.py`` files (site-packages excluded), sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    return sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))


def _expand_sources(sources: list[str] | None) -> list[Path]:
    if not sources:
        return stdlib_sources()
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"--source {s} does not exist")
    return files


def _documents(files: list[Path]) -> Iterator[bytes]:
    """UTF-8 bytes of each file, over and over (the caller stops at its token budget). NUL bytes
    are dropped: NUL is the byte tokenizer's document separator."""
    while True:
        produced = False
        for f in files:
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            data = text.replace("\0", "").encode("utf-8")
            if data:
                produced = True
                yield data
        if not produced:
            raise SystemExit("the token sources hold no text")


def make_tokens(out: str | os.PathLike, tokens: int = 50_000_000, sources: list[str] | None = None,
                val_tokens: int = 1_000_000, shard_tokens: int = 100_000_000, quiet: bool = False) -> dict:
    """Write byte-tokenized shards of ``tokens`` tokens in all (val first) and ``meta.json``.

    Sources: files or folders (default: the standard library's ``*.py``), concatenated in order,
    each document preceded by the separator, repeated from the start if they hold too few bytes.
    Returns the meta dict.
    """
    if tokens <= val_tokens:
        raise SystemExit(f"--tokens ({tokens}) must exceed --val-tokens ({val_tokens}) to leave training data")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        old.unlink()  # a re-run replaces the set, never mixes two
    started = time.perf_counter()
    files = _expand_sources(sources)
    tokenizer = Tokenizer("bytes")
    writer = ShardWriter(out, tokenizer.vocab_size, shard_tokens, val_tokens)
    total = 0
    for data in _documents(files):
        # The byte tokenizer's ids are the bytes themselves: no Python lists on the way.
        ids = np.frombuffer(bytes([tokenizer.eot]) + data, dtype=np.uint8)[: tokens - total]
        writer.add(ids, len(data))
        total += ids.size
        if total >= tokens:
            break
    writer.flush()
    source = "python stdlib *.py" if not sources else " ".join(sources)
    source_bytes = sum(f.stat().st_size for f in files)
    meta = write_meta(out, f"{source} ({len(files)} files, {source_bytes:,} bytes; repeated when short)",
                      tokenizer, writer, seconds=time.perf_counter() - started)
    if not quiet:
        print(f"wrote {total:,} byte tokens ({len(writer.stats['val']['shards'])} val and "
              f"{len(writer.stats['train']['shards'])} train shards) from {len(files)} files of {source} "
              f"to {out} in {time.perf_counter() - started:.1f} s")
    return meta


# ------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    im = sub.add_parser("imagenet", help="an ImageNet-format JPEG ImageFolder tree")
    im.add_argument("--out", required=True)
    im.add_argument("--classes", type=int, default=100)
    im.add_argument("--train-per-class", type=int, default=40)
    im.add_argument("--val-per-class", type=int, default=10)
    im.add_argument("--size", type=int, default=MIN_SIDE,
                    help=f"shortest image side; sides vary from size to size*{MAX_SIDE}/{MIN_SIDE}")
    im.add_argument("--quality", type=int, default=90, help="JPEG quality")
    im.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    im.add_argument("--seed", type=int, default=0)
    tok = sub.add_parser("tokens", help="byte-tokenized token shards from local text")
    tok.add_argument("--out", required=True)
    tok.add_argument("--tokens", type=int, default=50_000_000, help="tokens in all (val + train)")
    tok.add_argument("--source", nargs="+", default=None,
                     help="text files or folders (default: the Python standard library's *.py files)")
    tok.add_argument("--val-tokens", type=int, default=1_000_000)
    tok.add_argument("--shard-tokens", type=int, default=100_000_000)
    args = p.parse_args(argv)
    if args.kind == "imagenet":
        for name in ("classes", "train_per_class", "val_per_class"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1")
        if args.size < 8:
            p.error("--size must be >= 8")
    elif args.val_tokens < 1 or args.shard_tokens < 1:
        p.error("--val-tokens and --shard-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.kind == "imagenet":
        return make_imagenet(args.out, args.classes, args.train_per_class, args.val_per_class, args.size,
                             args.quality, args.workers, args.seed)
    return make_tokens(args.out, args.tokens, args.source, args.val_tokens, args.shard_tokens)


if __name__ == "__main__":
    main()
