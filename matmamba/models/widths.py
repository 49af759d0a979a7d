"""Widths of a nested MatMamba2 block: which are valid, and how the published knobs map onto them.

A width ``w`` is a model-dimension budget: the block at width ``w`` uses ``k = expand * w / headdim``
of its heads (the first ``k``). It is valid when ``expand * w`` is a positive multiple of
``headdim`` and ``w <= d_model``. The published API names it ``mixnmatch_dims``; its
``mrl_level = m`` means ``w = d_model / m``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd

WidthSpec = int | Sequence[int] | None


def width_step(expand: int, headdim: int) -> int:
    """Smallest valid width: ``expand * w`` must be a multiple of ``headdim``."""
    return headdim // gcd(expand, headdim)


def valid_widths(d_model: int, expand: int, headdim: int, max_width: int | None = None) -> list[int]:
    """Valid widths up to ``max_width`` (default d_model; less for an exported, narrower block)."""
    step = width_step(expand, headdim)
    return list(range(step, (d_model if max_width is None else max_width) + 1, step))


def describe_valid_widths(d_model: int, expand: int, headdim: int, max_width: int | None = None) -> str:
    widths = valid_widths(d_model, expand, headdim, max_width)
    step = width_step(expand, headdim)
    shown = ", ".join(map(str, widths)) if len(widths) <= 8 else (
        ", ".join(map(str, widths[:4])) + ", ..., " + ", ".join(map(str, widths[-2:])))
    return f"multiples of {step} from {step} to {widths[-1] if widths else step} ({shown})"


def check_width(width, d_model: int, expand: int, headdim: int, max_width: int | None = None) -> int:
    """Return ``width`` as an int if valid, else raise a ValueError naming the valid widths."""
    if isinstance(width, bool) or not isinstance(width, int):
        try:
            import numpy as np  # accept numpy / torch integer scalars
            if isinstance(width, np.integer):
                width = int(width)
        except ImportError:  # pragma: no cover
            pass
        if hasattr(width, "item") and getattr(width, "ndim", 1) == 0:
            width = int(width.item())
    if isinstance(width, bool) or not isinstance(width, int):
        raise ValueError(f"width must be an int, got {width!r} ({type(width).__name__}); valid widths "
                         f"for d_model={d_model}: {describe_valid_widths(d_model, expand, headdim, max_width)}")
    limit = d_model if max_width is None else max_width
    if width <= 0 or width > limit or (expand * width) % headdim != 0:
        raise ValueError(
            f"invalid width {width} for d_model={d_model}, expand={expand}, headdim={headdim}: "
            f"expand*width must be a positive multiple of headdim and width <= {limit}. Valid widths: "
            f"{describe_valid_widths(d_model, expand, headdim, max_width)}")
    return width


def width_from_mrl_level(mrl_level, d_model: int) -> int:
    if isinstance(mrl_level, bool) or not isinstance(mrl_level, int) or mrl_level <= 0 or d_model % mrl_level:
        divisors = [m for m in range(1, d_model + 1) if d_model % m == 0]
        raise ValueError(f"mrl_level must be a positive divisor of d_model={d_model} "
                         f"(width = d_model / mrl_level), got {mrl_level!r}; divisors: {divisors[:12]}"
                         f"{' ...' if len(divisors) > 12 else ''}")
    return d_model // mrl_level


def per_layer_widths(width: WidthSpec, mrl_level, n_layer: int, d_model: int) -> list[int | None]:
    """Expand a model-level width spec into one entry per layer (None = the layer decides)."""
    if width is not None and mrl_level is not None:
        raise ValueError("give either width= or mrl_level=, not both")
    if mrl_level is not None:
        return [width_from_mrl_level(mrl_level, d_model)] * n_layer
    if width is None:
        return [None] * n_layer
    if isinstance(width, Sequence) and not isinstance(width, str):
        widths = list(width)
        if len(widths) != n_layer:
            raise ValueError(f"a per-layer width list needs one width per layer: got {len(widths)} "
                             f"widths for a model with n_layer={n_layer}")
        return widths
    if isinstance(width, int):  # (also a SymInt under torch.compile, which has no hasattr)
        return [width] * n_layer
    if hasattr(width, "tolist") and getattr(width, "ndim", 0) == 1:
        return per_layer_widths(width.tolist(), None, n_layer, d_model)
    return [width] * n_layer
