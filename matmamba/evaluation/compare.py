"""Compare the uniform-width results of several sweeps (e.g. a model trained jointly on four widths
against the same model trained on full width only), averaging over seeds.

    python -m matmamba.evaluation.compare joint=runs/j1/sweep.json,runs/j2/sweep.json \\
        full=runs/f1/sweep.json,runs/f2/sweep.json --out docs/figures/digits_study.png

Prints a Markdown table (width, parameters, mean +- std of the metric per run) and writes the plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matmamba.evaluation.report import human_count


def load_sweep(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "sweep.json"
    if not path.is_file():
        raise FileNotFoundError(f"no sweep at {path}; run eval.py first (it writes sweep.json)")
    return json.loads(path.read_text())


def uniform_points(sweeps: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per uniform width: parameters and the metric's mean and std over the sweeps (seeds)."""
    by_width: dict[int, list[dict[str, Any]]] = {}
    for sweep in sweeps:
        for row in sweep["configurations"]:
            if row.get("width") is not None:
                by_width.setdefault(row["width"], []).append(row)
    points = []
    for width, rows in sorted(by_width.items()):
        values = [r[metric] for r in rows]
        points.append({
            "x": width,
            "params": rows[0]["params"],
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
            "trained": any(r["trained"] for r in rows),
        })
    return points


def markdown_table(series: dict[str, list[dict[str, Any]]], metric: str) -> str:
    widths = sorted({p["x"] for points in series.values() for p in points}, reverse=True)
    percent = metric in ("top1", "top5")
    scale, unit, digits = (100.0, " %", 1) if percent else (1.0, "", 3)
    header = "| width | params | " + " | ".join(f"{label} {metric}{unit}" for label in series) + " |"
    lines = [header, "|" + "---:|" * (2 + len(series))]
    for width in widths:
        cells, params = [], ""
        for points in series.values():
            point = next((p for p in points if p["x"] == width), None)
            if point is None:
                cells.append("-")
                continue
            params = human_count(point["params"])
            spread = f" ± {scale * point['std']:.{digits}f}" if point["n"] > 1 else ""
            cells.append(f"{scale * point['mean']:.{digits}f}{spread}{' ★' if point['trained'] else ''}")
        lines.append(f"| {width} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=SWEEP[,SWEEP...]: sweep.json files or eval run folders")
    parser.add_argument("--metric", default=None, help="column to compare (default: the sweeps' ranking metric)")
    parser.add_argument("--out", default=None, help="write the plot here (PNG)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)

    loaded: dict[str, list[dict[str, Any]]] = {}
    for spec in args.runs:
        label, sep, paths = spec.partition("=")
        if not sep or not paths:
            parser.error(f"expected LABEL=SWEEP[,SWEEP...], got {spec!r}")
        loaded[label] = [load_sweep(p) for p in paths.split(",")]
    metric = args.metric or next(iter(loaded.values()))[0]["metric"]
    series = {label: uniform_points(sweeps, metric) for label, sweeps in loaded.items()}
    table = markdown_table(series, metric)
    print(table)
    if args.out:
        from matmamba.evaluation.plotting import plot_comparison

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        plot_comparison(series, metric, args.out, title=args.title)
        print(f"\nwrote {args.out}")
    return table


if __name__ == "__main__":
    main()
