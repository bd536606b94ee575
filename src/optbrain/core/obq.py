"""OBQ: greedy one-weight-at-a-time quantization with exact OBS compensation, and OBC compound.

The same greedy engine as ExactOBS (``obs.greedy_single``) with target ``t_p = q(w_p)``, the
grid value of the *current* (already compensated) weight::

    p = argmin_p (q(w_p) − w_p)² / [H⁻¹]_pp,   w −= (w_p − q(w_p)) / [H⁻¹]_pp · H⁻¹[:, p]

The grid (per row, or per row and group) is fitted once on the weights before the greedy pass.

``slack = c > 0`` (default ``SLACK = ¼``, method "obc" option ``slack``) changes the choice to
``p = argmin_p ((q(w_p) − w_p)² − c·Δ_p²) / [H⁻¹]_pp`` (``Δ_p`` the grid step): the saving of
rounding ``p`` now against a rounding error of ``√c·Δ_p``, per unit of its importance
``1 / [H⁻¹]_pp``. Plain greedy (``c = 0``) fixes the cheap, unimportant weights first and leaves
the important ones to the end, when few free weights remain to absorb their rounding error: on an
axis-aligned ill-conditioned H (independent inputs with spread variances, few tokens) it loses to
GPTQ's fixed order. ``c = ¼`` (the worst in-range error ``Δ/2``) prefers important weights that
round well. (Diagnosis and the rule: the issue-16 research, branch obq16.)
Compound OBC first prunes (any pattern) and then quantizes the kept weights, starting each row
from the inverse Hessian of its kept coordinates, so pruned weights stay exactly zero.
"""

from __future__ import annotations

import torch

from . import obs_fused, ticks
from .grid import QuantGrid, quantize_values
from .hessian import PreparedHessian
from .obs import (
    DEFAULT_ENGINE,
    EngineConfig,
    GreedyOut,
    Scorer,
    greedy_single,
    restricted_cholesky,
    row_chunks,
    selected_positions,
)


class QuantScorer(Scorer):
    """OBQ saliency ``(q(w_p) − w_p)² / [H⁻¹]_pp``; target ``q(w_p)``.

    scale, zero: per-column grid parameters ``(R, C)`` (original columns).
    outliers: in a row where some weight's rounding error exceeds half a grid step (it lies
    outside the grid's range, e.g. pushed there by earlier compensation), the outlier with the
    largest error is quantized next instead of the cheapest one, so it cannot drift further
    (the rule of the original OBQ). Inside the range the error is at most half a step and the
    rule never fires.
    slack: ``c`` of the slack rule (module docstring); 0 is plain greedy OBQ.
    """

    def __init__(
        self,
        scale: torch.Tensor,
        zero: torch.Tensor,
        maxq: int,
        outliers: bool = True,
        slack: float = 0.0,
    ) -> None:
        self.scale_all, self.zero_all, self.maxq = scale, zero, maxq
        self.outliers = outliers
        self.slack = float(slack)
        self.scale = self.zero = None

    def fused(self):
        return {
            "mode": obs_fused.QUANT,
            "scale": self.scale_all,
            "zero": self.zero_all,
            "maxq": self.maxq,
            "outliers": self.outliers,
            "slack": self.slack,
        }

    def gather(self, pos):
        self.scale = self.scale_all.gather(1, pos)
        self.zero = self.zero_all.gather(1, pos)

    def __call__(self, w, d, alive, step):
        q = quantize_values(w, self.scale, self.zero, self.maxq)
        e = q - w
        err = e * e
        gain = err - self.slack * self.scale * self.scale if self.slack else err
        score = (gain / d).masked_fill_(~alive, float("inf"))
        if self.outliers:
            out = (err > 0.25 * self.scale * self.scale) & alive
            rows = out.any(1, keepdim=True)
            if bool(rows.any()):
                worst = (-err).masked_fill_(~out, float("inf"))
                score = torch.where(rows, worst, score)
        return score, q


