"""ExactOBS: greedy Optimal-Brain-Surgeon removal with exact updates, for every row of a layer.

Each row ``w (cols,)`` of ``W`` is its own problem ``min ½ δ H δᵀ`` sharing ``H (cols, cols)``.
One greedy step fixes one coordinate ``p`` of ``w`` to a target ``t_p`` (0 when pruning, the
grid value when quantizing) and re-solves the rest exactly (OBS)::

    p     = argmin_p (w_p − t_p)² / [H⁻¹]_pp        loss += ½ (w_p − t_p)² / [H⁻¹]_pp
    w    -= (w_p − t_p) / [H⁻¹]_pp · H⁻¹[:, p]
    H⁻¹  -= H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp           (inverse of H with p removed)

Speed: every row starts from the same ``H⁻¹``. The engine keeps the per-row downdates lazily as a
low-rank term ``H⁻¹_row = B_row − U_rowᵀ U_row`` (``U_row`` holds at most ``lazy`` rank-1 rows),
so a step only gathers one column of ``B`` and one small product with ``U``; every ``lazy``
steps the term is folded into ``B`` with one batched matrix product (compute-bound). The first
block never materialises per-row copies: ``B`` is the shared ``H⁻¹``. The arithmetic is that of
the exact algorithm — only the order of floating-point operations differs.

Block (group) OBS removes ``g`` consecutive coordinates at once::

    loss += ½ w_Bᵀ [H⁻¹]_BB⁻¹ w_B      w -= H⁻¹[:, B] [H⁻¹]_BB⁻¹ w_B
    H⁻¹  -= H⁻¹[:, B] [H⁻¹]_BB⁻¹ H⁻¹[B, :]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .hessian import PreparedHessian
from .patterns import Pattern

DEFAULT_MEMORY = 1 << 30  # bytes of per-row H⁻¹ state per chunk of rows


@dataclass(frozen=True)
class EngineConfig:
    """Performance knobs of the greedy engine; results do not depend on them (up to rounding).

    lazy: rank-1 downdates kept as a low-rank term before folding into the per-row H⁻¹.
    shrink: compact the working set once it has shrunk to this fraction (0 = never).
    memory: bytes of per-row H⁻¹ state processed at once (rows are chunked to fit).
    """

    lazy: int = 32
    shrink: float = 0.5
    memory: int = DEFAULT_MEMORY

    def __post_init__(self) -> None:
        if not isinstance(self.lazy, int) or self.lazy < 1:
            raise ValueError(f"lazy must be an integer >= 1, got {self.lazy!r}")
        if not (0.0 <= float(self.shrink) < 1.0):
            raise ValueError(f"shrink must be in [0, 1), got {self.shrink!r}")
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"memory must be a positive number of bytes, got {self.memory!r}")


DEFAULT_ENGINE = EngineConfig()


def row_chunks(rows: int, per_row: int, memory: int = DEFAULT_MEMORY) -> list[slice]:
    """Split ``rows`` into slices whose state (``per_row`` bytes each) fits ``memory`` bytes."""
    n = max(1, int(memory // max(1, per_row)))
    return [slice(i, min(rows, i + n)) for i in range(0, rows, n)]


@dataclass
class GreedyOut:
    """Outcome of the greedy engine on ``R`` rows.

    weight: ``(R, C)`` final weights (fixed coordinates hold their targets).
    order: ``(R, steps)`` coordinate (g = 1) or block index (g > 1) fixed at each step.
    step_loss: ``(R, steps)`` loss increment of each step (float64).
    """

    weight: torch.Tensor
    order: torch.Tensor
    step_loss: torch.Tensor


class Scorer:
    """Chooses the next coordinate of every row: ``score`` (+inf where not allowed) and the
    ``target`` value the chosen coordinate is fixed to.

    The engine works on a compacted set of *working* coordinates ``pos (R, Cw)`` (original column
    indices); ``gather(pos)`` is called whenever that set changes so per-column attributes can be
    re-indexed, and ``removed(p)`` with the original column index fixed in each row.
    """

    def gather(self, pos: torch.Tensor) -> None:  # noqa: B027 - optional hook
        pass

    def removed(self, p: torch.Tensor) -> None:  # noqa: B027 - optional hook
        pass

    def __call__(
        self, w: torch.Tensor, d: torch.Tensor, alive: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PruneScorer(Scorer):
    """OBS pruning saliency ``w_p² / [H⁻¹]_pp``; target 0."""

    def __call__(self, w, d, alive, step):
        score = (w * w / d).masked_fill_(~alive, float("inf"))
        return score, None


class NMScorer(Scorer):
    """Pruning saliency restricted to groups of ``m`` columns that still keep more than ``n``."""

    def __init__(self, rows: int, cols: int, n: int, m: int, device: torch.device) -> None:
        self.n, self.m = n, m
        self.count = torch.zeros(rows, cols // m, dtype=torch.long, device=device)
        self.group = None

    def gather(self, pos):
        self.group = pos // self.m

    def removed(self, p):
        self.count[torch.arange(p.shape[0], device=p.device), p // self.m] += 1

    def __call__(self, w, d, alive, step):
        full = (self.count >= self.m - self.n).gather(1, self.group)
        score = (w * w / d).masked_fill_(full | ~alive, float("inf"))
        return score, None


def fold(B: torch.Tensor, U: torch.Tensor, shared: bool) -> torch.Tensor:
    """``B − UᵀU`` per row: B ``(C, C)`` shared by all rows (a new ``(R, C, C)`` tensor is made)
    or ``(R, C, C)`` (updated in place); U ``(R, k, C)``."""
    if shared:
        return torch.baddbmm(B.unsqueeze(0), U.transpose(1, 2), U, alpha=-1)
    return B.baddbmm_(U.transpose(1, 2), U, alpha=-1)


def greedy_single(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    steps: int,
    scorer: Scorer,
    pos: torch.Tensor | None = None,
    engine: EngineConfig = DEFAULT_ENGINE,
) -> GreedyOut:
    """Greedy one-coordinate-at-a-time OBS on every row, ``steps`` steps.

    W: ``(R, C)`` weights. Working coordinates: ``pos (R, Cw)`` original column indices, the
    same count in every row (default: all columns); coordinates outside ``pos`` keep their value.
    Hinv: ``(C, C)`` shared by all rows (only with ``pos=None``), or ``(R, Cw, Cw)`` per row over
    the working coordinates. The target of a step is 0 when the scorer returns ``target=None``.

    Every ``lazy`` steps the low-rank downdates are folded into the per-row inverse; once the
    fixed coordinates reach ``1 − shrink`` of the working set they are dropped from it (a
    gather), so later steps work on smaller matrices.
    """
    R, C = W.shape
    dev, dt = W.device, W.dtype
    out = W.clone()
    ar = torch.arange(R, device=dev)
    shared = Hinv.dim() == 2
    if pos is None:
        pos = torch.arange(C, device=dev).expand(R, C)
        w = W.clone()
    else:
        if shared:
            raise ValueError("a shared Hinv (C, C) needs pos=None")
        w = W.gather(1, pos)
    Cw = pos.shape[1]
    steps = min(steps, Cw)
    B = Hinv
    d = (torch.diagonal(Hinv).expand(R, Cw) if shared else torch.diagonal(Hinv, 0, 1, 2)).clone()
    alive = torch.ones(R, Cw, dtype=torch.bool, device=dev)
    lazy = max(1, min(engine.lazy, steps))
    U = torch.zeros(R, lazy, Cw, dtype=dt, device=dev)
    order = torch.zeros(R, steps, dtype=torch.long, device=dev)
    step_loss = torch.zeros(R, steps, dtype=torch.float64, device=dev)
    tiny = torch.finfo(dt).tiny
    scorer.gather(pos)
    k = 0
    for s in range(steps):
        score, target = scorer(w, d, alive, s)
        p = score.argmin(1)
        col = B.index_select(0, p) if shared else B[ar, p]
        if k:
            up = U[ar, :k, p]  # (R, k)
            col.unsqueeze(1).baddbmm_(up.unsqueeze(1), U[:, :k], alpha=-1)
        dp = col[ar, p].clamp_min(tiny)
        wp = w[ar, p]
        t = target[ar, p] if target is not None else torch.zeros_like(wp)
        val = wp - t
        step_loss[:, s] = 0.5 * val.double() ** 2 / dp.double()
        w.addcmul_(col, (val / dp).unsqueeze(1), value=-1)
        p_orig = pos[ar, p]
        out[ar, p_orig] = t
        torch.mul(col, dp.rsqrt().unsqueeze(1), out=U[:, k])
        d.addcmul_(U[:, k], U[:, k], value=-1)
        alive[ar, p] = False
        order[:, s] = p_orig
        scorer.removed(p_orig)
        k += 1
        if k == lazy or s == steps - 1:
            B = fold(B, U[:, :k], shared)
            shared = False
            n = alive.shape[1] - int((~alive[0]).sum())
            k = 0
            if s == steps - 1 or n > engine.shrink * alive.shape[1]:
                d = torch.diagonal(B, 0, 1, 2).clone()
                continue
            # drop fixed coordinates: every row has the same number left
            keep = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :n]
            B = B[ar.unsqueeze(1), keep].gather(2, keep.unsqueeze(1).expand(R, n, n))
            w = w.gather(1, keep)
            pos = pos.gather(1, keep)
            alive = torch.ones(R, n, dtype=torch.bool, device=dev)
            d = torch.diagonal(B, 0, 1, 2).clone()
            U = torch.zeros(R, lazy, n, dtype=dt, device=dev)
            scorer.gather(pos)
    vals = torch.where(alive, w, out.gather(1, pos))
    out.scatter_(1, pos, vals)
    return GreedyOut(weight=out, order=order, step_loss=step_loss)


def _diag_blocks(B: torch.Tensor, g: int) -> torch.Tensor:
    """Diagonal ``g×g`` blocks of ``B (R, C, C)`` (or ``(C, C)``) → ``(R, C/g, g, g)``."""
    if B.dim() == 2:
        B = B.unsqueeze(0)
    R, C, _ = B.shape
    nb = C // g
    return B.reshape(R, nb, g, nb, g).diagonal(0, 1, 3).permute(0, 3, 1, 2).clone()


def small_inv_quad(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``bᵀ A⁻¹ b`` for many small SPD matrices: A ``(..., g, g)``, b ``(..., g)`` → ``(...)``.

    An unrolled Cholesky (``||L⁻¹ b||²``) in elementwise tensor operations: for the tiny blocks
    of group OBS this is much faster than a batched LAPACK call per matrix.
    """
    g = A.shape[-1]
    tiny = torch.finfo(A.dtype).tiny
    L = [[None] * g for _ in range(g)]
    y = [None] * g
    total = torch.zeros(A.shape[:-2], dtype=A.dtype, device=A.device)
    for j in range(g):
        s = A[..., j, j]
        for k in range(j):
            s = s - L[j][k] * L[j][k]
        L[j][j] = s.clamp_min(tiny).sqrt()
        for i in range(j + 1, g):
            t = A[..., i, j]
            for k in range(j):
                t = t - L[i][k] * L[j][k]
            L[i][j] = t / L[j][j]
        t = b[..., j]
        for k in range(j):
            t = t - L[j][k] * y[k]
        y[j] = t / L[j][j]
        total = total + y[j] * y[j]
    return total


