"""The per-row guarantee of ``method="obc"``: never worse than the fast solver on the same H.

Greedy OBS/OBQ is not optimal; on ill-conditioned H a fixed column order (GPTQ, SparseGPT)
can beat it on some rows. The guard runs the fast solver of the same problem — GPTQ for
quantization, SparseGPT for pruning (and pruning + quantization) — on the same damped H and
grid settings (``Θ(rows · cols²)``, cheap beside the exact ``Θ(rows · cols³)``), measures both
per row, ``ℓ_r = ½ δ_r H δ_rᵀ``, and keeps per row the better one::

    ℓ_r(result) = min(ℓ_r(exact), ℓ_r(reference))      for every row r

This is row-by-row exact when both results have the same number of pruned weights in every
row (quantization, N:M, ``per_row``). Unstructured / block pruning with the layer-wide
selection lets rows end at different sparsities, so rows cannot be swapped one by one without
changing the layer's count. There (pruning only) the candidate at the reference's per-row
counts is, per row, the better of the exact trace at that count and the *exact refit* of the
reference's mask (``masked_optimum``: the least-squares optimum on the mask, never above the
reference row); the layer takes that candidate or the exact layer-wide one, whichever has the
lower loss. The trace's rows are refitted only where their predicted loss (the greedy's exact
step losses) beats the refit, and only when the candidate can win on those predictions: the
losses compared at the end are always measured ones. Every row of the candidate is ≤ the
reference's row at the same count, and the layer's loss is ≤ both. A compound with unequal
counts keeps the better whole layer.

``info["guard"]``: ``{"reference", "exact_loss", "reference_loss", "rows_from_reference",
"layout"}``, the losses measured under the damped H; ``layout`` is ``"rows"`` (row by row),
``"reference counts"`` or ``"layer"``. The returned ``trace`` is still the greedy's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..grid import QuantGrid
from ..hessian import PreparedHessian, row_losses
from ..trace import PruneTrace, masked_optimum

Parts = tuple[torch.Tensor, torch.Tensor | None, QuantGrid | None, torch.Tensor]


def _merge_grid(take: torch.Tensor, a: QuantGrid | None, b: QuantGrid | None) -> QuantGrid | None:
    if a is None or b is None:
        return a if b is None else b
    t = take.to(a.scale.device).unsqueeze(1)
    return dataclasses.replace(
        a,
        scale=torch.where(t, b.scale.to(a.scale), a.scale),
        zero=torch.where(t, b.zero.to(a.zero), a.zero),
    )


def merge_rows(take: torch.Tensor, a: Parts, b: Parts) -> Parts:
    """Rows of ``b`` where ``take (rows,)`` is True, else of ``a``: ``(weight, keep, grid,
    row_loss)`` each."""
    t = take.to(a[0].device).unsqueeze(1)
    weight = torch.where(t, b[0].to(a[0]), a[0])
    keep = None if a[1] is None else torch.where(t, b[1].to(a[1].device), a[1])
    return weight, keep, _merge_grid(take, a[2], b[2]), torch.where(take, b[3], a[3])


def guard(
    Wc: torch.Tensor,
    prep: PreparedHessian,
    exact: Parts,
    reference: Parts,
    reference_name: str,
    trace: PruneTrace | None,
    quantizes: bool,
) -> tuple[Parts, dict[str, Any]]:
    """The guarded result (module docstring). ``exact`` / ``reference``: ``(weight, keep, grid,
    measured row_loss (rows,) float64 CPU)`` on ``Wc (rows, cols)`` under ``prep.H``."""
    ea, rb = exact[3], reference[3]
    info: dict[str, Any] = {
        "reference": reference_name,
        "exact_loss": float(ea.sum()),
        "reference_loss": float(rb.sum()),
    }
    same = exact[1] is None or bool((exact[1].sum(1) == reference[1].sum(1)).all())
    if not same and not quantizes:
        counts = (~reference[1]).sum(1)
        if trace is not None and trace.group > 1:
            counts = counts // trace.group
        refit = masked_optimum(Wc, prep.H, reference[1], Hinv=prep.Hinv)
        rl = row_losses(Wc, refit, prep.H).cpu()
        worse = rl > rb  # the optimum on the mask, unless rounding put it above the row
        refit = torch.where(worse.to(refit.device).unsqueeze(1), reference[0].to(refit), refit)
        rb = torch.minimum(rl, rb)
        reference = (refit, reference[1], None, rb)
        if trace is not None:  # the trace's rows at those counts, where they predict better
            counts = counts.to(trace.order.device)
            predicted = trace.loss(counts)
            take_t = predicted < rb
            if bool(take_t.any()) and float(torch.where(take_t, predicted, rb).sum()) < float(
                ea.sum()
            ):
                idx = take_t.nonzero().squeeze(1).to(Wc.device)
                tk = reference[1].clone()
                tk[idx] = trace.mask(counts)[idx]
                tw = reference[0].clone()
                tw[idx] = masked_optimum(Wc[idx], prep.H, tk[idx], Hinv=prep.Hinv)
                tl = rb.clone()
                tl[take_t] = row_losses(Wc[idx], tw[idx], prep.H).cpu()
                take_t = tl < rb
                reference = merge_rows(take_t.logical_not(), (tw, tk, None, tl), reference)
                rb = reference[3]
        if float(rb.sum()) < float(ea.sum()):
            info.update(rows_from_reference=int(rb.numel()), layout="reference counts")
            return reference, info
        info.update(rows_from_reference=0, layout="reference counts")
        return exact, info
    if not same:  # compound with rows at different sparsities: the better whole layer
        take_all = float(rb.sum()) < float(ea.sum())
        info.update(rows_from_reference=int(rb.numel()) if take_all else 0, layout="layer")
        return (reference if take_all else exact), info
    take = rb < ea
    info.update(rows_from_reference=int(take.sum()), layout="rows")
    return merge_rows(take, exact, reference), info
