"""The sweep behind ``eval.py``: load, build the data and the configurations, measure, report, export."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from matmamba.evaluation.budget import BudgetError, parse_budget, select_under_budget
from matmamba.evaluation.data import build_datamodule, check_compatible, data_description, validation_loader
from matmamba.evaluation.evaluate import evaluate_submodels, num_batches, time_submodels, to_device
from matmamba.evaluation.export import export_submodel
from matmamba.evaluation.loading import LoadedModel, load_lightning_checkpoint, load_pretrained
from matmamba.evaluation.pareto import pareto_front
from matmamba.evaluation.report import columns, print_table, write_csv, write_json
from matmamba.evaluation.submodels import Submodel, build_sweep
from matmamba.evaluation.tasks import make_task, resolve_metric

log = logging.getLogger(__name__)


class EvalConfigError(ValueError):
    """The eval config asks for something contradictory or malformed."""


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# ----------------------------------------------------------------------------------- settings
def check_config(cfg: DictConfig) -> dict[str, float]:
    """Checks that need no model; returns the budget limits."""
    problems = []
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("pretrained")):
        problems.append("give exactly one of ckpt_path=<checkpoint or run folder> and pretrained=<folder>")
    latency = cfg.get("latency") or {}
    if latency.get("enabled", True):
        for key, low in (("batch_size", 1), ("warmup", 0), ("repeats", 1)):
            value = latency.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                problems.append(f"latency.{key} must be an integer >= {low}, got {value!r}")
    limit = cfg.get("limit_batches")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        problems.append(f"limit_batches must be null or a positive integer, got {limit!r}")
    batch = cfg.get("batch_size")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        problems.append(f"batch_size must be null or a positive integer, got {batch!r}")
    try:
        limits = parse_budget(_plain(cfg.get("budget")))
    except BudgetError as e:
        problems.append(str(e))
        limits = {}
    if "latency_ms" in limits and not latency.get("enabled", True):
        problems.append("budget.latency_ms needs latency.enabled=true")
    if cfg.get("export_dir") and not limits and cfg.get("width") is None:
        problems.append("export_dir needs a budget (budget.params / budget.flops / budget.latency_ms) "
                        "or a single configuration (width=...) to know what to export")
    if problems:
        raise EvalConfigError("invalid eval config:\n  - " + "\n  - ".join(problems))
    return limits


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalConfigError(f"device={name} but CUDA is not available here; use device=auto or cpu")
    return device


def resolve_amp(precision: Any, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: ``auto`` = bf16 on a bf16-capable GPU, none (float32) elsewhere."""
    precision = str(precision)
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    if precision in ("32", "32-true", "fp32"):
        return None
    if precision in ("bf16", "bf16-mixed"):
        return torch.bfloat16
    if precision in ("16", "16-mixed", "fp16"):
        return torch.float16
    raise EvalConfigError(f"precision={precision!r}; use auto, 32, bf16 or 16")


def load(cfg: DictConfig) -> tuple[LoadedModel, dict[str, Any]]:
    """The model and the description of its validation data."""
    cfg_data = _plain(cfg.get("data")) or {}
    if cfg.get("pretrained"):
        description = data_description(cfg_data, None, source=f"pretrained={cfg.pretrained}")
        from hydra.utils import get_class

        task = getattr(get_class(description["_target_"]), "task", None) or None
        return load_pretrained(cfg.pretrained, task), description
    loaded = load_lightning_checkpoint(cfg.ckpt_path, trust=bool(cfg.get("trust_checkpoint", False)))
    source = f"{loaded.source} (and its run's .hydra/config.yaml)"
    return loaded, data_description(cfg_data, loaded.data, source=source)


# ----------------------------------------------------------------------------------- the sweep
def make_rows(task, submodels: list[Submodel], metrics: list[dict[str, float]],
              latencies: list[float] | None, latency_batch: int | None) -> list[dict[str, Any]]:
    model = task.model
    rows = []
    for i, submodel in enumerate(submodels):
        spec = submodel.spec
        rows.append({
            "name": submodel.name,
            "kind": submodel.kind,
            "trained": submodel.trained,
            "width": submodel.uniform_width,
            "widths": list(submodel.widths),
            "params": int(model.num_params(spec)),
            "params_non_embedding": int(model.num_params(spec, non_embedding=True)),
            "flops": task.flops(spec),
            **metrics[i],
            "latency_ms": latencies[i] if latencies else None,
            "latency_batch": latency_batch if latencies else None,
        })
    return rows


