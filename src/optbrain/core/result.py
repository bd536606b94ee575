"""Result and spec dataclasses shared by every layer-wise solver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .grid import QuantGrid
from .patterns import Pattern


@dataclass(frozen=True)
class CompressSpec:
    """What to do to one layer. Built and validated by ``optbrain.layerwise``.

    sparsity: pruned fraction in [0, 1) or None (no pruning; for N:M it is fixed by the pattern).
    pattern: parsed pruning pattern. bits: None for no quantization. sym / group_size: grid.
    damp: relative damping (λ = damp · mean diag H). dtype: compute dtype (float32 / float64).
    on_singular: policy when H cannot be inverted ("raise" | "damp" | "eig").
    options: method-specific knobs (e.g. ``block_size`` for GPTQ, ``act_order``).
    """

    sparsity: float | None = None
    pattern: Pattern = field(default_factory=lambda: Pattern("unstructured"))
    bits: int | None = None
    sym: bool = True
    group_size: int | None = None
    damp: float = 0.01
    dtype: torch.dtype = torch.float32
    on_singular: str = "damp"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def prunes(self) -> bool:
        return self.pattern.kind == "nm" or (self.sparsity is not None and self.sparsity > 0)

    @property
    def quantizes(self) -> bool:
        return self.bits is not None


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
