"""Sweeps over the nested submodels of a trained MatMamba model (``eval.py``).

A sweep evaluates configurations (one width per layer: the trained widths, every uniform width,
mix'n'match mixes, random mixes, explicit lists) on the recipe's validation data and records
quality, parameters, FLOPs and latency for each; it finds the Pareto frontier, picks the best
configuration under a budget and exports it as a standalone dense model.

The building blocks (``build_sweep``, ``pareto_front``, ``select_under_budget``,
``export_submodel``, ``measure_latency``) work on any MatMamba model; ``run_eval`` is the Hydra
pipeline behind ``eval.py``.
"""

from matmamba.evaluation.budget import BudgetError, parse_budget, select_under_budget
from matmamba.evaluation.data import DataError
from matmamba.evaluation.export import ExportError, export_submodel
from matmamba.evaluation.latency import measure_latency
from matmamba.evaluation.loading import CheckpointError, load_lightning_checkpoint, load_pretrained
from matmamba.evaluation.pareto import pareto_front
from matmamba.evaluation.pipeline import EvalConfigError, objective, run_eval
from matmamba.evaluation.submodels import Submodel, SweepError, build_sweep

# Errors that describe bad inputs (reported without a traceback by eval.py).
EVAL_ERRORS = (BudgetError, CheckpointError, DataError, EvalConfigError, SweepError)

__all__ = [
    "BudgetError", "CheckpointError", "DataError", "EVAL_ERRORS", "EvalConfigError", "ExportError", "Submodel",
    "SweepError", "build_sweep", "export_submodel", "load_lightning_checkpoint", "load_pretrained", "measure_latency",
    "objective", "pareto_front", "parse_budget", "run_eval", "select_under_budget",
]
