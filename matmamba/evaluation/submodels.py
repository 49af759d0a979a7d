"""Which submodels a sweep evaluates: trained widths, uniform widths, published mixes, random mixes, lists.

A configuration is one width per layer. Uniform configurations use one width everywhere; a
mix'n'match configuration gives layers different widths. Every configuration is validated
against the model up front, so an invalid width fails before any evaluation starts.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

log = logging.getLogger(__name__)

KINDS = ("trained", "uniform", "mix", "random", "list")


class SweepError(ValueError):
    """A sweep setting or configuration is invalid (the message names the valid widths)."""


@dataclass(frozen=True)
class Submodel:
    """One configuration of a nested model: a width for each layer.

    ``kind`` says which part of the sweep produced it (the first one, if several did);
    ``trained`` is true for a width trained jointly (used by every layer), and for an exported
    dense model's own configuration.
    """

    widths: tuple[int, ...]
    kind: str
    trained: bool = False

    @property
    def name(self) -> str:
        """Run-length label: ``128`` for a uniform model, ``128x2+64x2`` for a mix."""
        runs = [(w, len(list(group))) for w, group in itertools.groupby(self.widths)]
        if len(runs) == 1:
            return str(runs[0][0])
        return "+".join(f"{w}x{n}" for w, n in runs)

    @property
    def uniform_width(self) -> int | None:
        return self.widths[0] if len(set(self.widths)) == 1 else None

    @property
    def spec(self) -> int | list[int]:
        """What ``model(x, width=...)`` and ``model.extract(...)`` take for this configuration."""
        w = self.uniform_width
        return w if w is not None else list(self.widths)


def full_widths(model: nn.Module) -> list[int]:
    """Each layer's widest width (d_model for a nested model; less in an exported dense one)."""
    return [layer.mixer.resolve_width(None) for layer in model.layers]


def trained_widths(model: nn.Module) -> list[int]:
    """The widths trained jointly, widest first (none for an exported dense model)."""
    return sorted({int(w) for w in model.widths_default}, reverse=True)


def trained_configurations(model: nn.Module) -> list[tuple[int, ...]]:
    """Each trained width in every layer; for an exported dense model, the model itself (each
    layer at its own full width, which may differ per layer)."""
    n_layer = len(model.layers)
    widths = trained_widths(model)
    return [(w,) * n_layer for w in widths] if widths else [tuple(full_widths(model))]


def common_valid_widths(model: nn.Module) -> list[int]:
    """Widths valid in every layer, ascending."""
    limit = min(full_widths(model))
    return [w for w in model.valid_widths() if w <= limit]


def uniform_widths(model: nn.Module, step: int = 1) -> list[int]:
    """Every ``step``-th valid width counted down from the widest, so the widest is always in."""
    if not isinstance(step, int) or step < 1:
        raise SweepError(f"sweep.step must be a positive integer, got {step!r}")
    return sorted(common_valid_widths(model), reverse=True)[::step]


def published_mixes(widths: Sequence[int], n_layer: int, mix_layers: Iterable[int] | None = None) -> list[list[int]]:
    """The first k layers at width a and the other n_layer - k at width b, for every ordered pair
    a != b of ``widths`` and every k in ``mix_layers`` (default 1 .. n_layer - 1).

    Ordered pairs cover both directions: "last k layers at a, the rest at b" is the first
    n_layer - k layers at b and the rest at a.
    """
    ks = list(range(1, n_layer)) if mix_layers is None else [int(k) for k in mix_layers]
    bad = [k for k in ks if not 1 <= k < n_layer]
    if bad:
        raise SweepError(f"sweep.mix_layers must lie in [1, n_layer - 1 = {n_layer - 1}], got {bad}")
    return [[a] * k + [b] * (n_layer - k) for a, b in itertools.permutations(widths, 2) for k in ks]


def random_mixes(choices: Sequence[int], n_layer: int, count: int, seed: int,
                 exclude: Iterable[tuple[int, ...]] = ()) -> list[list[int]]:
    """``count`` distinct per-layer mixes, each layer drawn uniformly from ``choices``.

    Mixes already in ``exclude`` are not drawn again. Fewer come back (with a warning) when the
    space of mixes is too small to hold ``count`` new ones.
    """
    if not isinstance(count, int) or count < 0:
        raise SweepError(f"sweep.random must be a non-negative integer, got {count!r}")
    choices = sorted(set(choices))
    rng = random.Random(seed)
    seen = set(exclude)
    room = len(choices) ** n_layer - len([m for m in seen if all(w in choices for w in m)])
    target = min(count, room)
    if target < count:
        log.warning("only %d new random mixes exist over %s in %d layers; asked for %d", target, choices,
                    n_layer, count)
    mixes: list[list[int]] = []
    while len(mixes) < target:
        mix = tuple(rng.choice(choices) for _ in range(n_layer))
        if mix not in seen:
            seen.add(mix)
            mixes.append(list(mix))
    return mixes


