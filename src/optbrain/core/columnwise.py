"""Column-order OBS engine shared by GPTQ and SparseGPT: fix columns left to right with lazy blocks.

Every row ``w (cols,)`` of ``W (rows, cols)`` solves ``min ½ δ H δᵀ`` under the damped ``H``.
Instead of choosing the next coordinate greedily (ExactOBS/OBQ), the columns are fixed in one
order ``0, 1, ..., cols − 1`` shared by all rows, so every row uses the same sequence of inverse
Hessians ``H⁻¹_(p)`` = inverse of ``H[p:, p:]``. Their rows are read off one matrix, the upper
Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``)::

    H⁻¹_(p)[p, p:] / [H⁻¹_(p)]_pp  ==  U[p, p:] / U[p, p]        [H⁻¹_(p)]_pp == U[p, p]²

Fixing column ``p`` of every row to a target ``t_p`` (0 when pruned, the grid value ``q(w_p)``
when quantized, ``w_p`` itself when kept unquantized) is one OBS step::

    e_p   = (w_p − t_p) / U[p, p]                   (rows,)
    w_j  -= e_p · U[p, j]          for j > p
    loss += ½ e_p²                                  (= ½ (w_p − t_p)² / [H⁻¹_(p)]_pp)

The sum of the per-column increments is *exactly* ``½ Σ_r δ_r H δ_rᵀ`` of the final weights
(every step is the exact least-squares re-solve of the still-free columns), so the predicted
loss equals the measured one up to rounding.

Lazy blocks (``block_size`` columns): inside a block the updates are applied column by column
to the block only; the accumulated ``E (block, rows)`` updates all later columns at once with one
matrix product ``W[:, i2:] −= E U[i1:i2, i2:]``. The arithmetic is that of the column-by-column
algorithm, so the result does not depend on ``block_size`` beyond floating-point rounding.
The engine works on ``Wᵀ`` so that one column is one contiguous row of memory.

Tiny example: ``H = [[2, 1], [1, 2]]``, ``w = (1, 1)``, prune column 0.
``H⁻¹ = [[2, −1], [−1, 2]] / 3``, ``U = [[√(2/3), −1/√6], [0, 1/√2]]``; ``e_0 = 1/√(2/3)``,
``w_1 −= e_0 · (−1/√6)`` gives ``ŵ = (0, 3/2)``; loss ``½ e_0² = 3/4`` = ``½ δ H δᵀ`` with
``δ = w − ŵ = (1, −½)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import QuantGrid, fit_grid
from .patterns import Pattern, pruned_count
from .spec import all_finite

DEFAULT_BLOCK = 128
MICRO = 16  # inner block width of the two-level lazy updates
SCOPES = ("layer", "row")


def option_bool(method: str, options: dict, name: str, default: bool) -> bool:
    v = options.get(name, default)
    if not isinstance(v, bool):
        raise ValueError(f"method {method!r}: option {name} must be True or False, got {v!r}")
    return v


def option_block(method: str, options: dict, default: int = DEFAULT_BLOCK) -> int:
    v = options.get("block_size", default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"method {method!r}: block_size must be an integer >= 1, got {v!r}")
    return int(v)


def option_scope(method: str, options: dict) -> str:
    v = options.get("scope", "layer")
    if v not in SCOPES:
        raise ValueError(f"method {method!r}: scope must be one of {SCOPES}, got {v!r}")
    return v


def upper_inverse_factor(
    H: torch.Tensor | None, Hinv: torch.Tensor | None = None, *, overwrite: bool = False
) -> tuple[torch.Tensor | None, str | None]:
    """Upper-triangular ``U`` with ``Uᵀ U = H⁻¹`` for positive definite ``H (C, C)``.

    First choice: the upper Cholesky factor of the given ``Hinv`` (one factorization; with
    ``overwrite`` written over ``Hinv``, no new ``(C, C)`` buffer, and ``Hinv`` is lost). If that
    fails (``H⁻¹`` not numerically positive definite in the compute dtype), ``U`` is computed
    from ``H`` without forming ``H⁻¹``: with ``J`` the reversal permutation, ``J H J = L Lᵀ``
    gives ``H = Ũ Ũᵀ`` with upper ``Ũ = J L J``, so ``H⁻¹ = Ũ⁻ᵀ Ũ⁻¹`` and ``U = Ũ⁻¹`` — in
    the compute dtype, then in float64. Returns ``(U, None or the fallback taken)``; with
    ``H`` None only the first choice is tried, and ``(None, None)`` says that it failed.
    """
    if Hinv is not None:
        out = (Hinv, torch.empty((), dtype=torch.int32, device=Hinv.device)) if overwrite else None
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True, out=out)
        if int(info) == 0 and all_finite(U):
            return U, None
    if H is None:
        return None, None
    for dt in (H.dtype, torch.float64):
        Hd = H.to(dt)
        L, info = torch.linalg.cholesky_ex(torch.flip(Hd, (0, 1)))
        if int(info) == 0:
            Ut = torch.flip(L, (0, 1))
            eye = torch.eye(H.shape[0], dtype=dt, device=H.device)
            U = torch.linalg.solve_triangular(Ut, eye, upper=True)
            if all_finite(U):
                return U.to(H.dtype), f"factor of H in {dt}"
    raise ValueError(
        "the damped Hessian is not positive definite even in float64; "
        "increase damp or set on_singular='eig'"
    )


@dataclass
class ColumnOut:
    """Engine output. weight: ``(R, C)`` (original column order); keep: ``(R, C)`` bool or None;
    row_loss: ``(R,)`` float64 on CPU; grid: the grid every quantized weight lies on, or None."""

    weight: torch.Tensor
    keep: torch.Tensor | None
    row_loss: torch.Tensor
    grid: QuantGrid | None
    info: dict


def _count(frac: float, total: int) -> int:
    return pruned_count(frac, total)


def _micro(align: int) -> int:
    """Inner (micro) block width: a multiple of the pattern alignment near ``MICRO``."""
    return align * max(1, -(-MICRO // align))


def column_solve(
    W: torch.Tensor,
    diagH: torch.Tensor,
    U: torch.Tensor,
    *,
    perm: torch.Tensor | None = None,
    block_size: int = DEFAULT_BLOCK,
    bits: int | None = None,
    sym: bool = True,
    group_size: int | None = None,
    static_groups: bool = False,
    search: bool = True,
    pattern: Pattern | None = None,
    sparsity: float | None = None,
    scope: str = "layer",
    grid: QuantGrid | None = None,
) -> ColumnOut:
    """Fix every column of ``W (R, C)`` in order ``perm`` (default natural), pruning and/or
    quantizing, with the exact OBS update of the later columns (see the module docstring).

    Quantization (``bits``): per-row grids (``group_size`` None) and static groups are fitted by
    ``fit_grid`` on ``W`` up front (Hessian-weighted search, like OBQ); otherwise a group's grid
    is fitted when its first column (in processing order) is reached, from the current (already
    compensated) values of all its columns — the same grid the returned ``QuantGrid`` holds.
    ``grid``: a given static grid (per row, or static groups; original column layout) used
    instead of fitting one (``core.clip_search`` runs candidates through it).

    Pruning (``pattern``/``sparsity``, natural order only): masks are chosen per lazy block from
    the block-start values with the OBS saliency ``w_p² / U_pp²`` (unstructured: the
    ``round(s·R·i2) − round(s·R·i1)`` smallest of the block over all rows, or per row with
    ``scope="row"``; so the layer has exactly ``round(s·R·C)`` pruned weights), or its block
    form ``½ ‖U_BB⁻ᵀ w_B‖²`` (pattern blocks; the exact cost of zeroing the block there); N:M
    masks are chosen when the first column of each group of M is reached, from current values.

    ``diagH (C,)``: the diagonal of the damped H (original column order: the grid's weights);
    ``U (C, C)``: the upper factor of its inverse in processing order (``upper_inverse_factor``
    of ``H[perm][:, perm]``). Only these two are read, so the caller may drop ``H⁻¹`` first.

    Two levels of lazy updates: inside a micro block (``MICRO`` columns) rank-1 updates touch
    the micro block only; a finished micro block updates the rest of its lazy block with one
    matrix product, and a finished lazy block the rest of the layer.
    """
    R, C = W.shape
    dev, dt = W.device, W.dtype
    prunes = pattern is not None and (pattern.kind == "nm" or (sparsity or 0.0) > 0)
    if perm is not None and prunes:
        raise ValueError("a column permutation (act_order) is only supported without pruning")
    # (C, R) in processing order: a column-major W is used in place (no copy)
    Wt = (W if perm is None else W[:, perm]).t().contiguous()
    # the grid is fitted on a row-major W (a column-major one: a copy, the same bits)
    Wg = W if W.is_contiguous() else W.contiguous()
    inv = None
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(C, device=perm.device)

    # pruning geometry: lazy and micro blocks are aligned with the pattern's groups
    nm = prunes and pattern.kind == "nm"
    align = 1
    if nm:
        align = pattern.m
    elif prunes and pattern.kind == "block":
        align = pattern.block
    B = max(align, -(-block_size // align) * align)
    b = min(B, _micro(align))
    sp = float(sparsity or 0.0)

    # quantization state; q = s · clamp(round(w / s), lo, hi) with lo = −zero, hi = maxq − zero
    # (zero is an integer, so this is bit-identical to quantize_values)
    quant = bits is not None
    maxq = 2**bits - 1 if quant else 0
    gs = group_size if (group_size is not None and group_size < C) else None
    dynamic = quant and gs is not None and not static_groups
    St = Lo = Hi = None
    fit_at: dict[int, int] = {}
    if grid is not None and (
        dynamic
        or not quant
        or grid.scale.shape[0] != R
        or (grid.bits, grid.group_size) != (bits, gs)
    ):
        raise ValueError(
            f"a given grid must match bits={bits}, group_size={gs} (static: per row or "
            f"static_groups) and the {R} rows; got bits={grid.bits}, group_size="
            f"{grid.group_size}, scale {tuple(grid.scale.shape)}"
        )
    if quant and not dynamic:
        if grid is None:
            grid = fit_grid(Wg, bits, sym=sym, group_size=gs, search=search, weight=diagH)
        s, z = grid.columns(C)
        if perm is not None:
            s, z = s[:, perm], z[:, perm]
        if gs is None:  # one grid per row: (C, R) broadcast views of one (R,) row, no copies
            s0, z0 = s[:, 0].to(dt), z[:, 0].to(dt)
            St, Lo, Hi = (v.unsqueeze(0).expand(C, R) for v in (s0, -z0, maxq - z0))
        else:
            St, Zt = s.t().to(dt).contiguous(), z.t().to(dt)
            Lo, Hi = (-Zt).contiguous(), (maxq - Zt).contiguous()
    elif dynamic:
        ng = C // gs
        scale = torch.zeros(R, ng, dtype=dt, device=dev)
        zero = torch.zeros(R, ng, dtype=dt, device=dev)
        St = torch.ones(C, R, dtype=dt, device=dev)
        Lo = torch.zeros(C, R, dtype=dt, device=dev)
        Hi = torch.zeros(C, R, dtype=dt, device=dev)
        # processing position at which each group is first met
        col_of_pos = perm if perm is not None else torch.arange(C, device=dev)
        first = torch.full((ng,), C, dtype=torch.long, device=dev)
        first.scatter_reduce_(0, col_of_pos // gs, torch.arange(C, device=dev), "amin")
        fit_at = {int(p): g for g, p in enumerate(first.tolist())}

    del Wg
    Et = torch.empty_like(Wt)  # e_p = (w_p − t_p) / U_pp, processing order
    Pt = torch.zeros(C, R, dtype=torch.bool, device=dev) if prunes else None
    dl = torch.diagonal(U).tolist()

    for i1 in range(0, C, B):
        i2 = min(i1 + B, C)
        if prunes and not nm:
            _select_block(Wt[i1:i2], U[i1:i2, i1:i2], Pt[i1:i2], pattern, sp, scope, R, C, i1, i2)
        for k1 in range(i1, i2, b):
            k2 = min(k1 + b, i2)
            W1 = Wt[k1:k2]
            U1 = U[k1:k2, k1:k2]
            for i in range(k2 - k1):
                j = k1 + i
                w = W1[i]
                if dynamic and j in fit_at:
                    g = fit_at[j]
                    cols = torch.arange(g * gs, (g + 1) * gs, device=dev)
                    pos = cols if inv is None else inv[cols]
                    vals = _current(Wt, Et, U, pos, j, k1, k2, i1, i2)
                    sub = fit_grid(vals.t(), bits, sym=sym, search=search, weight=diagH[cols])
                    scale[:, g] = sub.scale[:, 0]
                    zero[:, g] = sub.zero[:, 0]
                    St[pos] = sub.scale[:, 0].to(dt)
                    Lo[pos] = (-sub.zero[:, 0]).to(dt)
                    Hi[pos] = (maxq - sub.zero[:, 0]).to(dt)
                if nm and (j - i1) % pattern.m == 0:
                    m = pattern.m
                    sc = (W1[i : i + m] / U1.diagonal()[i : i + m].unsqueeze(1)) ** 2
                    idx = torch.topk(sc, m - pattern.n, dim=0, largest=False).indices
                    Pt[j : j + m].scatter_(0, idx, True)
                x = w.masked_fill(Pt[j], 0.0) if prunes else w
                if quant:
                    x = torch.div(x, St[j]).round_().clamp_(Lo[j], Hi[j]).mul_(St[j])
                e = Et[j]
                torch.sub(w, x, out=e)
                e.div_(dl[j])
                w.copy_(x)
                if i + 1 < k2 - k1:
                    W1[i + 1 :].addr_(U1[i, i + 1 :], e, alpha=-1)
            if k2 < i2:
                Wt[k2:i2].addmm_(U[k1:k2, k2:i2].t(), Et[k1:k2], alpha=-1)
        if i2 < C:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Et[i1:i2], alpha=-1)

    row_loss = torch.zeros(R, dtype=torch.float64, device=dev)
    for i in range(0, C, 256):  # ½ Σ_p e_p² per row, 256 columns at a time in float64
        row_loss += Et[i : i + 256].double().square_().sum(0)
    row_loss = 0.5 * row_loss.cpu()
    del Et
    Q = Wt.t()
    if inv is not None:
        Q = Q[:, inv]
    keep = None if Pt is None else (~Pt.t()).contiguous()
    if dynamic:
        grid = QuantGrid(scale=scale, zero=zero, bits=bits, sym=sym, group_size=gs)
    info = {"block_size": B}
    return ColumnOut(weight=Q.contiguous(), keep=keep, row_loss=row_loss, grid=grid, info=info)


def _current(
    Wt: torch.Tensor,
    Et: torch.Tensor,
    U: torch.Tensor,
    pos: torch.Tensor,
    j: int,
    k1: int,
    k2: int,
    i1: int,
    i2: int,
) -> torch.Tensor:
    """Current values ``(len(pos), R)`` of not-yet-fixed columns at ``pos`` (all ``>= j``).

    ``Wt`` is up to date inside the micro block ``[k1, k2)``; columns in ``[k2, i2)`` still miss
    the updates of columns ``k1..j−1``, and columns ``>= i2`` those of ``i1..j−1``.
    """
    vals = Wt[pos]
    for lo, hi, start in ((k2, i2, k1), (i2, Wt.shape[0], i1)):
        sel = (pos >= lo) & (pos < hi)
        if j > start and bool(sel.any()):
            p = pos[sel]
            vals[sel] -= U[start:j, p].t() @ Et[start:j]
    return vals


def smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly ``k`` smallest entries of the 1-D ``x`` (ties: lowest index first).

    A linear-time ``kthvalue`` threshold instead of a ``topk`` sort.
    """
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= x.numel():
        return torch.ones_like(x, dtype=torch.bool)
    thr = torch.kthvalue(x, k).values
    sel = x < thr
    short = k - int(sel.sum())
    if short > 0:
        sel[(x == thr).nonzero().squeeze(1)[:short]] = True
    return sel


def _select_block(
    W1: torch.Tensor,
    U1: torch.Tensor,
    P1: torch.Tensor,
    pattern: Pattern,
    sp: float,
    scope: str,
    R: int,
    C: int,
    i1: int,
    i2: int,
) -> None:
    """Choose the pruned entries ``P1 (n, R)`` of one lazy block (unstructured or blockB)."""
    n = i2 - i1
    d1 = torch.diagonal(U1)
    g = pattern.block if pattern.kind == "block" else 1
    if g == 1:
        score = (W1 / d1.unsqueeze(1)) ** 2  # (n, R): w_p² / U_pp²
    else:
        nbk = n // g
        Ub = torch.diagonal(U1.reshape(nbk, g, nbk, g), 0, 0, 2).permute(2, 0, 1)
        e = torch.linalg.solve_triangular(Ub.transpose(1, 2), W1.reshape(nbk, g, R), upper=False)
        score = 0.5 * (e * e).sum(1)  # (nbk, R): ½ ‖U_BB⁻ᵀ w_B‖²
    u1, u2 = i1 // g, i2 // g
    sel = torch.zeros_like(score, dtype=torch.bool)
    if scope == "row":
        k = _count(sp, u2) - _count(sp, u1)
        if k:
            sel.scatter_(0, torch.topk(score, k, dim=0, largest=False).indices, True)
    else:
        k = _count(sp, R * u2) - _count(sp, R * u1)
        if k:
            sel.view(-1).copy_(smallest(score.reshape(-1), k))
    P1.copy_(sel.repeat_interleave(g, 0) if g > 1 else sel)
