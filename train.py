"""Train a nested MatMamba model.

    python train.py                                   # digits, a small MatMamba-Vision, minutes on CPU
    python train.py experiment=lm_pydoc               # byte-level LM on the bundled Python docs
    python train.py experiment=vision_b16 data.root=/data/imagenet trainer=ddp trainer.devices=8
    python train.py -m experiment=digits optim.lr=1e-3,3e-3          # a sweep
    python train.py ckpt_path=logs/train/runs/.../checkpoints/last.ckpt   # resume exactly

See docs/training.md. Configs live in conf/ (Hydra).
"""

from __future__ import annotations

import os
from pathlib import Path

# Config paths (paths.root_dir) resolve against this repository, wherever the command runs from.
os.environ.setdefault("MATMAMBA_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from matmamba.training.pipeline import metric_value, train  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # The return value is what Hydra sweepers (e.g. the Optuna plugin) optimise.
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
