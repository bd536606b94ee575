"""Whole-model API: ``compress(model, calibration, recipe) -> Report`` (``save``/``load``: export).

``compress`` finds every compressible layer (``optbrain.adapters``), asks the recipe what to do
with each, collects Hessians from the calibration data (``independent``: all layers from the
dense model in one pass, as OBC; ``sequential``: block by block from the compressed blocks
before, as GPTQ, or layer by layer in a model without a block list), solves each layer (per
group for grouped convolutions) with ``optbrain.core.layer.compress_layer``, writes the weights
back in place, and returns a ``Report``. What was done is kept on the model
(``model._optbrain``, a ``ModelState``) so that ``save`` can write it and ``load`` can apply it
to a fresh copy without recompressing. The traversal itself lives in
``optbrain.pipeline.compress``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .pipeline.compress import compress_model
from .pipeline.data import Forward, take_samples
from .pipeline.state import STATE_ATTR, compressed_state
from .recipe import Recipe
from .report import Report

__all__ = ["STATE_ATTR", "compress", "compressed_state", "take_samples"]


def compress(
    model: nn.Module,
    calibration: Any,
    recipe: Recipe | Mapping | str,
    *,
    forward: Forward | None = None,
    inputs: str = "all",
    quiet: bool = False,
    name: str | None = None,
) -> Report:
    """Compress ``model`` in place following ``recipe``; returns the per-layer ``Report``.

    calibration: an iterable of model inputs — tensors, tuples (positional arguments), dicts
      (keyword arguments, as transformers models take them) or a DataLoader of those; for
      labelled ``(x, y)`` batches pass ``inputs="first"``, or ``forward=fn(model, batch)``.
      At most ``recipe.calibration.samples`` samples are used.
    recipe: a ``Recipe``, a dict (shortest form ``{"method": "obc", "sparsity": 0.5}``) or a
      YAML path.
    quiet: no progress line.
    If anything fails (a calibration forward, a solver), no hook is left behind and the
    weights written so far are put back: the model is left as it was.
    """
    return compress_model(
        model, calibration, recipe, forward=forward, inputs=inputs, quiet=quiet, name=name
    )
