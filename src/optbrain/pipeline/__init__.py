"""The pipeline: calibration passes, the model traversal and the compressed-layer state.

* ``compress.compress`` — THE traversal behind ``optbrain.compress`` (plan, solve, finish).
* ``state.ModelState`` — the typed compressed-layer state kept on a model (save / load).
* ``data.forward_batches`` — THE calibration forward loop every pass goes through.
* ``collect_hessians`` — independent (OBC) mode: all targets from the dense model, one pass.
* ``sequential_compress`` / ``find_blocks`` — sequential (GPTQ) mode, block by block.
* ``recalibrate_batchnorm`` — re-estimate batch-norm running statistics.
* ``trace_input_shapes`` — input shapes of target layers on one batch (for cost models).

The batch convention (tensors, tuples, dicts, DataLoaders, ``inputs="first"``, ``forward=``)
and the error types are described in ``optbrain.pipeline.data``.
"""

from .batchnorm import recalibrate_batchnorm
from .data import CalibrationError, NonFiniteActivationError
from .hessians import collect_hessians, trace_input_shapes
from .sequential import find_blocks, sequential_compress

__all__ = [
    "CalibrationError",
    "NonFiniteActivationError",
    "collect_hessians",
    "find_blocks",
    "recalibrate_batchnorm",
    "sequential_compress",
    "trace_input_shapes",
]
