"""Writing and reading compressed models: safetensors + JSON, no pickle; deployable formats.

``optbrain.export`` is this package and, called, ``optbrain.export.formats.export``:
``optbrain.export(model, path, format="onnx", example_inputs=x)`` works, and so does
``from optbrain.export import load``.
"""

import sys
import types
from typing import Any

from .checkpoint import CheckpointError, load, save
from .formats import FORMATS, export
from .layers import ExportResult


class _CallablePackage(types.ModuleType):
    """This package, callable as ``export``: the top-level name ``optbrain.export`` is the
    function the issue asks for and the package its parts live in (an import of a submodule
    rebinds the attribute to the package, so the two must be one object)."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["FORMATS", "CheckpointError", "ExportResult", "export", "load", "save"]
