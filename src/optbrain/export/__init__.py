"""Writing and reading compressed models: safetensors + JSON, no pickle."""

from .checkpoint import CheckpointError, load, save

__all__ = ["CheckpointError", "load", "save"]
