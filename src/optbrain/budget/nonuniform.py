"""Per-layer sparsities from the budget DP, for a recipe: the DP's allocation, refitted.

The database + DP choose one level per layer from errors measured with every layer compressed
alone on the dense model's inputs (independent mode). On language models the weights worth
keeping are then those of a *sequential* solve (each block fitted to the compressed model's
inputs), so the DP's choice is best used as a per-layer sparsity in a recipe run sequentially::

    per_layer = dp_sparsities(model, batches, 0.5, db_dir="db/")     # {layer: sparsity}
    recipe = with_sparsities({"method": "sparsegpt", "sparsity": 0.5,
                              "calibration": {"mode": "sequential"}}, per_layer)
    optbrain.compress(model, batches, recipe)

``dp_sparsities`` builds (or reuses) a database of unstructured levels around the target
(``sparsity_grid``), with model-level errors by default (the mean squared change of the model
outputs when only that layer is swapped in; the DP sums them, as in the OBC paper), and solves
``params = 1 − sparsity`` over the compressible layers. ``allocation_sparsities`` reads the
sparsities of any allocation of unstructured levels; ``with_sparsities`` appends one exact-name
rule per layer to a recipe (its method, bits and calibration stay).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..pipeline.data import Forward, take_samples
from ..recipe import Recipe
from .api import Allocation, plan_allocation
from .database import DbSettings, build_database
from .levels import Level
from .store import database_root

#: the database levels around a target sparsity ``s``: ``s + k·step`` for these ``k``
GRID_STEPS = (-2, -1, 0, 1, 2)
GRID_STEP = 0.1


def sparsity_grid(sparsity: float, steps: Sequence[int] = GRID_STEPS) -> list[str]:
    """Level ids ``s{s + k·0.1}`` inside ``(0, 1)`` for the DP to pick from."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise ValueError(f"sparsity must be a number in (0, 1), got {sparsity!r}")
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")
    out = []
    for k in steps:
        s = round(sparsity + k * GRID_STEP, 4)
        if 0.0 < s < 1.0:
            out.append(Level(sparsity=s).id)
    return out


def allocation_sparsities(alloc: Allocation) -> dict[str, float]:
    """The unstructured sparsity of each layer's chosen level (0 for dense); an allocation
    with N:M, structured or quantized levels is refused (it is not a sparsity per layer)."""
    out = {}
    for name, lid in alloc.levels.items():
        lv = Level.parse(lid)
        if lv.quantizes or lv.pattern is not None:
            raise ValueError(
                f"layer {name}: level {lid!r} is not an unstructured sparsity; "
                "allocation_sparsities reads allocations of unstructured levels only"
            )
        out[name] = float(lv.sparsity)
    return out


def with_sparsities(recipe: Recipe | Mapping | str, per_layer: Mapping[str, float]) -> Recipe:
    """``recipe`` with one rule per layer appended setting its ``sparsity`` (exact-name
    targets; a layer at sparsity 0 is skipped, i.e. left dense). The other settings stay."""
    d = Recipe.coerce(recipe).to_dict()
    for name, s in per_layer.items():
        target = "re:" + re.escape(name)
        if s <= 0:
            d["rules"].append({"targets": [target], "skip": True})
        else:
            d["rules"].append({"targets": [target], "sparsity": round(float(s), 6)})
    return Recipe.from_dict(d)


def dp_sparsities(
    model: nn.Module,
    calibration: Any,
    sparsity: float,
    *,
    levels: Sequence[str] | None = None,
    db_dir: str | Path | None = None,
    model_level: bool = True,
    model_level_samples: int | None = 16,
    solver: str = "fast",
    samples: int | None = None,
    forward: Forward | None = None,
    inputs: str = "all",
    quiet: bool = True,
) -> dict[str, float]:
    """The DP's sparsity per compressible layer at overall ``sparsity`` (a ``params`` target
    of ``1 − sparsity``), from a database of ``levels`` (default ``sparsity_grid``) built
    with ``solver`` ("fast": SparseGPT per level; "obc" / "auto" as ``build_database``)."""
    grid = list(levels) if levels is not None else sparsity_grid(sparsity)
    batches = take_samples(calibration, samples)
    settings = DbSettings(
        solver=solver,
        model_level=model_level,
        model_level_samples=model_level_samples if model_level else None,
    )
    with database_root(db_dir) as root:
        db = build_database(
            model,
            batches,
            root,
            grid,
            settings=settings,
            forward=forward,
            inputs=inputs,
            quiet=quiet,
        )
        objective = "model" if model_level else "relative"
        alloc = plan_allocation(db, f"params={1.0 - float(sparsity):.6g}", objective)
    return allocation_sparsities(alloc)