def mark_frontiers(rows: list[dict[str, Any]], metric: str, maximize: bool) -> None:
    values = [row[metric] for row in rows]
    for cost in ("params", "latency_ms"):
        front = set(pareto_front([row[cost] for row in rows], values, maximize))
        for i, row in enumerate(rows):
            row[f"pareto_{cost.split('_')[0]}"] = i in front if row[cost] is not None else None


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn())


@dataclass
class Sweep:
    """A measured sweep: its record (what sweep.json holds), the task, and a batch of real inputs."""

    record: dict[str, Any]
    task: Any
    example_inputs: torch.Tensor


def run_sweep(cfg: DictConfig, loaded: LoadedModel, description: dict[str, Any]) -> Sweep:
    """Measure every configuration of the sweep the config asks for."""
    device = resolve_device(cfg.get("device"))
    amp = resolve_amp(cfg.get("precision", "auto"), device)
    model = loaded.model.to(device).eval()
    submodels = build_sweep(model, _plain(cfg.sweep) or {}, _plain(cfg.get("width")))

    datamodule = build_datamodule(description, cfg.get("batch_size"))
    check_compatible(datamodule, model, loaded.task)
    loader = validation_loader(datamodule)
    task = make_task(loaded.task, model, datamodule)
    example_inputs, _ = task.split(to_device(next(iter(loader)), device))
    limit = cfg.get("limit_batches")
    latency = _plain(cfg.get("latency")) or {}
    timed = bool(latency.get("enabled", True))
    precision = str(amp or torch.float32).replace("torch.", "")
    log.info("sweeping %d configurations of %s on %s (%s), %d validation batches", len(submodels),
             loaded.info.get("model_name"), device, precision, num_batches(loader, limit))

    started = time.perf_counter()
    with _progress() as progress:
        evaluating = progress.add_task("evaluate", total=num_batches(loader, limit) * len(submodels))
        metrics = evaluate_submodels(task, submodels, loader, device, amp, limit,
                                     advance=lambda: progress.advance(evaluating))
        latencies = None
        if timed:
            timing = progress.add_task(f"latency (batch {latency['batch_size']})", total=len(submodels))
            latencies = time_submodels(task, submodels, example_inputs, device, latency["batch_size"],
                                       latency["warmup"], latency["repeats"], amp,
                                       advance=lambda: progress.advance(timing))
    seconds = time.perf_counter() - started

    rows = make_rows(task, submodels, metrics, latencies, latency["batch_size"] if timed else None)
    metric_names = list(metrics[0])
    metric, maximize = resolve_metric(cfg.get("metric", "auto"), task, metric_names)
    mark_frontiers(rows, metric, maximize)
    record = {
        "source": loaded.source,
        "model": {"name": loaded.info.get("model_name"), "type": loaded.task, "config": model.config.to_dict(),
                  "trained_widths": list(model.widths_default), "n_layer": len(model.layers)},
        "checkpoint": {k: v for k, v in loaded.info.items() if k != "model_name"},
        "data": description,
        "metric": metric,
        "maximize": maximize,
        "metric_columns": metric_names,
        "flops_per": task.item,
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "precision": precision,
        "latency": latency if timed else None,
        "limit_batches": limit,
        "seconds": round(seconds, 2),
        "configurations": rows,
        "selected": None,
        "export": None,
    }
    return Sweep(record, task, example_inputs)


