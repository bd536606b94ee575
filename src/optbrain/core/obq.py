"""OBQ: greedy one-weight-at-a-time quantization with exact OBS compensation, and OBC compound.

The same greedy engine as ExactOBS (``obs.greedy_single``) with target ``t_p = q(w_p)``, the
grid value of the *current* (already compensated) weight::

    p = argmin_p (q(w_p) − w_p)² / [H⁻¹]_pp,   w −= (w_p − q(w_p)) / [H⁻¹]_pp · H⁻¹[:, p]

The grid (per row, or per row and group) is fitted once on the weights before the greedy pass.
Compound OBC first prunes (any pattern) and then quantizes the kept weights, starting each row
from the inverse Hessian of its kept coordinates, so pruned weights stay exactly zero.
"""

from __future__ import annotations

import torch

from .grid import QuantGrid, quantize_values
from .hessian import PreparedHessian
from .obs import DEFAULT_LAZY, GreedyOut, Scorer, greedy_single, row_chunks


def quant_scorer(scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> Scorer:
    """OBQ saliency ``(q(w_p) − w_p)² / [H⁻¹]_pp`` with per-column ``scale, zero (R, C)``."""

    def scorer(w: torch.Tensor, d: torch.Tensor, alive: torch.Tensor,
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = quantize_values(w, scale, zero, maxq)
        e = q - w
        score = torch.where(alive, e * e / d, torch.full_like(w, float("inf")))
        return score, q

    return scorer


def masked_inverse(H: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-row inverse of H restricted to kept coordinates, padded with identity.

    H: ``(C, C)``, keep: ``(R, C)`` bool → ``(R, C, C)`` with ``[H_FF]⁻¹`` on ``F × F``
    (equal to H⁻¹ after exact OBS downdates of the pruned coordinates) and ``I`` elsewhere.
    """
    C = H.shape[0]
    eye = torch.eye(C, dtype=H.dtype, device=H.device)
    both = keep.unsqueeze(2) & keep.unsqueeze(1)
    A = torch.where(both, H.unsqueeze(0), eye)
    L, _ = torch.linalg.cholesky_ex(A)
    return torch.cholesky_inverse(L)


def obq(W: torch.Tensor, prepared: PreparedHessian, grid: QuantGrid,
        keep: torch.Tensor | None = None, lazy: int = DEFAULT_LAZY,
        memory: int | None = None) -> GreedyOut:
    """Quantize every (kept) weight of ``W (R, C)`` greedily onto ``grid``.

    keep: optional ``(R, C)`` bool mask of weights to quantize; the others must already be 0 in
    ``W`` (pruned) and stay exactly 0. Returns weights on the grid and the per-step losses.
    """
    R, C = W.shape
    scale, zero = grid.columns(C)
    scale, zero = scale.to(W.dtype), zero.to(W.dtype)
    outs = []
    for sl in row_chunks(R, C, W.element_size(), memory):
        scorer = quant_scorer(scale[sl], zero[sl], grid.maxq)
        if keep is None:
            out = greedy_single(W[sl], prepared.Hinv, C, scorer, lazy=lazy)
        else:
            k = keep[sl]
            # every row has the same number of steps; rows with fewer kept weights spend the
            # surplus steps on already-zero pruned coordinates at zero cost.
            steps = int(k.sum(1).max().item())
            if steps == 0:
                outs.append(GreedyOut(torch.zeros_like(W[sl]),
                                      torch.zeros(k.shape[0], 0, dtype=torch.long),
                                      torch.zeros(k.shape[0], 0, dtype=torch.float64)))
                continue
            Hinv = masked_inverse(prepared.H, k)
            alive = _pad_alive(k, steps)
            out = greedy_single(torch.where(k, W[sl], torch.zeros_like(W[sl])), Hinv, steps,
                                scorer, alive=alive, lazy=lazy)
            out.weight = torch.where(k, out.weight, torch.zeros_like(out.weight))
        outs.append(out)
    return GreedyOut(torch.cat([o.weight for o in outs]), torch.cat([o.order for o in outs]),
                     torch.cat([o.step_loss for o in outs]))


def _pad_alive(keep: torch.Tensor, steps: int) -> torch.Tensor:
    """Alive mask giving every row exactly ``steps`` choosable coordinates.

    Rows with fewer kept weights get some pruned coordinates (value 0, always on the grid,
    zero quantization error, decoupled in the padded inverse) to fill their surplus steps.
    """
    alive = keep.clone()
    short = steps - keep.sum(1)
    if bool((short > 0).any()):
        pruned_rank = torch.cumsum((~keep).long(), 1)
        extra = (~keep) & (pruned_rank <= short.unsqueeze(1))
        alive |= extra
    return alive
