"""The zoo's contract: what an entry provides and the registry."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    """A real model with its data, offline.

    load(): the dense model in eval mode (trained and cached, or read from an installed
      package). calibration(n, seed): a list of model inputs (batches) holding ``n`` samples,
      disjoint from the evaluation data. evaluate(model, dense=None, limit=None): named
      metrics (higher-is-better unless in ``lower_is_better``); ``dense`` enables agreement
      metrics; ``limit`` evaluates on a slice (smoke tests). inputs: the calibration
      convention for ``optbrain.compress`` ("all" or "first"). recipe: a sensible default.
      notes: caveats printed beside every table of this model. requires: import names of
      the optional packages the entry needs. lower_is_better: the metric names for which a
      smaller value is better (``perplexity``, ``kl``); every other metric is higher-is-better.
    """

    name: str
    description: str
    load: Callable[[], nn.Module]
    calibration: Callable[[int, int], list[Any]]
    evaluate: Callable[..., dict[str, float]]
    primary: str
    inputs: str = "all"
    recipe: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    requires: tuple[str, ...] = ()
    lower_is_better: tuple[str, ...] = ()


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    ZOO[entry.name] = entry
    return entry


def names() -> list[str]:
    return sorted(ZOO)


def get(name: str) -> ZooEntry:
    """The zoo entry ``name``; a ValueError lists the available ones."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(names())}")
    return ZOO[name]


def cache_dir() -> Path:
    """Where trained zoo models are cached: ``$OPTBRAIN_CACHE`` or ``~/.cache/optbrain``."""
    d = Path(os.environ.get("OPTBRAIN_CACHE", Path.home() / ".cache" / "optbrain"))
    d.mkdir(parents=True, exist_ok=True)
    return d
