"""LayerResult: the outcome of compressing one layer, shared by every layer-wise solver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .grid import QuantGrid


@dataclass
class LayerResult:
    """The outcome of compressing one layer ``W (rows, cols)``.

    weight: ``(rows, cols)`` compressed weight, W's dtype and device.
    mask: ``(rows, cols)`` bool, True where a weight was kept; None when nothing was pruned.
    loss: predicted layer loss ``½ Σ_r δ_r H δ_rᵀ`` (= ``||δ Xᵀ||² / N``) under the damped H.
    row_loss: ``(rows,)`` the same per row (float64, CPU).
    grid: the quantization grid when quantized (``weight`` lies on it), else None.
    damping: absolute λ added to diag H; fallback: policy step taken when inverting H, or None.
    trace: for unstructured / block ExactOBS, a ``PruneTrace`` giving every other sparsity level.
    """

    weight: torch.Tensor
    mask: torch.Tensor | None
    loss: float
    method: str
    sparsity: float = 0.0
    bits: int | None = None
    grid: QuantGrid | None = None
    damping: float = 0.0
    fallback: str | None = None
    row_loss: torch.Tensor | None = None
    trace: Any = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
