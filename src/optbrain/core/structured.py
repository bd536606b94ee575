"""Structured OBS: remove whole input groups (features, conv channels, heads) from all rows at once.

Removing a group ``B`` of input columns from every row of ``W (rows, cols)`` shares one
``H⁻¹`` (``H = 2 Xᵀ X / N``, the convention of ``core/hessian.py``)::

    cost_B = ½ tr(W_B [H⁻¹]_BB⁻¹ W_Bᵀ)          (½ δ H δᵀ, as ``layer_loss``)
    W     -= W_{:,B} [H⁻¹]_BB⁻¹ H⁻¹_{B,:}
    H⁻¹   -= H⁻¹_{:,B} [H⁻¹]_BB⁻¹ H⁻¹_{B,:}

The greedy removes the cheapest group and repeats (the engine, tracking ``(H⁻¹, G = WᵀW)``
with low-rank corrections and periodic folds, is ``core/structured_engine.py``).

One run records the whole removal order (``StructuredTrace``); the weight at any level is the
closed-form least-squares optimum for the kept columns (``structured_optimum``), which equals
the greedy's OBS state. Groups are consecutive runs of ``g`` columns: 1 for Linear input
features, ``kh·kw`` for a conv input channel (the unfolded weight ``(out, in·kh·kw)`` is
channel-major), ``head_dim`` for a head of an attention output projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .hessian import PreparedHessian, prepare_layer, row_losses
from .patterns import StructuredPattern, parse_structured, structured_group_size  # noqa: F401
from .result import LayerResult
from .spec import DEFAULT_DAMP, CompressSpec, check_damp, check_dtype, check_weight_hessian
from .structured_engine import DEFAULT_LAZY, gram, greedy_groups

STRUCTURED_METHODS = ("obc", "magnitude", "obd")


def check_group_size(cols: int, group_size: int) -> int:
    """A positive integer group size dividing ``cols``."""
    if isinstance(group_size, bool) or int(group_size) != group_size or int(group_size) < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    g = int(group_size)
    if cols % g != 0:
        raise ValueError(f"group_size={g} does not divide the {cols} columns of W")
    return g


def removed_count(fraction: float, n_groups: int) -> int:
    """Groups removed at ``fraction`` (``round(fraction · n_groups)``); at least one must stay."""
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}") from None
    if not (0.0 <= f < 1.0):
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    k = int(round(f * n_groups))
    if k >= n_groups:
        raise ValueError(
            f"fraction {fraction} removes all {n_groups} groups; it must leave at least one"
        )
    return k


def group_columns(keep_groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Kept-group mask ``(n,)`` → kept-column mask ``(n · group_size,)``."""
    return keep_groups.repeat_interleave(group_size)


# --- closed form ---------------------------------------------------------------------------


