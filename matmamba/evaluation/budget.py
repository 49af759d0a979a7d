"""Pick the best configuration of a sweep that fits a budget of parameters, FLOPs or latency."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# budget key -> sweep column it limits
BUDGET_COLUMNS = {"params": "params", "flops": "flops", "latency_ms": "latency_ms"}


class BudgetError(ValueError):
    """No configuration of the sweep fits the budget (or the budget is malformed)."""


def parse_budget(budget: Mapping[str, Any] | None) -> dict[str, float]:
    """``{column: limit}`` for the limits that are set; values may be numbers or strings like "40e6"."""
    limits = {}
    for key, value in (budget or {}).items():
        if key not in BUDGET_COLUMNS:
            raise BudgetError(f"unknown budget key {key!r}; use {', '.join(f'budget.{k}' for k in BUDGET_COLUMNS)}")
        if value is None:
            continue
        try:
            limit = float(value)
        except (TypeError, ValueError):
            raise BudgetError(f"budget.{key} must be a number, got {value!r}") from None
        if not math.isfinite(limit) or limit <= 0:
            raise BudgetError(f"budget.{key} must be a positive number, got {value!r}")
        limits[BUDGET_COLUMNS[key]] = limit
    return limits


def _fmt(column: str, value: float) -> str:
    if column == "latency_ms":
        return f"{value:.3g} ms"
    return f"{value:,.0f} ({value:.3g})"


def select_under_budget(rows: Sequence[Mapping[str, Any]], limits: Mapping[str, float], metric: str,
                        maximize: bool) -> Mapping[str, Any]:
    """The row with the best ``metric`` among those within every limit.

    Ties go to the smaller model (fewer parameters). Raises :class:`BudgetError` naming, for each
    limit, the smallest configuration the sweep found and its size.
    """
    if not limits:
        raise BudgetError("no budget set: give budget.params, budget.flops or budget.latency_ms")
    for column in limits:
        if any(row.get(column) is None for row in rows):
            raise BudgetError(f"budget on {column} but the sweep did not measure it "
                              f"({'turn on latency.enabled' if column == 'latency_ms' else 'missing column'})")
    fitting = [row for row in rows if all(row[c] <= limit for c, limit in limits.items())]
    if not fitting:
        parts = []
        for column, limit in limits.items():
            smallest = min(rows, key=lambda r: r[column])
            parts.append(f"{column} <= {_fmt(column, limit)}: the smallest configuration found is "
                         f"{smallest['name']} with {column} = {_fmt(column, smallest[column])}")
        raise BudgetError("no configuration of the sweep fits the budget; " + "; ".join(parts)
                          + ". Raise the budget or sweep smaller configurations (e.g. sweep=uniform)")
    sign = 1.0 if maximize else -1.0
    return max(fitting, key=lambda r: (sign * r[metric], -r["params"]))
