"""Whole-model API: ``compress(model, calibration, recipe) -> Report`` (``save``/``load``: export).

``compress`` finds every compressible layer (``optbrain.adapters``), asks the recipe what to do
with each, collects Hessians from the calibration data (``independent``: all layers from the
dense model in one pass, as OBC; ``sequential``: block by block from the compressed blocks
before, as GPTQ, or layer by layer in a model without a block list), solves each layer (per
group for grouped convolutions) with ``optbrain.core.layer.compress_layer``, writes the weights
back in place, and returns a ``Report``. What was done is kept on the model
(``model._optbrain``, a ``ModelState``) so that ``save`` can write it and ``load`` can apply it
to a fresh copy without recompressing. The traversal lives in ``optbrain.pipeline.compress``
(planning, calibration and solving, finishing), the state in ``optbrain.pipeline.state``.
``compress(..., executor="ray")`` runs the per-layer solves as Ray tasks
(``optbrain.pipeline.executor``). ``shrink(model, example_inputs)`` then removes for real the
channels / heads that a ``channels`` / ``heads`` pattern zeroed (``optbrain.pipeline.shrink``).
``refit(model, dense, calibration)`` re-solves every layer of a compressed model against the
dense model's outputs, zeros kept (``optbrain.pipeline.refit``; ``recipe.refit: true`` does it
inside ``compress``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from .pipeline.compress import compress as _compress
from .pipeline.data import take_samples
from .pipeline.executor import Executor, LocalExecutor, RayExecutor
from .pipeline.refit import RefitReport
from .pipeline.refit import refit_to_dense as refit
from .pipeline.shrink import ShrinkReport, shrink
from .pipeline.state import STATE_ATTR, compressed_state
from .recipe import Recipe
from .report import Report

__all__ = [
    "STATE_ATTR",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "RefitReport",
    "ShrinkReport",
    "compress",
    "compressed_state",
    "refit",
    "shrink",
    "take_samples",
]


def compress(
    model: nn.Module | str | os.PathLike,
    calibration: Any,
    recipe: Recipe | Mapping | str,
    *,
    offload: str | os.PathLike | None = None,
    **options: Any,
) -> Report:
    """``optbrain.pipeline.compress.compress`` (``options``: ``forward``, ``inputs``, ``quiet``,
    ``name``, ``executor``); with ``offload=DIR``, ``model`` is instead a local Hugging Face
    causal LM directory, compressed block by block from its safetensors shards into ``DIR``
    (``optbrain.pipeline.offload``: sequential calibration; ``DIR/model`` the result)."""
    if offload is None:
        return _compress(model, calibration, recipe, **options)  # type: ignore[arg-type]
    if isinstance(model, nn.Module):
        raise ValueError(
            "offload= reads the model from its files: pass the Hugging Face directory as "
            "model, not a loaded nn.Module"
        )
    extra = sorted(set(options) - {"quiet", "name"})
    if extra:
        raise ValueError(f"offload= takes quiet and name only, not {extra}")
    from .pipeline.offload import compress_offloaded

    return compress_offloaded(model, calibration, recipe, offload, **options)