def obq(
    W: torch.Tensor,
    prepared: PreparedHessian,
    grid: QuantGrid,
    keep: torch.Tensor | None = None,
    engine: EngineConfig = DEFAULT_ENGINE,
    outliers: bool = True,
    slack: float = 0.0,
) -> GreedyOut:
    """Quantize every (kept) weight of ``W (R, C)`` greedily onto ``grid``.

    keep: optional ``(R, C)`` bool mask of weights to quantize; the others must already be 0 in
    ``W`` (pruned) and stay exactly 0. Returns weights on the grid and the per-step losses.
    """
    R, C = W.shape
    scale, zero = grid.columns(C)
    scale, zero = scale.to(W.dtype), zero.to(W.dtype)
    whole = QuantScorer(scale, zero, grid.maxq, outliers, slack)
    if engine.fused_for(W, whole) and prepared.Hinv is not None:
        return _obq_fused(W, prepared.Hinv, whole, keep, engine)
    # every row (in every chunk) takes the same number of steps; rows with fewer kept weights
    # pad their working set with pruned coordinates (value 0, on the grid, decoupled: no cost)
    steps = C if keep is None else int(keep.sum(1).max().item())
    outs = []
    for _, sl in ticks.chunks(row_chunks(R, 2 * C * C * W.element_size(), engine.memory)):
        scorer = QuantScorer(scale[sl], zero[sl], grid.maxq, outliers, slack)
        if keep is None:
            outs.append(greedy_single(W[sl], prepared.Hinv, C, scorer, engine=engine))
            continue
        k = keep[sl]
        Wk = torch.where(k, W[sl], torch.zeros_like(W[sl]))
        if steps == 0:
            outs.append(
                GreedyOut(
                    Wk,
                    torch.zeros(k.shape[0], 0, dtype=torch.long),
                    torch.zeros(k.shape[0], 0, dtype=torch.float64),
                )
            )
            continue
        pos, valid = selected_positions(k, steps)
        # [H_FF]⁻¹: H⁻¹ after exact OBS downdates of the pruned coordinates
        Hinv = torch.cholesky_inverse(restricted_cholesky(prepared.H, pos, valid))
        out = greedy_single(Wk, Hinv, steps, scorer, pos=pos, engine=engine)
        out.weight = torch.where(k, out.weight, torch.zeros_like(out.weight))
        outs.append(out)
    return GreedyOut(
        torch.cat([o.weight for o in outs]),
        torch.cat([o.order for o in outs]),
        torch.cat([o.step_loss for o in outs]),
    )


def _obq_fused(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    scorer: QuantScorer,
    keep: torch.Tensor | None,
    engine: EngineConfig,
) -> GreedyOut:
    """``obq`` with the fused kernel. With ``keep``, each row first replays the removal of its
    pruned coordinates (already 0 in ``W``: no weight moves, ``H⁻¹`` is downdated to
    ``[H_FF]⁻¹``) and then quantizes the kept ones in the same pass — no per-row inverse of
    ``H_FF`` is formed. The returned order and losses are those of the quantization steps
    (rows with fewer kept weights are padded with their pruned coordinates, at zero loss)."""
    R, C = W.shape
    kw = dict(lazy=engine.lazy_for("fused"), progress=ticks.tick, **scorer.fused())
    if keep is None:
        return GreedyOut(*obs_fused.fused_greedy(W, Hinv, C, **kw))
    pruned = (~keep).sum(1)
    force = selected_positions(~keep, C)[0]  # pruned columns first
    Wk = torch.where(keep, W, torch.zeros_like(W))
    w, order, loss = obs_fused.fused_greedy(
        Wk, Hinv, C, force=force, force_counts=pruned, **kw
    )  # fmt: skip
    steps = int(keep.sum(1).max()) if R else 0
    idx = (pruned.unsqueeze(1) + torch.arange(steps)) % C
    w = torch.where(keep, w, torch.zeros_like(w))
    return GreedyOut(w, order.gather(1, idx), loss.gather(1, idx))
