"""Figures of a sweep (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from matmamba.evaluation.pareto import pareto_front  # noqa: E402

KIND_STYLE = {
    "trained": dict(color="tab:red", marker="*", s=160, zorder=4),
    "uniform": dict(color="tab:blue", marker="o", s=28, zorder=3),
    "mix": dict(color="tab:green", marker="s", s=22, zorder=2),
    "random": dict(color="tab:gray", marker=".", s=30, zorder=1, alpha=0.7),
    "list": dict(color="tab:purple", marker="D", s=30, zorder=3),
}
METRIC_LABELS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "loss": "loss (nats)",
                 "ppl": "perplexity", "bpb": "bits per byte"}


def _panel(ax, rows: Sequence[Mapping[str, Any]], x: str, metric: str, maximize: bool, xlabel: str) -> None:
    xs = [row.get(x) for row in rows]
    ys = [row.get(metric) for row in rows]
    groups: dict[str, list[tuple[float, float]]] = {}
    for row, xv, yv in zip(rows, xs, ys):
        if xv is not None and yv is not None:  # a trained width is drawn as such, whatever found it
            groups.setdefault("trained" if row["trained"] else row["kind"], []).append((xv, yv))
    for kind, style in KIND_STYLE.items():
        if kind in groups:
            ax.scatter(*zip(*groups[kind]), label="trained width" if kind == "trained" else kind, **style)
    for row, xv, yv in zip(rows, xs, ys):
        if row["trained"] and xv is not None:
            ax.annotate(row["name"], (xv, yv), textcoords="offset points", xytext=(6, -10), fontsize=8)
    front = pareto_front(xs, ys, maximize)
    if front:
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.step(fx, fy, where="post", color="black", linewidth=1.2, label="Pareto frontier", zorder=5)
    present = [v for v in xs if v is not None]
    if present and max(present) / max(min(present), 1e-12) > 20:
        ax.set_xscale("log")
    if x == "params":
        ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(True, alpha=0.3)


def plot_pareto(rows: Sequence[Mapping[str, Any]], metric: str, maximize: bool, path: str | Path,
                title: str = "", latency_batch: int | None = None) -> Path:
    """``metric`` against parameters (and against latency when measured): every configuration a
    point, trained widths starred and labelled, the Pareto frontier drawn."""
    has_latency = any(row.get("latency_ms") is not None for row in rows)
    fig, axes = plt.subplots(1, 2 if has_latency else 1, figsize=(12 if has_latency else 6.5, 4.8), squeeze=False)
    _panel(axes[0, 0], rows, "params", metric, maximize, "parameters")
    if has_latency:
        batch = f" (batch {latency_batch})" if latency_batch else ""
        _panel(axes[0, 1], rows, "latency_ms", metric, maximize, f"latency, ms{batch}")
    axes[0, 0].legend(fontsize=8, loc="lower right" if maximize else "upper right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_comparison(series: Mapping[str, Sequence[Mapping[str, Any]]], metric: str, path: str | Path,
                    title: str = "", xlabel: str = "uniform width (every layer)") -> Path:
    """One line per run (e.g. the same model trained two ways) of ``metric`` against width.

    ``series[label]`` is a list of points ``{"x", "mean", "std", "trained"}``; the band is
    mean +- std over seeds, and each run's trained widths are starred.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, points), color in zip(series.items(), colors):
        points = sorted(points, key=lambda p: p["x"])
        xs, means = [p["x"] for p in points], [p["mean"] for p in points]
        ax.plot(xs, means, marker="o", markersize=3, color=color, label=label)
        stds = [p.get("std") or 0.0 for p in points]
        if any(stds):
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=color, alpha=0.2, linewidth=0)
        trained = [p for p in points if p["trained"]]
        ax.scatter([p["x"] for p in trained], [p["mean"] for p in trained], marker="*", s=160, color=color,
                   zorder=4, edgecolors="black", linewidths=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(True, alpha=0.3)
    ax.legend(title="★ trained width", fontsize=9)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
