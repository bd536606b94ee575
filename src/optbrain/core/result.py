"""LayerResult, the outcome of compressing one layer, and layer_result, its one builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .grid import QuantGrid

if TYPE_CHECKING:
    from .hessian import PreparedHessian
    from .spec import CompressSpec


#: A layer solver: ``(W (rows, cols), H (cols, cols), spec) -> LayerResult`` (``core.methods``).
Solver = Callable[[torch.Tensor, torch.Tensor, "CompressSpec"], "LayerResult"]
#: A solver's option check: raises ``SettingError`` on a bad option, before any work.
Check = Callable[["CompressSpec"], Any]


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


def layer_result(
    method: str,
    spec: CompressSpec,
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    row_loss: torch.Tensor,
    *,
    prep: PreparedHessian | None = None,
    grid: QuantGrid | None = None,
    loss: float | None = None,
    trace: Any = None,
    info: dict[str, Any] | None = None,
) -> LayerResult:
    """The one assembly of a solver's ``LayerResult`` (every method in ``core.methods`` uses it).

    ``spec`` is the layer's ``CompressSpec`` (its ``bits`` and ``pattern`` are recorded, the
    pattern first in ``info``), ``prep`` the ``PreparedHessian`` it ran on (damping, fallback;
    None when nothing ran), ``row_loss`` the per-row loss; ``loss`` defaults to its sum.
    """
    return LayerResult(
        weight=weight,
        mask=mask,
        loss=float(row_loss.sum()) if loss is None else loss,
        method=method,
        bits=spec.bits,
        grid=grid,
        damping=prep.damping if prep is not None else 0.0,
        fallback=prep.fallback if prep is not None else None,
        row_loss=row_loss,
        trace=trace,
        info={"pattern": str(spec.pattern), **(info or {})},
    )


def unchanged(
    W: torch.Tensor, method: str, spec: CompressSpec, *, with_pattern: bool = True
) -> LayerResult:
    """Nothing asked (sparsity 0, no bits): ``W`` returned exactly, loss 0.

    ``with_pattern=False`` leaves ``info`` empty (what ``method="obc"`` has always returned).
    """
    return LayerResult(
        weight=W.clone(),
        mask=None,
        loss=0.0,
        method=method,
        row_loss=torch.zeros(W.shape[0], dtype=torch.float64),
        info={"pattern": str(spec.pattern)} if with_pattern else {},
    )
