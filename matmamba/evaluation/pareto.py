"""Pareto frontier: the configurations no other configuration beats on both cost and quality."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(costs: Sequence[float], values: Sequence[float], maximize: bool = True) -> list[int]:
    """Indices of the frontier, cheapest first.

    A point is on it when every cheaper-or-equal point is strictly worse. Points whose cost or
    value is missing (None or NaN) are left out.
    """
    if len(costs) != len(values):
        raise ValueError(f"costs and values differ in length: {len(costs)} != {len(values)}")

    def present(x) -> bool:
        return x is not None and not (isinstance(x, float) and math.isnan(x))

    sign = 1.0 if maximize else -1.0
    points = [i for i in range(len(costs)) if present(costs[i]) and present(values[i])]
    # cheapest first; at equal cost the best first, so the others at that cost are dominated
    points.sort(key=lambda i: (costs[i], -sign * values[i]))
    front, best = [], -math.inf
    for i in points:
        if sign * values[i] > best:
            front.append(i)
            best = sign * values[i]
    return front