def greedy_block(
    W: torch.Tensor, Hinv: torch.Tensor, g: int, steps: int, engine: EngineConfig = DEFAULT_ENGINE
) -> GreedyOut:
    """Greedy group OBS: remove (zero) one block of ``g`` consecutive columns per step.

    W: ``(R, C)`` with ``C % g == 0``; Hinv: ``(C, C)`` shared. Returns block indices in
    ``order (R, steps)`` and per-step losses ``½ w_Bᵀ [H⁻¹]_BB⁻¹ w_B``.
    """
    R, C = W.shape
    nb = C // g
    dev, dt = W.device, W.dtype
    w = W.clone()
    alive = torch.ones(R, nb, dtype=torch.bool, device=dev)
    shared = True
    B = Hinv
    D = _diag_blocks(Hinv, g).expand(R, nb, g, g).clone()
    lazy = g * max(1, engine.lazy // g)
    U = torch.zeros(R, lazy, C, dtype=dt, device=dev)
    ar = torch.arange(R, device=dev)
    offs = torch.arange(g, device=dev)
    eye = torch.eye(g, dtype=dt, device=dev)
    order = torch.zeros(R, steps, dtype=torch.long, device=dev)
    step_loss = torch.zeros(R, steps, dtype=torch.float64, device=dev)
    k = 0
    for s in range(steps):
        Dsafe = torch.where(alive[..., None, None], D, eye)
        if g <= 8:
            score = 0.5 * small_inv_quad(Dsafe, w.reshape(R, nb, g))
        else:
            L, _ = torch.linalg.cholesky_ex(Dsafe)
            wb = w.reshape(R, nb, g, 1)
            score = 0.5 * (wb * torch.cholesky_solve(wb, L)).sum((-1, -2))
        score = torch.where(alive, score, torch.full_like(score, float("inf")))
        j = score.argmin(1)
        idx = j.unsqueeze(1) * g + offs  # (R, g)
        if shared:
            cols = B[idx]  # (R, g, C)
        else:
            cols = B.gather(1, idx.unsqueeze(2).expand(R, g, C))
        if k:
            up = U[:, :k].gather(2, idx.unsqueeze(1).expand(R, k, g))  # (R, k, g)
            cols = cols - torch.bmm(up.transpose(1, 2), U[:, :k])
        A = cols.gather(2, idx.unsqueeze(1).expand(R, g, g))
        A = 0.5 * (A + A.transpose(1, 2))
        LA, _ = torch.linalg.cholesky_ex(A)
        wB = w.gather(1, idx).unsqueeze(2)  # (R, g, 1)
        coef = torch.cholesky_solve(wB, LA)  # (R, g, 1)
        step_loss[:, s] = (0.5 * (wB * coef).sum((1, 2))).double()
        w -= torch.bmm(coef.transpose(1, 2), cols).squeeze(1)
        w.scatter_(1, idx, 0.0)
        Linv = torch.linalg.solve_triangular(LA, eye.expand(R, g, g), upper=False)
        Un = torch.bmm(Linv, cols)  # L⁻¹ cols: (R, g, C)
        U[:, k : k + g] = Un
        Ub = Un.reshape(R, g, nb, g)
        D -= torch.einsum("rkna,rknb->rnab", Ub, Ub)
        alive[ar, j] = False
        order[:, s] = j
        k += g
        if k == lazy or s == steps - 1:
            B = fold(B, U[:, :k], shared)
            shared = False
            D = _diag_blocks(B, g)
            U.zero_()
            k = 0
    keep = alive.repeat_interleave(g, dim=1)
    w = torch.where(keep, w, torch.zeros_like(w))
    return GreedyOut(weight=w, order=order, step_loss=step_loss)


def select_counts(step_loss: torch.Tensor, total: int) -> torch.Tensor:
    """Layer-wide selection: how many greedy steps each row takes, ``total`` steps in all.

    step_loss: ``(R, S)``. The marginal cost of a row's k-th step is made non-decreasing
    (running maximum), then the ``total`` cheapest steps over all rows are taken; each row's
    taken steps form a prefix of its greedy order. Returns counts ``(R,)``.
    """
    R, S = step_loss.shape
    total = int(max(0, min(total, R * S)))
    if total == 0:
        return torch.zeros(R, dtype=torch.long, device=step_loss.device)
    marg = torch.cummax(step_loss, dim=1).values.reshape(-1)
    idx = torch.sort(marg, stable=True).indices[:total]
    return torch.bincount(idx // S, minlength=R)


def masked_optimum(
    W: torch.Tensor,
    H: torch.Tensor,
    keep: torch.Tensor,
    memory: int = DEFAULT_MEMORY,
    Hinv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Least-squares optimum with a fixed mask: ``argmin ½ δ H δᵀ`` s.t. ``Ŵ = 0`` where pruned.

    W: ``(R, C)``, H: ``(C, C)`` positive definite, keep: ``(R, C)`` bool; Hinv: optional
    ``H⁻¹``. For each row with pruned set S and kept set F, two equal closed forms::

        Ŵ_F = W_F + H_FF⁻¹ H_FS W_S                     (a |F|×|F| solve)
        Ŵ   = W − H⁻¹[:, S] (H⁻¹_SS)⁻¹ W_S,  Ŵ_S = 0     (a |S|×|S| solve)

    The smaller system is solved, batched over rows (padded to the largest row).
    """
    R, C = W.shape
    out = torch.where(keep, W, torch.zeros_like(W))
    n_pruned = (~keep).sum(1)
    rows = ((n_pruned > 0) & (n_pruned < C)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return out
    kmax = int(n_pruned[rows].max())
    fmax = int((C - n_pruned[rows]).max())
    use_inv = kmax <= fmax
    if use_inv and Hinv is None:
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    n = kmax if use_inv else fmax
    for sl in row_chunks(rows.numel(), 2 * (n * n + n * C) * W.element_size(), memory):
        r = rows[sl]
        kp = keep[r]
        Wr = W[r]
        sel = ~kp if use_inv else kp
        pos = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :n]
        valid = sel.gather(1, pos)
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        eye = torch.eye(n, dtype=W.dtype, device=W.device)
        M = Hinv if use_inv else H
        A = torch.where(both, M[pos.unsqueeze(2), pos.unsqueeze(1)], eye)
        L, _ = torch.linalg.cholesky_ex(A)
        if use_inv:
            ws = (Wr.gather(1, pos) * valid).unsqueeze(2)
            sol = torch.cholesky_solve(ws, L)  # (n_rows, k, 1)
            res = Wr - torch.bmm(sol.transpose(1, 2), Hinv[pos]).squeeze(1)
        else:
            rhs = ((Wr * (~kp)) @ H).gather(1, pos) * valid
            delta = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2) * valid
            res = Wr.scatter_add(1, pos, delta)
        out[r] = torch.where(kp, res, torch.zeros_like(res))
    return out


class PruneTrace:
    """One ExactOBS pass: every row's greedy order and per-step losses, all sparsities from it.

    ``order (rows, steps)``: coordinate (unstructured) or block index (block pattern) removed
    at each step; ``step_loss (rows, steps)``: loss increment of each step. ``at(s)`` gives the
    layer at sparsity ``s`` (layer-wide selection: rows may end at different sparsities; the
    weights are the exact OBS state, i.e. the least-squares optimum for the chosen mask);
    ``levels([...])`` several at once — no greedy re-run.
    """

    def __init__(
        self,
        W: torch.Tensor,
        prepared: PreparedHessian,
        order: torch.Tensor,
        step_loss: torch.Tensor,
        pattern: Pattern,
        engine: EngineConfig = DEFAULT_ENGINE,
    ) -> None:
        self.W = W
        self.prepared = prepared
        self.order = order
        self.step_loss = step_loss
        self.pattern = pattern
        self.group = pattern.block if pattern.kind == "block" else 1
        self.engine = engine

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)  # type: ignore[return-value]

    @property
    def units(self) -> int:
        """Removable units per row: columns (unstructured) or blocks."""
        return self.W.shape[1] // self.group

    @property
    def max_sparsity(self) -> float:
        """The highest sparsity this trace can give (it may have stopped early)."""
        return self.step_loss.shape[1] / self.units

    def counts(self, sparsity: float, per_row: bool = False) -> torch.Tensor:
        """Steps taken per row ``(rows,)`` for a target ``sparsity`` of the whole layer.

        Layer-wide (default): ``round(sparsity · rows · units)`` steps in all, split over rows
        by ``select_counts``; if the same sparsity in every row has a lower predicted loss (the
        running-max rule is a heuristic when step costs are not monotone), that split is used.
        ``per_row``: ``round(sparsity · units)`` steps in every row.
        """
        R, S = self.step_loss.shape
        per = int(round(sparsity * self.units))
        if per > S or sparsity > self.max_sparsity + 1e-12:
            raise ValueError(
                f"sparsity {sparsity} is beyond this trace, which stops at "
                f"max_sparsity={self.max_sparsity:.4g}; run the trace further"
            )
        uniform = torch.full((R,), per, dtype=torch.long, device=self.step_loss.device)
        if per_row:
            return uniform
        layer = select_counts(self.step_loss, int(round(sparsity * R * self.units)))
        if int(layer.sum()) == int(uniform.sum()) and (
            float(self.loss(uniform).sum()) < float(self.loss(layer).sum())
        ):
            return uniform
        return layer

    def mask(self, counts: torch.Tensor) -> torch.Tensor:
        """Kept-weight mask ``(rows, cols)`` after ``counts[r]`` steps in row r."""
        R, S = self.order.shape
        taken = torch.arange(S, device=self.order.device).unsqueeze(0) < counts.unsqueeze(1)
        removed = torch.zeros(R, self.units, dtype=torch.bool, device=self.order.device)
        removed.scatter_(1, self.order, taken)
        if self.group > 1:
            removed = removed.repeat_interleave(self.group, dim=1)
        return ~removed

    def loss(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-row predicted loss ``(rows,)`` after ``counts[r]`` steps (float64)."""
        S = self.step_loss.shape[1]
        counts = counts.to(self.step_loss.device)
        taken = torch.arange(S, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)
        return (self.step_loss * taken).sum(1).cpu()

    def at(
        self, sparsity: float, per_row: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weight, mask, row_loss)`` at ``sparsity`` (compute dtype)."""
        counts = self.counts(sparsity, per_row)
        keep = self.mask(counts)
        weight = masked_optimum(
            self.W, self.prepared.H, keep, self.engine.memory, self.prepared.Hinv
        )
        return weight, keep, self.loss(counts)

    def levels(
        self, sparsities: Sequence[float], per_row: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [self.at(s, per_row) for s in sparsities]


def obs_trace(
    W: torch.Tensor,
    prepared: PreparedHessian,
    pattern: Pattern,
    max_sparsity: float = 1.0,
    engine: EngineConfig = DEFAULT_ENGINE,
) -> PruneTrace:
    """Run ExactOBS (unstructured or block) on every row of ``W (rows, cols)``.

    Records ``ceil(max_sparsity · steps)`` greedy steps per row (all of them by default), so
    every sparsity up to ``max_sparsity`` can be read from the trace.
    """
    R, C = W.shape
    g = pattern.block if pattern.kind == "block" else 1
    total = C // g
    steps = max(1, min(total, int(-(-max_sparsity * total // 1))))
    orders, losses = [], []
    for sl in row_chunks(R, 2 * C * C * W.element_size(), engine.memory):
        if g == 1:
            out = greedy_single(W[sl], prepared.Hinv, steps, PruneScorer(), engine=engine)
        else:
            out = greedy_block(W[sl], prepared.Hinv, g, steps, engine=engine)
        orders.append(out.order)
        losses.append(out.step_loss)
    return PruneTrace(W, prepared, torch.cat(orders), torch.cat(losses), pattern, engine)


def prune_nm(
    W: torch.Tensor,
    prepared: PreparedHessian,
    n: int,
    m: int,
    engine: EngineConfig = DEFAULT_ENGINE,
) -> GreedyOut:
    """ExactOBS under the N:M pattern: prune ``m − n`` of every ``m`` consecutive columns."""
    R, C = W.shape
    steps = (C // m) * (m - n)
    outs = [
        greedy_single(
            W[sl],
            prepared.Hinv,
            steps,
            NMScorer(sl.stop - sl.start, C, n, m, W.device),
            engine=engine,
        )
        for sl in row_chunks(R, 2 * C * C * W.element_size(), engine.memory)
    ]
    return GreedyOut(
        torch.cat([o.weight for o in outs]),
        torch.cat([o.order for o in outs]),
        torch.cat([o.step_loss for o in outs]),
    )
