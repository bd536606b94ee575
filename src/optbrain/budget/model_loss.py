"""Model-level errors of database levels: output change when one layer's level is swapped in.

As in the OBC paper's database: the mean squared difference of the model's calibration outputs
from the dense model's, with only that layer compressed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter
from ..pipeline.data import Forward, calibration_mode, call_model, iter_batches, model_device
from ..pipeline.data import to_device as _to_device

__all__ = ["ModelLoss", "model_level_errors"]


def _outputs(obj: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().double()] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        return [t for k in obj for t in _outputs(obj[k])]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _outputs(o)]
    return []


class ModelLoss:
    """Model-level error: mean squared difference of the model outputs from the dense ones."""

    def __init__(
        self, model: nn.Module, batches: Sequence[Any], forward: Forward | None, inputs: str
    ) -> None:
        self.model, self.batches, self.forward, self.inputs = model, batches, forward, inputs
        self.dense = self._run()
        self.numel = sum(t.numel() for outs in self.dense for t in outs)
        if self.numel == 0:
            raise ValueError(
                "model_level=True needs model outputs with floating-point tensors; "
                "pass forward=fn(model, batch) returning one"
            )

    def _run(self) -> list[list[torch.Tensor]]:
        dev = model_device(self.model)
        outs = []
        with calibration_mode(self.model):
            for _, b in iter_batches(self.batches):
                out = call_model(self.model, _to_device(b, dev), self.forward, self.inputs)
                outs.append(_outputs(out))
        return outs

    def __call__(self) -> float:
        total = 0.0
        for dense, outs in zip(self.dense, self._run(), strict=True):
            for d, o in zip(dense, outs, strict=True):
                total += float(((o - d) ** 2).sum())
        return total / self.numel


def model_level_errors(
    adapter: LayerAdapter,
    entries: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    model_loss: ModelLoss,
) -> None:
    """Add ``model_loss`` to every level entry: swap that level's weights in, measure, restore."""
    dense = [adapter.weight(g) for g in range(adapter.groups)]
    for lid, entry in entries.items():
        if lid == "dense":
            entry["model_loss"] = 0.0
            continue
        try:
            for g, w in enumerate(dense):
                adapter.set_weight(g, tensors[f"{lid}/{g}/weight"].to(w.device))
            entry["model_loss"] = model_loss()
        finally:
            for g, w in enumerate(dense):
                adapter.set_weight(g, w)
