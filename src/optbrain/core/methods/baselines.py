"""Baselines beside every result: magnitude, Wanda, OBD diagonal saliency, round-to-nearest.

None of them updates the remaining weights; their loss is measured directly,
``½ Σ_r δ_r H δ_rᵀ`` under the damped ``H`` (``row_losses``), from the same starting weights
as the other solvers (dead-input columns zeroed).

* ``"magnitude"``: remove the smallest ``|w|``. Patterns: unstructured, N:M, blockB (block score
  = L2 norm of the block). Option ``scope``: ``"layer"`` (default; one threshold over the layer,
  exactly ``round(s · rows · cols)`` weights / ``round(s · rows · cols/B)`` blocks) or ``"row"``
  (``round(s · cols)`` per row). With ``bits``: prune, then round to nearest on a grid fitted to
  the pruned weights (``fit_grid`` with ``weight = diag H``, as OBC fits its compound grid).
* ``"wanda"``: Wanda (Sun et al., 2023), remove the smallest ``|w_rj| · ‖X_j‖`` compared
  *within each output row* (option ``scope``, default ``"row"``; ``"layer"`` for one threshold).
  ``‖X_j‖ = sqrt(N · H_jj / 2)`` is read off the raw (undamped) ``diag H``; the constant
  ``sqrt(N/2)`` does not change the ranking, so the score is ``|w| · sqrt(H_jj)``. N:M: the
  lowest of every M in a row. With ``bits``: prune, then round to nearest (as magnitude).
* ``"obd"``: Optimal Brain Damage, remove the smallest diagonal saliency ``w_p² H_pp / 2`` (the
  loss of zeroing ``w_p`` alone if H were diagonal); blocks sum it. Same patterns and ``scope``.
  Pruning only: ``bits`` is a ValueError.
* ``"rtn"``: round every weight to the nearest level of the grid ``fit_grid(W, bits,
  weight = diag H)`` — the grid OBQ/OBC and GPTQ start from, so the comparison isolates the
  error compensation. Quantization only: a sparsity or N:M pattern is a ValueError.

Option ``search`` (bool, default True) of magnitude/rtn is ``fit_grid``'s MSE scale search.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..columnwise import option_bool, option_scope
from ..grid import fit_layer_grid
from ..hessian import PreparedHessian, prepare_layer, row_losses
from ..patterns import Pattern, pruned_count
from ..result import LayerResult, layer_result, unchanged
from ..spec import CompressSpec, check_options
from ..structured import check_structured_spec, solve_structured_spec


def prune_mask(
    score: torch.Tensor, pattern: Pattern, sparsity: float | None, scope: str = "layer"
) -> torch.Tensor:
    """Kept-weight mask ``(R, C)`` removing the lowest ``score (R, C)`` under ``pattern``.

    unstructured: ``round(s·R·C)`` lowest over the layer (``scope="layer"``) or ``round(s·C)``
    per row; N:M: the ``M − N`` lowest of every ``M`` consecutive columns of each row; blockB:
    blocks scored by the sum of their scores, ``round(s·R·C/B)`` (layer) or ``round(s·C/B)``
    per row removed. Ties are broken by ``topk`` (counts are exact).
    """
    R, C = score.shape
    dev = score.device
    if pattern.kind == "nm":
        n, m = pattern.n, pattern.m
        s = score.reshape(R, C // m, m)
        idx = torch.topk(s, m - n, dim=2, largest=False).indices
        removed = torch.zeros_like(s, dtype=torch.bool).scatter_(2, idx, True)
        return ~removed.reshape(R, C)
    g = pattern.block if pattern.kind == "block" else 1
    s = score.reshape(R, C // g, g).sum(2) if g > 1 else score
    sp = float(sparsity or 0.0)
    nb = s.shape[1]
    removed = torch.zeros(R, nb, dtype=torch.bool, device=dev)
    if scope == "row":
        k = pruned_count(sp, nb)
        if k:
            removed.scatter_(1, torch.topk(s, k, dim=1, largest=False).indices, True)
    else:
        k = pruned_count(sp, R * nb)
        if k:
            removed.view(-1)[torch.topk(s.reshape(-1), k, largest=False).indices] = True
    if g > 1:
        removed = removed.repeat_interleave(g, dim=1)
    return ~removed


def _prune_then_round(
    method: str,
    W: torch.Tensor,
    H: torch.Tensor,
    spec: CompressSpec,
    score: Callable[[torch.Tensor, PreparedHessian], torch.Tensor] | None,
    search: bool = True,
    scope: str | None = None,
) -> LayerResult:
    """Prune the lowest ``score(Wc, prep)`` (when the spec prunes), then round to nearest on
    ``fit_layer_grid`` of the pruned weights (when it quantizes); the loss is measured."""
    Wc, prep = prepare_layer(W, H, spec)
    keep, weight, grid = None, Wc, None
    if spec.prunes and score is not None:
        keep = prune_mask(score(Wc, prep), spec.pattern, spec.sparsity, scope or "layer")
        weight = torch.where(keep, Wc, torch.zeros_like(Wc))
    if spec.quantizes:
        grid = fit_layer_grid(weight, prep.H, spec, search)
        weight = grid.quantize(weight)
    rl = row_losses(Wc, weight, prep.H).cpu()
    info = {"scope": scope} if scope is not None else None
    return layer_result(method, spec, weight, keep, rl, prep=prep, grid=grid, info=info)


def _magnitude_score(Wc: torch.Tensor, prep: PreparedHessian) -> torch.Tensor:
    return Wc * Wc  # blocks: squared L2


def wanda_score(W: torch.Tensor, h_diag: torch.Tensor) -> torch.Tensor:
    """Wanda's score ``|W_ij| · √H_jj`` of ``W (rows, cols)`` from the undamped ``diag H
    (cols,)`` (``‖X_j‖ ∝ √H_jj``; negative round-off clamped to 0)."""
    return W.abs() * h_diag.clamp_min(0).sqrt().unsqueeze(0)


def _wanda_score(Wc: torch.Tensor, prep: PreparedHessian) -> torch.Tensor:
    # prep.H is damped (λ on the diagonal) and has dead inputs at 1: undo both, ‖X_j‖² ∝ H_jj
    raw = (torch.diagonal(prep.H) - prep.damping).masked_fill(prep.dead, 0)
    return wanda_score(Wc, raw)


def _obd_score(Wc: torch.Tensor, prep: PreparedHessian) -> torch.Tensor:
    return 0.5 * Wc * Wc * torch.diagonal(prep.H).unsqueeze(0)


def check_magnitude(spec: CompressSpec) -> tuple[str, bool] | None:
    """Magnitude's options, checked before any work → ``(scope, search)``; None for the
    structured patterns (no options)."""
    if spec.pattern.structured:
        check_structured_spec("magnitude", spec)
        return None
    check_options("magnitude", spec.options, ("scope", "search"))
    scope = option_scope("magnitude", spec.options)
    return scope, option_bool("magnitude", spec.options, "search", True)


def solve_magnitude(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """Magnitude pruning (and round-to-nearest of the kept weights when ``bits`` is set)."""
    opt = check_magnitude(spec)
    if opt is None:
        return solve_structured_spec("magnitude", W, H, spec)
    scope, search = opt
    if not spec.prunes and not spec.quantizes:
        return unchanged(W, "magnitude", spec)
    return _prune_then_round("magnitude", W, H, spec, _magnitude_score, search, scope)


def check_wanda(spec: CompressSpec) -> tuple[str, bool]:
    """Wanda's options, checked before any work → ``(scope, search)`` (scope "row" by
    default: Wanda compares weights within an output row)."""
    check_options("wanda", spec.options, ("scope", "search"))
    scope = option_scope("wanda", {"scope": spec.options.get("scope", "row")})
    return scope, option_bool("wanda", spec.options, "search", True)


def solve_wanda(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """Wanda: prune by ``|w_rj| · ‖X_j‖`` per output row, no update (and round with ``bits``)."""
    scope, search = check_wanda(spec)
    if not spec.prunes and not spec.quantizes:
        return unchanged(W, "wanda", spec)
    return _prune_then_round("wanda", W, H, spec, _wanda_score, search, scope)


def check_obd(spec: CompressSpec) -> str | None:
    """OBD's options, checked before any work → its scope; None for the structured patterns.
    OBD prunes only: bits are a ValueError."""
    if spec.pattern.structured:
        check_structured_spec("obd", spec)
        return None
    check_options("obd", spec.options, ("scope",))
    if spec.quantizes:
        raise ValueError(
            f"method 'obd' prunes only; it cannot quantize (got bits={spec.bits}); use 'obc', "
            "'gptq' or 'rtn' for quantization, or 'sparsegpt'/'magnitude' for both"
        )
    return option_scope("obd", spec.options)


def solve_obd(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """Optimal Brain Damage: prune by ``w_p² H_pp / 2`` without updating the other weights."""
    scope = check_obd(spec)
    if scope is None:
        return solve_structured_spec("obd", W, H, spec)
    if not spec.prunes:
        return unchanged(W, "obd", spec)
    return _prune_then_round("obd", W, H, spec, _obd_score, scope=scope)


def check_rtn(spec: CompressSpec) -> bool:
    """RTN's options, checked before any work → ``search``; RTN quantizes only."""
    check_options("rtn", spec.options, ("search",))
    if spec.prunes:
        raise ValueError(
            f"method 'rtn' quantizes only; it cannot prune (got pattern {spec.pattern}, "
            f"sparsity={spec.sparsity}); use 'magnitude' with bits for prune-then-round"
        )
    if not spec.quantizes:
        raise ValueError("method 'rtn' needs bits (it is a quantization method)")
    return option_bool("rtn", spec.options, "search", True)


def solve_rtn(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """Round-to-nearest on the grid ``fit_grid(W, bits, weight=diag H)``; quantization only."""
    search = check_rtn(spec)
    return _prune_then_round("rtn", W, H, spec, None, search)
