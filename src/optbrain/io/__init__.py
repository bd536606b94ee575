"""Writing and reading compressed models: optbrain run directories (safetensors + JSON, no
pickle) and the deployable formats behind ``optbrain.export(model, path, format=...)``
(``formats``: packed safetensors, ONNX, compressed-tensors)."""

from .checkpoint import CheckpointError, load, save
from .formats import FORMATS, export
from .layers import ExportResult

__all__ = ["FORMATS", "CheckpointError", "ExportResult", "export", "load", "save"]
