"""Shared helpers of the training and data tests: config composition, tiny models, tiny datasets
of the real formats (JPEG ImageFolder trees, parquet files, token shards)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
VISION_RECIPES = [e for e in EXPERIMENTS if e.startswith("vision_")]
LM_RECIPES = [e for e in EXPERIMENTS if e.startswith("lm_") and e != "lm_pydoc"]

# Tiny shapes for every registered model family (widths 64, 32, 16, 8 with head dim 8).
TINY_VISION = ["++model.overrides.d_model=64", "++model.overrides.n_layer=2", "++model.overrides.d_state=16",
               "++model.overrides.headdim=8", "++model.overrides.chunk_size=16", "model.widths=null",
               "model.compile=false"]  # vision_35m and vision_b16 compile by default (GPU recipes)
TINY_LM = ["++model.overrides.d_model=64", "++model.overrides.n_layer=2", "++model.overrides.d_state=16",
           "++model.overrides.headdim=8", "++model.overrides.chunk_size=16", "++model.overrides.vocab_size=256",
           "model.widths=null", "model.compile=false"]  # lm_130m compiles by default (a GPU recipe)

# Quiet, short, CPU-only runs.
FAST = [
    "trainer=cpu", "trainer.devices=1", "trainer.precision=32-true", "extras.print_config=false",
    "trainer.max_steps=4", "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2", "optim.warmup_steps=1", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "callbacks.progress_bar=null", "export_dir=null",
]


@contextlib.contextmanager
def one_thread():
    """Tiny models are latency-bound: one intra-op thread is faster, and immune to other
    processes competing for the cores. Test modules wrap every test in it (autouse fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compose_cfg(overrides: list[str], output_dir: Path | None = None, config_name: str = "train"):
    """Compose conf/train.yaml like train.py does, with Hydra's runtime config available so that
    ``${hydra:...}`` interpolations resolve; ``paths.output_dir`` points at ``output_dir``."""
    GlobalHydra.instance().clear()
    os.environ.setdefault("MATMAMBA_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir / "logs")
        del cfg.hydra
    GlobalHydra.instance().clear()
    return cfg


def run_train_script(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run train.py in a subprocess (what a user runs); returns the CompletedProcess."""
    env = env or {}
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1", **env}
    # the repository first; the caller's PYTHONPATH after it (packages installed with --target)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (env.get("PYTHONPATH", str(ROOT)), os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


# ------------------------------------------------------------------------------- tiny datasets
def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    """A JPEG ImageFolder tree root/{train,val}/<class>/*.jpg of coloured noise, one tint per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(2, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] += 150
                Image.fromarray(pixels).save(folder / f"img_{i}.jpg", quality=90)
    return root


def make_image_parquet(root: Path, classes: int = 3, per_class: int = 4, size: int = 40) -> dict[str, str]:
    """Parquet files with an ``image`` (datasets Image feature) and a ``label`` column, per split."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    files = {}
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", per_class), ("validation", max(2, per_class // 2))):
        images, labels = [], []
        for c in range(classes):
            for _ in range(count):
                pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
                images.append(Image.fromarray(pixels))
                labels.append(c)
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(num_classes=classes)})
        ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        path = root / f"{split}.parquet"
        ds.to_parquet(str(path))
        files[split] = str(path)
    return files


def make_text_parquet(path: Path, docs: int = 60, seed: int = 0) -> Path:
    """A parquet file with a ``text`` column of generated English-like documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = ("state space model nested width matryoshka scan chunk token layer the of and a to in is "
             "train loss value résumé naïve").split()
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(20, 80)))) + "." for _ in range(docs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "id": list(range(docs))}), str(path))
    return path


def make_text_jsonl(path: Path, docs: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": f"document {i}: " + "token shards are memory mapped. " * (i % 5 + 1)}) + "\n")
    return path


def make_token_shards(out: Path, val_tokens: int = 2048, max_tokens: int = 12000, shard_tokens: int = 4000) -> Path:
    """Token shards made by scripts/prepare_fineweb.py from a generated parquet file (bytes)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import prepare_fineweb

    source = make_text_parquet(out.parent / (out.name + "_source.parquet"), docs=200)
    prepare_fineweb.main([
        "--data-files", str(source), "--tokenizer", "bytes", "--out", str(out),
        "--val-tokens", str(val_tokens), "--max-tokens", str(max_tokens), "--shard-tokens", str(shard_tokens),
    ])
    return out


class DDPProbe:
    """A callback (built through Hydra in the DDP test) that records, per rank, a fingerprint of
    every training batch and the final weights."""

    def __new__(cls, out_dir: str):
        import lightning as L
        import torch

        class _Probe(L.Callback):
            def __init__(self):
                self.out_dir = Path(out_dir)
                self.fingerprints = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                images = batch[0]
                self.fingerprints.extend(hash(row.numpy().tobytes()) for row in images.cpu())

            def on_train_end(self, trainer, pl_module):
                self.out_dir.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {"fingerprints": self.fingerprints, "world_size": trainer.world_size,
                     "state_dict": {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}},
                    self.out_dir / f"rank{trainer.global_rank}.pt",
                )

        return _Probe()
