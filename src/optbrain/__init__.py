"""optbrain: post-training pruning and quantization with the Optimal Brain family of methods."""

from .core.grid import QuantGrid, fit_grid
from .core.hessian import HessianAccumulator, hessian_from_inputs, layer_loss, prepare_hessian
from .core.result import CompressSpec, LayerResult
from .layerwise import METHODS, compress_layer, prune_layer, quantize_layer

__all__ = [
    "METHODS",
    "CompressSpec",
    "HessianAccumulator",
    "LayerResult",
    "QuantGrid",
    "compress_layer",
    "fit_grid",
    "hessian_from_inputs",
    "layer_loss",
    "prepare_hessian",
    "prune_layer",
    "quantize_layer",
]

__version__ = "0.1.0"