def structured_optimum(
    W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, Hinv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with whole columns removed: ``argmin ½ Σ_r δ_r H δ_rᵀ`` s.t. ``Ŵ_{:,S} = 0``.

    W ``(R, C)``, H ``(C, C)`` positive definite, keep ``(C,)`` bool (F kept, S removed), Hinv
    optional ``H⁻¹``. Two equal closed forms, the smaller system is solved (shared by rows)::

        Ŵ_F = W_F + W_S H_SF H_FF⁻¹                 loss_r = ½ (W_S (H_SS + H_SF Δ))_r · W_S,r
        Ŵ   = W − W_S [H⁻¹]_SS⁻¹ H⁻¹_{S,:}           loss_r = ½ ||W_S L⁻ᵀ||²_r,  L Lᵀ = [H⁻¹]_SS

    Returns ``(Ŵ, row_loss (R,) float64)``.
    """
    S = (~keep).nonzero().squeeze(1)
    F = keep.nonzero().squeeze(1)
    out = torch.zeros_like(W)
    rows = W.shape[0]
    if S.numel() == 0:
        return W.clone(), torch.zeros(rows, dtype=torch.float64, device=W.device)
    WS = W.index_select(1, S)
    if F.numel() == 0:
        return out, 0.5 * ((WS @ H[S][:, S]) * WS).sum(1).double()
    if S.numel() <= F.numel():
        if Hinv is None:
            Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        A = Hinv[S][:, S]
        L = torch.linalg.cholesky(0.5 * (A + A.T))
        Y = torch.linalg.solve_triangular(L, WS.T, upper=False)  # L⁻¹ W_Sᵀ
        coef = torch.linalg.solve_triangular(L.T, Y, upper=True)  # [H⁻¹]_SS⁻¹ W_Sᵀ
        res = W - coef.T @ Hinv.index_select(0, S)
        out[:, F] = res.index_select(1, F)
        return out, 0.5 * (Y.double() ** 2).sum(0)
    HFF = H[F][:, F]
    L = torch.linalg.cholesky(0.5 * (HFF + HFF.T))
    HSF = H[S][:, F]
    delta = torch.cholesky_solve((WS @ HSF).T, L).T  # (R, |F|) = W_S H_SF H_FF⁻¹
    out[:, F] = W.index_select(1, F) + delta
    loss = 0.5 * ((WS @ H[S][:, S] - delta @ HSF.T) * WS).sum(1)
    return out, loss.double()


# --- the trace -----------------------------------------------------------------------------


class RemovalOrder:
    """What every greedy removal trace shares: ``order (steps,)`` unit indices in removal order
    and ``step_loss (steps,)`` their float64 losses, over ``n_units`` units (a layer's column
    groups, or a tied group's channels); levels are read off the prefix of the order."""

    order: torch.Tensor
    step_loss: torch.Tensor

    @property
    def n_units(self) -> int:
        raise NotImplementedError

    @property
    def max_fraction(self) -> float:
        """The highest fraction of units this trace can give (it may have stopped early)."""
        return self.order.numel() / self.n_units

    def count(self, fraction: float) -> int:
        """Units removed at ``fraction``; ValueError if beyond the trace or removing all."""
        k = removed_count(fraction, self.n_units)
        if k > self.order.numel():
            raise ValueError(
                f"fraction {fraction} is beyond this trace, which stops at "
                f"max_fraction={self.max_fraction:.4g}; run the trace further"
            )
        return k

    def keep(self, fraction: float) -> torch.Tensor:
        """Kept-unit mask ``(n_units,)`` bool at ``fraction``."""
        keep = torch.ones(self.n_units, dtype=torch.bool, device=self.order.device)
        keep[self.order[: self.count(fraction)]] = False
        return keep

    def loss(self, fraction: float) -> float:
        """The greedy's predicted loss at ``fraction`` (sum of the step losses)."""
        return float(self.step_loss[: self.count(fraction)].sum())


@dataclass
class StructuredTrace(RemovalOrder):
    """One structured-OBS run: the group removal order and per-step losses; every level from it.

    W: ``(rows, cols)`` start weights (compute dtype, dead inputs zeroed); prepared: the damped
    Hessian; order ``(steps,)`` group indices in removal order; step_loss ``(steps,)`` float64.
    ``at(fraction)`` → ``(weight, keep_groups, loss)``: the least-squares optimum for the kept
    columns (= the greedy's OBS state), the kept-group mask ``(cols // g,)`` and the greedy's
    predicted loss ``Σ step_loss``.
    """

    W: torch.Tensor
    prepared: PreparedHessian
    group_size: int
    order: torch.Tensor
    step_loss: torch.Tensor

    @property
    def n_groups(self) -> int:
        return self.W.shape[1] // self.group_size

    @property
    def n_units(self) -> int:
        return self.n_groups

    def solve(self, fraction: float) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """``(weight, keep_groups, predicted loss, per-row loss of the closed form)``."""
        keep = self.keep(fraction)
        weight, rl = structured_optimum(
            self.W, self.prepared.H, group_columns(keep, self.group_size), self.prepared.Hinv
        )
        return weight, keep, self.loss(fraction), rl.cpu()

    def at(self, fraction: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(weight, keep_groups, predicted loss)`` at ``fraction``."""
        weight, keep, loss, _ = self.solve(fraction)
        return weight, keep, loss

    def levels(self, fractions: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        return [self.at(f) for f in fractions]


def _prepare(
    W: torch.Tensor, H: torch.Tensor, group_size: int, dtype: torch.dtype, damp: float, on: str
) -> tuple[torch.Tensor, PreparedHessian, int]:
    check_weight_hessian(W, H)
    g = check_group_size(W.shape[1], group_size)
    spec = CompressSpec(damp=check_damp(damp), dtype=check_dtype(dtype), on_singular=on)
    Wc, prep = prepare_layer(W, H, spec)
    return Wc, prep, g


def structured_obs(
    W: torch.Tensor,
    H: torch.Tensor,
    group_size: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    damp: float = DEFAULT_DAMP,
    on_singular: str = "damp",
    max_fraction: float = 1.0,
    lazy: int = DEFAULT_LAZY,
) -> StructuredTrace:
    """Run greedy structured OBS on ``W (rows, cols)`` with groups of ``group_size`` columns.

    Records ``ceil(max_fraction · n_groups)`` steps (at most ``n_groups − 1``: one group always
    stays), so every level up to ``max_fraction`` comes from this one run. ``lazy``: columns of
    low-rank correction between folds (speed only).
    """
    if not (0.0 < float(max_fraction) <= 1.0):
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction!r}")
    if isinstance(lazy, bool) or not isinstance(lazy, int) or lazy < 1:
        raise ValueError(f"lazy must be an integer >= 1, got {lazy!r}")
    Wc, prep, g = _prepare(W, H, group_size, dtype, damp, on_singular)
    n = Wc.shape[1] // g
    steps = min(n - 1, math.ceil(float(max_fraction) * n - 1e-9))
    G = gram(Wc)
    order, step_loss = greedy_groups(prep.Hinv, G, g, steps, lazy)
    return StructuredTrace(Wc, prep, g, order, step_loss)


# --- solver entry point and baselines ------------------------------------------------------


@dataclass
class StructuredResult:
    """A structured level of one layer.

    weight ``(rows, cols)`` compute dtype; keep ``(cols // g,)`` bool kept groups; loss: the
    predicted loss (the greedy's step sum for ``obc``, the measured one for the baselines);
    row_loss ``(rows,)`` float64; measured_loss: ``½ Σ δ H δᵀ`` of ``weight`` under the damped H.
    """

    weight: torch.Tensor
    keep: torch.Tensor
    loss: float
    row_loss: torch.Tensor
    method: str
    group_size: int
    measured_loss: float
    damping: float = 0.0
    fallback: str | None = None
    trace: StructuredTrace | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def keep_columns(self) -> torch.Tensor:
        """Kept-column mask ``(cols,)``."""
        return group_columns(self.keep, self.group_size)

    @property
    def fraction(self) -> float:
        """Fraction of groups removed."""
        return float(1.0 - self.keep.float().mean())

    def to_layer_result(self, pattern: str = "channels") -> LayerResult:
        """The registry's ``LayerResult``: mask ``(rows, cols)`` from the kept columns; the
        kept groups, group size and measured loss go to ``info``."""
        rows = self.weight.shape[0]
        mask = self.keep_columns.to(self.weight.device).unsqueeze(0).expand(rows, -1).clone()
        return LayerResult(
            weight=self.weight,
            mask=mask,
            loss=self.loss,
            method=self.method,
            damping=self.damping,
            fallback=self.fallback,
            row_loss=self.row_loss,
            trace=self.trace,
            info={
                "pattern": pattern,
                "keep_groups": self.keep,
                "group_size": self.group_size,
                "measured_loss": self.measured_loss,
                **self.info,
            },
        )


def group_scores(Wc: torch.Tensor, prep: PreparedHessian, g: int, method: str) -> torch.Tensor:
    """Baseline group saliency ``(cols // g,)``: ``magnitude`` = L2 norm of the group's weights
    (all rows), ``obd`` = ``Σ W_B² diag(H)_B / 2`` (the loss of zeroing it if H were diagonal)."""
    sq = Wc.double() ** 2
    if method == "obd":
        sq = 0.5 * sq * torch.diagonal(prep.H).double().unsqueeze(0)
    s = sq.sum(0).reshape(-1, g).sum(1)
    return s.sqrt() if method == "magnitude" else s


def solve_structured(
    W: torch.Tensor,
    H: torch.Tensor,
    group_size: int,
    fraction: float,
    method: str = "obc",
    *,
    dtype: torch.dtype = torch.float32,
    damp: float = DEFAULT_DAMP,
    on_singular: str = "damp",
    lazy: int = DEFAULT_LAZY,
) -> StructuredResult:
    """Remove ``round(fraction · cols/g)`` whole groups of ``group_size`` columns from ``W``.

    ``obc``: structured OBS with exact compensation (the trace stops at ``fraction``; run
    ``structured_obs`` for every level). ``magnitude`` / ``obd``: drop the lowest-scored groups
    (``group_scores``), no update of the other weights (as the unstructured baselines).
    """
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"structured method must be one of {STRUCTURED_METHODS}, got {method!r}")
    g = check_group_size(W.shape[-1], group_size)
    k = removed_count(fraction, W.shape[-1] // g)
    if method == "obc":
        trace = None
        if k:
            trace = structured_obs(
                W, H, g, dtype=dtype, damp=damp, on_singular=on_singular,
                max_fraction=max(fraction, 1e-12), lazy=lazy,
            )  # fmt: skip
            Wc, prep = trace.W, trace.prepared
            weight, keep, loss, rl = trace.solve(fraction)
        else:
            Wc, prep, _ = _prepare(W, H, g, dtype, damp, on_singular)
            weight, keep, loss = Wc.clone(), torch.ones(Wc.shape[1] // g, dtype=torch.bool), 0.0
            rl = torch.zeros(W.shape[0], dtype=torch.float64)
        measured = float(row_losses(Wc, weight, prep.H).sum())
        return StructuredResult(
            weight, keep.cpu(), loss, rl, method, g, measured, prep.damping, prep.fallback, trace
        )
    Wc, prep, _ = _prepare(W, H, g, dtype, damp, on_singular)
    score = group_scores(Wc, prep, g, method)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        keep[torch.topk(score, k, largest=False).indices] = False
    cols = group_columns(keep, g)
    weight = torch.where(cols.unsqueeze(0), Wc, torch.zeros_like(Wc))
    rl = row_losses(Wc, weight, prep.H).cpu()
    loss = float(rl.sum())
    return StructuredResult(
        weight, keep.cpu(), loss, rl, method, g, loss, prep.damping, prep.fallback
    )


def check_structured_spec(method: str, spec: CompressSpec) -> None:
    """Structured OBS and its baselines take no options: any is a ValueError naming them."""
    if spec.options:
        raise ValueError(
            f"method {method!r} with pattern {spec.pattern} takes no options, got "
            f"{sorted(spec.options)}"
        )


def solve_structured_spec(
    method: str, W: torch.Tensor, H: torch.Tensor, spec: CompressSpec
) -> LayerResult:
    """The registry's entry for ``channels`` / ``heads`` (``obc``, ``magnitude``, ``obd``):
    ``solve_structured`` with the spec's group size (``spec.channel_size``), fraction, dtype,
    damping and singular policy, as a ``LayerResult`` (mask ``(rows, cols)``, whole columns)."""
    check_structured_spec(method, spec)
    res = solve_structured(
        W, H, spec.channel_size, spec.sparsity or 0.0, method,
        dtype=spec.dtype, damp=spec.damp, on_singular=spec.on_singular,
    )  # fmt: skip
    out = res.to_layer_result(str(spec.pattern))
    out.sparsity = res.fraction
    return out
