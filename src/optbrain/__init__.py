"""optbrain: post-training pruning and quantization with the Optimal Brain family of methods.

The public names below are imported on first use, so ``import optbrain`` is cheap and has no
side effect on the environment (the command-line entry point sets ``OMP_WAIT_POLICY`` before
torch is loaded).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "compress": ".api",
    "Executor": ".api",
    "LocalExecutor": ".api",
    "RayExecutor": ".api",
    "calibration_from": ".pipeline.calibration",
    "shrink": ".api",
    "ShrinkReport": ".api",
    "refit": ".api",
    "RefitReport": ".api",
    "QuantGrid": ".core.grid",
    "fit_grid": ".core.grid",
    "HessianAccumulator": ".core.hessian",
    "hessian_from_inputs": ".core.hessian",
    "layer_loss": ".core.hessian",
    "prepare_hessian": ".core.hessian",
    "compress_layer": ".core.layer",
    "prune_layer": ".core.layer",
    "quantize_layer": ".core.layer",
    "METHODS": ".core.methods",
    "LayerResult": ".core.result",
    "CompressSpec": ".core.spec",
    "export": ".io.formats",
    "load": ".io",
    "save": ".io",
    "Recipe": ".recipe",
    "LayerRecord": ".report",
    "Report": ".report",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time ``__getattr__`` imports lazily
    from .api import (
        Executor,
        LocalExecutor,
        RayExecutor,
        RefitReport,
        ShrinkReport,
        compress,
        refit,
        shrink,
    )
    from .core.grid import QuantGrid, fit_grid
    from .core.hessian import HessianAccumulator, hessian_from_inputs, layer_loss, prepare_hessian
    from .core.layer import compress_layer, prune_layer, quantize_layer
    from .core.methods import METHODS
    from .core.result import LayerResult
    from .core.spec import CompressSpec
    from .io import load, save
    from .io.formats import export
    from .pipeline.calibration import calibration_from
    from .recipe import Recipe
    from .report import LayerRecord, Report


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optbrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "METHODS",
    "CompressSpec",
    "Executor",
    "HessianAccumulator",
    "LayerResult",
    "LayerRecord",
    "LocalExecutor",
    "QuantGrid",
    "RayExecutor",
    "Recipe",
    "Report",
    "calibration_from",
    "compress",
    "compress_layer",
    "export",
    "fit_grid",
    "hessian_from_inputs",
    "layer_loss",
    "load",
    "prepare_hessian",
    "prune_layer",
    "quantize_layer",
    "save",
    "shrink",
    "ShrinkReport",
    "refit",
    "RefitReport",
]

from ._version import __version__  # noqa: E402,F401
