"""Structured OBS over a tied group: one channel set shared by several consumer layers.

Channels tied by a residual add (the stream of a ResNet) can only be removed from ALL the
layers that read them at once. Layer ``l`` of the group has ``W_l (rows_l, n · g_l)`` and its
own ``H_l (n · g_l, n · g_l)`` (``H = 2 Xᵀ X / N``, ``core/hessian.py``); channel ``c`` is the
columns ``B_l(c) = [c · g_l, (c + 1) · g_l)`` of every layer (``g_l = kh · kw`` for a conv, 1 for
a Linear after global pooling). The problems of the layers are independent given the removed
set ``S``, so the group's loss is the sum of the per-layer structured optima::

    loss(S) = Σ_l ½ Σ_r δ_{l,r} H_l δ_{l,r}ᵀ       (each layer at its own optimum for S)

Greedy structured OBS over the group: remove the channel ``c`` of least summed cost, then
compensate every layer with its own ``H_l⁻¹`` (``M = [H_l⁻¹]_BB``, ``B = B_l(c)``)::

    cost(c) = Σ_l ½ tr(W_{l,B} M⁻¹ W_{l,B}ᵀ)
    W_l    -= W_{l,B} M⁻¹ H_l⁻¹[B, :]
    H_l⁻¹  -= H_l⁻¹[:, B] M⁻¹ H_l⁻¹[B, :]

Each step's cost is exactly the increase of ``loss(S)`` (the block OBS identity per layer), so
the step losses sum to ``loss(S)`` of the removed set. One run records the whole removal order
(``GroupTrace``); the weights at any level are the closed-form optima for the kept columns
(``structured_optimum``). Tiny example: two layers with diagonal ``H`` whose channel 0 costs
1 + 1 and channel 1 costs 3 + 0.5: the group removes channel 0 (2 < 3), although layer 2 alone
would remove channel 1.

Baselines (no compensation): ``magnitude`` sums the channel's L2 norms over the layers,
``obd`` sums the diagonal saliencies ``Σ ½ W_B² diag(H)_B``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .hessian import PreparedHessian, row_losses
from .spec import DEFAULT_DAMP
from .structured import (
    STRUCTURED_METHODS,
    RemovalOrder,
    _prepare,
    group_columns,
    group_scores,
    removed_count,
    structured_optimum,
)

__all__ = ["GroupResult", "GroupTrace", "group_obs", "solve_group"]


def _check(Ws: Sequence[torch.Tensor], group_sizes: Sequence[int]) -> int:
    """The channel count ``n`` shared by all layers (each ``cols_l = n · g_l``)."""
    if not Ws or len(Ws) != len(group_sizes):
        raise ValueError(
            f"a tied group needs one group size per layer and at least one layer, got "
            f"{len(Ws)} weights and {len(group_sizes)} group sizes"
        )
    ns = set()
    for W, g in zip(Ws, group_sizes, strict=True):
        if W.dim() != 2 or int(g) < 1 or W.shape[1] % int(g):
            raise ValueError(f"group size {g} does not divide the columns of W {tuple(W.shape)}")
        ns.add(W.shape[1] // int(g))
    if len(ns) != 1:
        raise ValueError(f"the layers of a tied group must share one channel count, got {ns}")
    return ns.pop()


def _block_costs(W: torch.Tensor, Hinv: torch.Tensor, g: int) -> torch.Tensor:
    """``½ tr(W_B [H⁻¹]_BB⁻¹ W_Bᵀ)`` of every channel ``(n,)`` (batched g×g solves)."""
    n = W.shape[1] // g
    M = Hinv.reshape(n, g, n, g).diagonal(0, 0, 2).permute(2, 0, 1)  # (n, g, g)
    M = 0.5 * (M + M.transpose(1, 2))
    Wb = W.reshape(W.shape[0], n, g).permute(1, 2, 0)  # (n, g, rows)
    L, _ = torch.linalg.cholesky_ex(M)
    Y = torch.linalg.solve_triangular(L, Wb, upper=False)  # L⁻¹ W_Bᵀ
    return 0.5 * (Y.double() ** 2).sum((1, 2))


@dataclass
class GroupTrace(RemovalOrder):
    """One greedy run over a tied group: the channel removal order and the step losses.

    Ws: the layers' start weights (compute dtype, dead inputs zeroed); prepared: their damped
    Hessians; order ``(steps,)`` channel indices; step_loss ``(steps,)`` float64 summed over the
    layers, layer_loss ``(steps, L)`` float64 per layer. ``solve(fraction)`` → the per-layer
    optimal weights for the kept channels, the kept mask ``(n,)``, the predicted loss.
    """

    Ws: list[torch.Tensor]
    prepared: list[PreparedHessian]
    group_sizes: list[int]
    order: torch.Tensor
    step_loss: torch.Tensor
    layer_loss: torch.Tensor

    @property
    def n_channels(self) -> int:
        return self.Ws[0].shape[1] // self.group_sizes[0]

    @property
    def n_units(self) -> int:
        return self.n_channels

    def solve(self, fraction: float) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """``([Ŵ_l], keep (n,), predicted loss)`` at ``fraction``."""
        keep = self.keep(fraction)
        weights = [
            structured_optimum(W, p.H, group_columns(keep, g).to(W.device), p.Hinv)[0]
            for W, p, g in zip(self.Ws, self.prepared, self.group_sizes, strict=True)
        ]
        return weights, keep, self.loss(fraction)


def group_obs(
    Ws: Sequence[torch.Tensor],
    Hs: Sequence[torch.Tensor],
    group_sizes: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    damp: float = DEFAULT_DAMP,
    on_singular: str = "damp",
    max_fraction: float = 1.0,
) -> GroupTrace:
    """Greedy structured OBS over a tied group (module docstring): ``ceil(max_fraction · n)``
    steps (at most ``n − 1``), each layer ``W_l (rows_l, n · g_l)`` with its ``H_l``."""
    n = _check(Ws, group_sizes)
    if len(Hs) != len(Ws):
        raise ValueError(f"{len(Ws)} weights but {len(Hs)} Hessians")
    if not (0.0 < float(max_fraction) <= 1.0):
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction!r}")
    gs = [int(g) for g in group_sizes]
    start, preps, Wk, Hk = [], [], [], []
    for W, H, g in zip(Ws, Hs, gs, strict=True):
        Wc, prep, _ = _prepare(W, H, g, dtype, damp, on_singular)
        start.append(Wc)
        preps.append(prep)
        Wk.append(Wc.clone())
        Hk.append(prep.Hinv.clone())
    steps = min(n - 1, math.ceil(float(max_fraction) * n - 1e-9))
    alive = torch.ones(n, dtype=torch.bool, device=Wk[0].device)
    order, total, per = [], [], []
    for _ in range(steps):
        costs = [
            _block_costs(W, Hi, g).to(alive.device) for W, Hi, g in zip(Wk, Hk, gs, strict=True)
        ]
        score = torch.stack(costs).sum(0).masked_fill(~alive, float("inf"))
        c = int(score.argmin())
        order.append(c)
        total.append(float(score[c]))
        per.append([float(x[c]) for x in costs])
        alive[c] = False
        for W, Hi, g in zip(Wk, Hk, gs, strict=True):
            B = torch.arange(c * g, (c + 1) * g, device=W.device)
            M = Hi[B][:, B]
            L = torch.linalg.cholesky(0.5 * (M + M.T))
            R = torch.cholesky_solve(Hi.index_select(0, B), L)  # M⁻¹ H⁻¹[B, :]
            W -= W.index_select(1, B) @ R
            Hi -= Hi.index_select(1, B) @ R
            W[:, B] = 0  # exactly zero (rounding leaves ~1e-7)
    dev = Wk[0].device
    return GroupTrace(
        start,
        preps,
        gs,
        torch.tensor(order, dtype=torch.long, device=dev),
        torch.tensor(total, dtype=torch.float64),
        torch.tensor(per, dtype=torch.float64).reshape(len(order), len(Ws)),
    )


@dataclass
class GroupResult:
    """A tied group at one level: the layers' weights, the kept channels ``(n,)``, the
    predicted loss (the greedy's step sum for ``obc``, the measured one for the baselines),
    and each layer's measured loss ``½ Σ δ H_l δᵀ`` under its damped ``H_l``."""

    weights: list[torch.Tensor]
    keep: torch.Tensor
    loss: float
    layer_losses: list[float]
    method: str
    group_sizes: list[int]
    trace: GroupTrace | None = None

    @property
    def fraction(self) -> float:
        return float(1.0 - self.keep.float().mean())


def solve_group(
    Ws: Sequence[torch.Tensor],
    Hs: Sequence[torch.Tensor],
    group_sizes: Sequence[int],
    fraction: float,
    method: str = "obc",
    *,
    dtype: torch.dtype = torch.float32,
    damp: float = DEFAULT_DAMP,
    on_singular: str = "damp",
) -> GroupResult:
    """Remove ``round(fraction · n)`` channels of a tied group from all its layers.

    ``obc``: ``group_obs`` with exact compensation; ``magnitude`` / ``obd``: the channels of
    least summed score over the layers (``group_scores`` of each layer, summed), zeroed with no
    update of the other weights.
    """
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"structured method must be one of {STRUCTURED_METHODS}, got {method!r}")
    n = _check(Ws, group_sizes)
    k = removed_count(fraction, n)
    gs = [int(g) for g in group_sizes]
    trace = None
    if method == "obc" and k:
        trace = group_obs(
            Ws, Hs, gs, dtype=dtype, damp=damp, on_singular=on_singular, max_fraction=fraction
        )
        weights, keep, loss = trace.solve(fraction)
        starts, preps = trace.Ws, trace.prepared
    else:
        prepared = [
            _prepare(W, H, g, dtype, damp, on_singular) for W, H, g in zip(Ws, Hs, gs, strict=True)
        ]
        starts, preps = [p[0] for p in prepared], [p[1] for p in prepared]
        keep = torch.ones(n, dtype=torch.bool, device=starts[0].device)
        if k:
            score = sum(
                group_scores(W, p, g, method).to(keep.device)
                for W, p, g in zip(starts, preps, gs, strict=True)
            )
            keep[torch.topk(score, k, largest=False).indices] = False
        weights = [
            torch.where(group_columns(keep, g).to(W.device).unsqueeze(0), W, torch.zeros_like(W))
            for W, g in zip(starts, gs, strict=True)
        ]
        loss = None
    layer_losses = [
        float(row_losses(W, Wh, p.H).sum()) for W, Wh, p in zip(starts, weights, preps, strict=True)
    ]
    return GroupResult(
        weights,
        keep.cpu(),
        sum(layer_losses) if loss is None else loss,
        layer_losses,
        method,
        gs,
        trace,
    )
