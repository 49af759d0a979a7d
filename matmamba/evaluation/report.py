"""The sweep's results: one row per configuration, written as CSV and JSON and printed as a table."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Columns before and after the task's metric columns, in the order they are written.
LEADING_COLUMNS = ["name", "kind", "trained", "width", "widths", "params", "params_non_embedding", "flops"]
TRAILING_COLUMNS = ["latency_ms", "latency_batch", "pareto_params", "pareto_latency"]


def columns(metric_names: Sequence[str]) -> list[str]:
    return LEADING_COLUMNS + list(metric_names) + TRAILING_COLUMNS


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], header: Sequence[str], path: str | Path) -> Path:
    """One line per configuration; per-layer widths space-separated; missing values empty."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(header), extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _csv_value(row.get(c)) for c in header})
    return path


def write_json(payload: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def human_count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}" if n / scale < 100 else f"{n / scale:.0f}{suffix}"
    return f"{n:.0f}"


def format_metric(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if name in ("top1", "top5"):
        return f"{100 * value:.2f}%"
    return f"{value:.4f}"


def print_table(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str], metric: str, item: str,
                title: str, selected: str | None = None, console=None) -> None:
    """A rich table, widest first: trained widths starred, Pareto-optimal rows (by parameters) in
    bold, the budget's choice marked."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("configuration")
    table.add_column("kind")
    table.add_column("params", justify="right")
    table.add_column("non-emb", justify="right")
    table.add_column(f"FLOPs/{item}", justify="right")
    for name in metric_names:
        table.add_column(name + (" *" if name == metric else ""), justify="right")
    has_latency = any(row.get("latency_ms") is not None for row in rows)
    if has_latency:
        table.add_column("latency", justify="right")
    for row in sorted(rows, key=lambda r: (-r["params"], r["name"])):
        label = ("★ " if row["trained"] else "  ") + row["name"] + ("  ← budget" if row["name"] == selected else "")
        cells = [label, row["kind"], human_count(row["params"]), human_count(row["params_non_embedding"]),
                 human_count(row["flops"])] + [format_metric(m, row.get(m)) for m in metric_names]
        if has_latency:
            cells.append(f"{row['latency_ms']:.3g} ms" if row.get("latency_ms") is not None else "-")
        table.add_row(*cells, style="bold" if row.get("pareto_params") else None)
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
            console = Console(width=160)
    console.print(table)
    console.print(f"★ trained width   bold: on the Pareto frontier (params vs {metric})")