# ----------------------------------------------------------------------------------- outputs
def log_to_loggers(loggers, record: dict[str, Any], header: list[str], cfg: DictConfig, plot: Path | None) -> None:
    """W&B gets the table and the plot; other loggers get one step of metrics per configuration."""
    from lightning.pytorch.loggers import WandbLogger

    rows = record["configurations"]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if isinstance(logger, WandbLogger):
            data = [[" ".join(map(str, row[c])) if isinstance(row[c], list) else row[c] for c in header]
                    for row in rows]
            logger.log_table(key="eval/sweep", columns=header, data=data)
            if plot is not None:
                logger.log_image(key="eval/pareto", images=[str(plot)])
            summary = {"eval/metric": record["metric"], "eval/configurations": len(rows)}
            if record["selected"]:
                summary.update({f"eval/selected/{k}": v for k, v in record["selected"].items()
                                if isinstance(v, (int, float, str))})
            logger.experiment.summary.update(summary)
        else:
            numeric = [c for c in header if c not in ("name", "kind", "widths", "trained")]
            for i, row in enumerate(rows):
                logger.log_metrics({f"eval/{c}": float(row[c]) for c in numeric if row.get(c) is not None}, step=i)


def write_results(record: dict[str, Any], output_dir: Path, plot: bool) -> Path | None:
    """``sweep.csv``, ``sweep.json`` and (if ``plot``) ``pareto.png``; returns the plot's path."""
    rows = record["configurations"]
    write_csv(rows, columns(record["metric_columns"]), output_dir / "sweep.csv")
    write_json(record, output_dir / "sweep.json")
    path = None
    if plot:
        from matmamba.evaluation.plotting import plot_pareto

        path = plot_pareto(rows, record["metric"], record["maximize"], output_dir / "pareto.png",
                           title=f"{record['model']['name']}: {len(rows)} configurations",
                           latency_batch=(record["latency"] or {}).get("batch_size"))
    log.info("wrote %s/{sweep.csv, sweep.json%s}", output_dir, ", pareto.png" if path else "")
    return path


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Everything ``eval.py`` does. Returns the sweep's record (also written to ``sweep.json``).

    The measured sweep is written to ``paths.output_dir`` and printed before a budget is applied,
    so an impossible budget still leaves the results behind.
    """
    limits = check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    loaded, description = load(cfg)
    sweep = run_sweep(cfg, loaded, description)
    record = sweep.record
    rows, metric = record["configurations"], record["metric"]
    plot = write_results(record, output_dir, cfg.get("plot", True))

    selected, budget_error = (rows[0] if len(rows) == 1 else None), None
    if limits:
        try:
            selected = select_under_budget(rows, limits, metric, record["maximize"])
            record["selected"] = {**selected, "budget": limits}
            log.info("best under the budget %s: %s (%s = %.4f, %s params)", limits, selected["name"], metric,
                     selected[metric], f"{selected['params']:,}")
        except BudgetError as e:
            budget_error = e
    if cfg.get("print_table", True):
        print_table(rows, record["metric_columns"], metric, record["flops_per"],
                    title=f"{record['model']['name']} · {loaded.source}",
                    selected=record["selected"]["name"] if record["selected"] else None)
    if budget_error is not None:
        raise budget_error

    if cfg.get("export_dir"):
        submodel = Submodel(tuple(selected["widths"]), selected["kind"], selected["trained"])
        record["export"] = export_submodel(sweep.task.model, submodel, cfg.export_dir,
                                           sweep.example_inputs[:8], record=selected)
        log.info("exported %s to %s (%s params; max |nested - exported| = %.2e)", submodel.name,
                 cfg.export_dir, f"{record['export']['params']:,}", record["export"]["max_abs_diff"])
    if record["selected"] or record["export"]:
        write_json(record, output_dir / "sweep.json")

    if cfg.get("logger"):
        from matmamba.training.utils import close_loggers, instantiate_loggers

        loggers = instantiate_loggers(cfg.logger)
        status = "failed"
        try:
            log_to_loggers(loggers, record, columns(record["metric_columns"]), cfg, plot)
            status = "success"
        finally:
            close_loggers(loggers, status)
    return record


def objective(record: dict[str, Any]) -> float | None:
    """The value eval.py returns to Hydra sweepers: the selected configuration's metric, else the best."""
    metric = record["metric"]
    if record.get("selected"):
        return float(record["selected"][metric])
    values = [row[metric] for row in record["configurations"]]
    return float(max(values) if record["maximize"] else min(values))
