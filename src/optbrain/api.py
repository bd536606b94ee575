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
"""

from __future__ import annotations

from .pipeline.compress import compress
from .pipeline.data import take_samples
from .pipeline.executor import Executor, LocalExecutor, RayExecutor
from .pipeline.shrink import ShrinkReport, shrink
from .pipeline.state import STATE_ATTR, compressed_state

__all__ = [
    "STATE_ATTR",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "ShrinkReport",
    "compress",
    "compressed_state",
    "shrink",
    "take_samples",
]
