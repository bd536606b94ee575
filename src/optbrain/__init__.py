"""optbrain: post-training pruning and quantization with the Optimal Brain family of methods."""

import os as _os

# OpenMP threads that spin while waiting make small tensor ops 10-100x slower whenever another
# process competes for the cores (shared machines, CI). Passive waiting costs little when the
# machine is idle. Only effective if torch was not imported before optbrain.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import compress
from .core.grid import QuantGrid, fit_grid
from .core.hessian import HessianAccumulator, hessian_from_inputs, layer_loss, prepare_hessian
from .core.result import CompressSpec, LayerResult
from .export import load, save
from .layerwise import METHODS, compress_layer, prune_layer, quantize_layer
from .recipe import Recipe
from .report import LayerRecord, Report

__all__ = [
    "METHODS",
    "CompressSpec",
    "HessianAccumulator",
    "LayerResult",
    "LayerRecord",
    "QuantGrid",
    "Recipe",
    "Report",
    "compress",
    "compress_layer",
    "fit_grid",
    "hessian_from_inputs",
    "layer_loss",
    "load",
    "prepare_hessian",
    "prune_layer",
    "quantize_layer",
    "save",
]

__version__ = "0.1.0"
