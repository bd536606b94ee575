"""Compensated clipping search: each row's grid chosen by its loss *after* GPTQ's compensation.

``fit_grid``'s search picks the clipping range of a row's grid from the rounding error alone
(``Σ_p H_pp (w_p − q(w_p))²``), as if nothing compensated it. But every solver here compensates:
an error on one weight is partly undone by the others, so a tighter range (more clipping, finer
steps) is often better than the rounding error says. Candidates, for one row ``w`` of
``W (rows, cols)``:

    g_0 = the caller's base grid                  (the solver's own: fit_grid(W, weight=diag H))
    g_k = min-max grid of p_k · [min w, max w]    p_k ∈ SHRINKS = 1.0, 0.975, …, 0.5

Each candidate is run through the GPTQ engine (``column_solve`` with the grid given) and every
row keeps the candidate of least loss ``½ δ H δᵀ`` after compensation. GPTQ's rows are
independent (one shared ``U``), so the choice is exact for GPTQ and never worse than ``g_0`` on
any row; OBQ then quantizes on the chosen grid (a proxy there: measured on smollm2-135m 4-bit
per channel asym, the OBQ layer loss drops by 5–19% on the q / v / up projections and is
unchanged on the down projections).

Cost: ``1 + len(SHRINKS)`` GPTQ passes, ``Θ(k · rows · cols²)``; candidates are stacked as rows
of one solve, as many at a time as keep the stack under ``chunk`` elements.
"""

from __future__ import annotations

import torch

from .columnwise import DEFAULT_BLOCK, ColumnOut, column_solve
from .grid import QuantGrid, fit_grid

#: the range shrink factors tried besides the base grid (1.0 = plain min-max)
SHRINKS = tuple(1.0 - 0.025 * i for i in range(21))


def clip_search(
    W: torch.Tensor,
    diagH: torch.Tensor,
    U: torch.Tensor,
    bits: int,
    base: QuantGrid,
    *,
    sym: bool = True,
    group_size: int | None = None,
    perm: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK,
    shrinks: tuple[float, ...] = SHRINKS,
    chunk: int = 1 << 24,
) -> ColumnOut:
    """GPTQ of ``W (R, C)`` on the best candidate grid of every row (module docstring).

    ``diagH (C,)``, ``U (C, C)``, ``perm``: as ``column_solve`` (``U`` in processing order).
    ``base``: the first candidate, the grid the solver would use without the search (its
    layout: ``bits``, ``sym``, ``group_size``). ``group_size``: static groups (every
    candidate's groups fitted on ``W``). Returns the ``ColumnOut`` of the chosen candidates
    (weights, per-row loss, their grid), with ``info["clip_search"]``: how many rows took each
    candidate (``"base"``, then the shrink factors)."""
    R, C = W.shape
    gs = group_size if (group_size is not None and group_size < C) else None
    kw = {"sym": sym, "group_size": gs}
    grids = [base, *(fit_grid(W * p, bits, search=False, **kw) for p in shrinks)]
    scale = torch.stack([g.scale.to(W.dtype) for g in grids])  # (k, R, groups)
    zero = torch.stack([g.zero.to(W.dtype) for g in grids])
    k = len(grids)
    best_w = torch.empty_like(W)
    best_l = torch.full((R,), float("inf"), dtype=torch.float64)
    pick = torch.zeros(R, dtype=torch.long)
    step = max(1, chunk // max(R * C, 1))
    info: dict = {}
    for i in range(0, k, step):
        n = min(step, k - i)
        g = QuantGrid(scale[i : i + n].flatten(0, 1), zero[i : i + n].flatten(0, 1), bits, sym, gs)
        out = column_solve(
            W.repeat(n, 1),
            diagH,
            U,
            perm=perm,
            block_size=block_size,
            bits=bits,
            static_groups=True,
            grid=g,
            **kw,
        )
        info = out.info
        loss = out.row_loss.view(n, R)
        lo, at = loss.min(0)
        better = lo < best_l
        best_l = torch.where(better, lo, best_l)
        pick = torch.where(better, at + i, pick)
        rows = better.nonzero().squeeze(1).to(W.device)
        best_w[rows] = out.weight.view(n, R, C)[at.to(W.device)[rows], rows]
    sel = (pick.to(W.device), torch.arange(R, device=W.device))
    grid = QuantGrid(scale[sel], zero[sel], bits, sym, gs)
    counts = torch.bincount(pick, minlength=k).tolist()
    names = ["base", *(f"{p:g}" for p in shrinks)]
    info = {**info, "clip_search": {n: c for n, c in zip(names, counts, strict=True) if c}}
    return ColumnOut(weight=best_w, keep=None, row_loss=best_l, grid=grid, info=info)