def _as_layer_widths(spec: Any, n_layer: int) -> tuple[int, ...]:
    if isinstance(spec, bool):
        raise SweepError(f"a width must be an int or a list of one int per layer, got {spec!r}")
    if isinstance(spec, int):
        return (spec,) * n_layer
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.lstrip("-").isdigit():
            return (int(spec),) * n_layer
        raise SweepError(f"a width must be an int or a list of one int per layer, got {spec!r}")
    if isinstance(spec, Sequence):
        widths = tuple(spec)
        if len(widths) != n_layer or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            raise SweepError(f"a per-layer configuration needs {n_layer} integer widths (one per layer), "
                             f"got {list(widths)}")
        return widths
    raise SweepError(f"a width must be an int or a list of one int per layer, got {spec!r}")


def validate(model: nn.Module, submodel: Submodel) -> None:
    """Raise a ValueError naming the configuration and the valid widths if it does not fit the model."""
    try:
        model.layer_heads(list(submodel.widths))
    except ValueError as e:
        raise SweepError(f"configuration {submodel.name} ({submodel.kind}): {e}") from None


def build_sweep(model: nn.Module, sweep: Mapping[str, Any], width: Any = None) -> list[Submodel]:
    """The configurations a sweep config asks for, deduplicated, in a stable order.

    ``sweep`` keys (``conf/sweep/*.yaml``): ``trained``, ``uniform`` + ``step``, ``mixes`` +
    ``mix_layers``, ``configs`` (explicit list), ``random`` + ``seed`` + ``choices``. ``width``
    (an int or per-layer list) replaces the whole sweep with that one configuration.
    """
    n_layer = len(model.layers)
    trained = trained_widths(model)
    trained_configs = trained_configurations(model)
    candidates: list[tuple[tuple[int, ...], str]] = []

    if width is not None:
        candidates.append((_as_layer_widths(width, n_layer), "list"))
    else:
        unknown = sorted(set(sweep) - {"trained", "uniform", "step", "mixes", "mix_layers", "random", "seed",
                                       "choices", "configs"})
        if unknown:
            raise SweepError(f"unknown sweep keys {unknown}; see conf/sweep/trained.yaml")
        if sweep.get("trained", True):
            candidates += [(widths, "trained") for widths in trained_configs]
        if sweep.get("uniform", False):
            candidates += [((w,) * n_layer, "uniform") for w in uniform_widths(model, sweep.get("step", 1))]
        if sweep.get("mixes", False):
            if len(trained) < 2 or n_layer < 2:
                log.warning("published mixes need two trained widths and two layers; none added")
            else:
                mixes = published_mixes(trained, n_layer, sweep.get("mix_layers"))
                candidates += [(tuple(m), "mix") for m in mixes]
        candidates += [(_as_layer_widths(c, n_layer), "list") for c in sweep.get("configs") or []]

    submodels: dict[tuple[int, ...], Submodel] = {}
    for widths, kind in candidates:
        if widths not in submodels:
            submodels[widths] = Submodel(widths, kind, trained=widths in trained_configs)

    count = 0 if width is not None else sweep.get("random", 0) or 0
    if count:
        choices_name = sweep.get("choices", "trained")
        if choices_name not in ("trained", "valid"):
            raise SweepError(f"sweep.choices must be 'trained' or 'valid', got {choices_name!r}")
        choices = trained if choices_name == "trained" and trained else common_valid_widths(model)
        for mix in random_mixes(choices, n_layer, count, int(sweep.get("seed", 0)), exclude=submodels):
            submodels[tuple(mix)] = Submodel(tuple(mix), "random")

    result = list(submodels.values())
    if not result:
        raise SweepError("the sweep is empty: enable sweep.trained, sweep.uniform, sweep.mixes, sweep.random "
                         "or list sweep.configs (or pass width=...)")
    for submodel in result:
        validate(model, submodel)
    return result
