"""Sweep the nested submodels of a trained MatMamba model: quality, size, FLOPs and latency of each
configuration, the Pareto frontier, and export of the best submodel under a budget.

    python eval.py ckpt_path=logs/train/runs/digits/<time>/checkpoints/last.ckpt   # the trained widths
    python eval.py ckpt_path=logs/train/runs/digits/<time> sweep=uniform           # every uniform width
    python eval.py ckpt_path=... sweep=mixnmatch sweep.random=200 sweep.seed=0     # + random per-layer mixes
    python eval.py -m ckpt_path=... width=128,64,32,16                             # one job per width
    python eval.py ckpt_path=... budget.params=40e6 export_dir=out/sub40m          # best submodel under a budget
    python eval.py pretrained=/path/to/published-checkpoint experiment=vision_35m  # a published checkpoint

Results go to logs/eval/runs/<name>/<time>/: sweep.csv, sweep.json, pareto.png. See docs/eval.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Config paths (paths.root_dir) resolve against this repository, wherever the command runs from.
os.environ.setdefault("MATMAMBA_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from matmamba.evaluation import EVAL_ERRORS, objective, run_eval  # noqa: E402

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    try:
        record = run_eval(cfg)
    except EVAL_ERRORS as e:
        # A problem with the inputs, not a bug: say what is wrong (console and eval.log), no traceback.
        log.error("%s: %s", type(e).__name__, e)
        raise SystemExit(1) from None
    # The return value is what Hydra sweepers optimise.
    return objective(record)


if __name__ == "__main__":
    main()
