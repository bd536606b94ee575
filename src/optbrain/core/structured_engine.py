"""Structured-OBS greedy engine: removes whole groups of input columns, tracking (H⁻¹, G = WᵀW).

Both the costs and the updates of structured OBS depend on ``W`` only through ``G = Wᵀ W`` (each
update multiplies ``W`` from the right), so the engine tracks the congruent pair ``(H⁻¹, G)``:
after removing group ``B`` with ``U = H⁻¹_{:,B} L⁻ᵀ`` (``L Lᵀ = [H⁻¹]_BB``) and
``P = (G_{:,B} − ½ H⁻¹_{:,B} [H⁻¹]_BB⁻¹ G_BB) L⁻ᵀ``::

    H⁻¹ -= U Uᵀ        G -= P Uᵀ + U Pᵀ        cost_B = ½ tr(L⁻¹ G_BB L⁻ᵀ)

Every step reads one row block (base rows minus the low-rank correction, one product) and
updates the diagonal blocks, so the costs of all remaining groups come from one batched op; the
correction is folded into the base with one matrix product every ``lazy`` columns, and the base
is compacted to the remaining columns as they shrink — the arithmetic of the exact greedy, only
the order of floating-point operations differs.
"""

from __future__ import annotations

import torch

DEFAULT_LAZY = 256  # columns of low-rank correction before a fold
DEFAULT_SHRINK = 0.8  # compact the matrices when fewer columns than this fraction remain


def _blocks(M: torch.Tensor, g: int) -> torch.Tensor:
    """Diagonal ``g×g`` blocks of ``M (m, m)`` → ``(m/g, g, g)``."""
    n = M.shape[0] // g
    return M.reshape(n, g, n, g).diagonal(0, 0, 2).permute(2, 0, 1).clone()


def gram(W: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``Wᵀ W`` computing only the blocks on and below the diagonal (the rest is mirrored)."""
    C = W.shape[1]
    if C <= block:
        return W.T @ W
    G = torch.empty(C, C, dtype=W.dtype, device=W.device)
    edges = list(range(0, C, block)) + [C]
    for i in range(len(edges) - 1):
        a, b = edges[i], edges[i + 1]
        G[a:b, :b] = W[:, a:b].T @ W[:, :b]
        G[:a, a:b] = G[a:b, :a].T
    return G


class _State:
    """The engine's matrices: base ``H⁻¹`` and ``G`` over ``m`` base columns plus the low-rank
    correction ``H⁻¹ = Hb − UᵀU``, ``G = Gb − PᵀU − UᵀP``, rows of U and P interleaved in Z
    (per step: g rows of U, then g rows of P)."""

    def __init__(self, Hinv: torch.Tensor, G: torch.Tensor, g: int, K: int) -> None:
        dev = Hinv.device
        self.g, self.K = g, K
        self.Hb, self.Gb, self.owned = Hinv, G, False  # G is scratch; Hinv is the caller's
        slot = torch.arange(2 * K, device=dev)
        self.is_u = (slot // g) % 2 == 0
        self.swap = torch.where(self.is_u, slot + g, slot - g)  # U row <-> its P row
        self.u_mask = self.is_u.to(Hinv.dtype)
        self.Z = torch.empty(2 * K, Hinv.shape[0], dtype=Hinv.dtype, device=dev)
        self.r = 0  # rows of Z in use
        self.gid = list(range(Hinv.shape[0] // g))  # original group of each base group
        self.offs = torch.arange(g, device=dev)

    def rows(self, idx: torch.Tensor | int) -> torch.Tensor:
        """Current rows ``idx`` of ``H⁻¹`` and of ``G``, stacked: ``(2g, m)``."""
        r = self.r
        if isinstance(idx, int):
            CC = torch.stack([self.Hb[idx], self.Gb[idx]])
            if r:
                zj = self.Z[:r, idx]
                coef = torch.stack([zj * self.u_mask[:r], zj[self.swap[:r]]])
                CC.addmm_(coef, self.Z[:r], alpha=-1)
            return CC
        CC = torch.cat([self.Hb.index_select(0, idx), self.Gb.index_select(0, idx)])
        if r:
            zB = self.Z[:r].index_select(1, idx)  # (r, g)
            coef = torch.cat([(zB * self.u_mask[:r, None]).T, zB[self.swap[:r]].T])
            CC.addmm_(coef, self.Z[:r], alpha=-1)
        return CC

    def full(self) -> bool:
        return self.r == 2 * self.K

    def fold(self, alive: torch.Tensor, shrink: float) -> torch.Tensor:
        """Fold the correction into the base (one product each); compact the base to the alive
        groups once they fall below ``shrink`` of it. Returns the (new) alive mask."""
        if not self.owned:
            self.Hb, self.owned = self.Hb.clone(), True
        Z = self.Z[: self.r]
        U = Z[self.is_u[: self.r]]
        self.Hb.addmm_(U.T, U, alpha=-1)
        self.Gb.addmm_(Z.T, Z[self.swap[: self.r]], alpha=-1)  # Σ z_i z_swap(i)ᵀ = UᵀP + PᵀU
        self.r = 0
        if int(alive.sum()) >= shrink * alive.numel():
            return alive
        keep = alive.nonzero().squeeze(1)
        cols = keep if self.g == 1 else (keep.unsqueeze(1) * self.g + self.offs).reshape(-1)
        self.Hb = self.Hb[cols.unsqueeze(1), cols]
        self.Gb = self.Gb[cols.unsqueeze(1), cols]
        self.gid = [self.gid[i] for i in keep.tolist()]
        self.Z = torch.empty(2 * self.K, cols.numel(), dtype=Z.dtype, device=Z.device)
        return torch.ones(keep.numel(), dtype=torch.bool, device=keep.device)


def _greedy_single(st: _State, steps: int, shrink: float) -> tuple[list[int], list[float]]:
    """Group size 1: scores ``½ G_pp / [H⁻¹]_pp`` of all columns in one op per step."""
    tiny = torch.finfo(st.Hb.dtype).tiny
    inf = float("inf")
    alive = torch.ones(st.Hb.shape[0], dtype=torch.bool, device=st.Hb.device)
    dH, dG = torch.diagonal(st.Hb).clone(), torch.diagonal(st.Gb).clone()
    order, losses = [], []
    for s in range(steps):
        j = int(torch.div(dG, dH.clamp_min(tiny)).argmin())
        CC = st.rows(j)
        m, c = CC[:, j].tolist()
        m = max(m, tiny)
        losses.append(0.5 * c / m)
        order.append(st.gid[j])
        rs = m**-0.5
        u = torch.mul(CC[0], rs, out=st.Z[st.r])
        p = torch.add(CC[1], CC[0], alpha=-0.5 * c / m, out=st.Z[st.r + 1]).mul_(rs)
        st.r += 2
        dH.addcmul_(u, u, value=-1)
        dG.addcmul_(p, u, value=-2)
        dG[j] = inf  # removed: never the argmin again (the updates keep it at +inf)
        alive[j] = False
        if st.full() and s < steps - 1:
            alive = st.fold(alive, shrink)
            dH, dG = torch.diagonal(st.Hb).clone(), torch.diagonal(st.Gb).clone()
            dG.masked_fill_(~alive, inf)
    return order, losses


def _greedy_block(st: _State, steps: int, shrink: float) -> tuple[list[int], list[float]]:
    """Groups of g > 1 columns: ``½ tr([H⁻¹]_BB⁻¹ G_BB)`` of all groups, batched, per step."""
    g = st.g
    dev, dt = st.Hb.device, st.Hb.dtype
    eye = torch.eye(g, dtype=dt, device=dev)
    inf = torch.tensor(float("inf"), dtype=dt, device=dev)
    alive = torch.ones(st.Hb.shape[0] // g, dtype=torch.bool, device=dev)
    dH, dG = _blocks(st.Hb, g), _blocks(st.Gb, g)
    order, losses = [], []
    for s in range(steps):
        A = torch.where(alive[:, None, None], dH, eye)
        LA, _ = torch.linalg.cholesky_ex(A)
        score = torch.cholesky_solve(dG, LA).diagonal(0, 1, 2).sum(1)
        j = int(torch.where(alive, score, inf).argmin())
        idx = j * g + st.offs
        CC = st.rows(idx)
        Ch, Cg = CC[:g], CC[g:]
        M, Gbb = Ch.index_select(1, idx), Cg.index_select(1, idx)
        M, Gbb = 0.5 * (M + M.T), 0.5 * (Gbb + Gbb.T)
        L, _ = torch.linalg.cholesky_ex(M)
        losses.append(0.5 * float(torch.cholesky_solve(Gbb, L).diagonal().sum()))
        order.append(st.gid[j])
        un = torch.linalg.solve_triangular(L, Ch, upper=False)  # L⁻¹ H⁻¹[B, :]
        pn = torch.linalg.solve_triangular(
            L, Cg - 0.5 * Gbb @ torch.cholesky_solve(Ch, L), upper=False
        )
        st.Z[st.r : st.r + g], st.Z[st.r + g : st.r + 2 * g] = un, pn
        st.r += 2 * g
        ub, pb = un.reshape(g, -1, g), pn.reshape(g, -1, g)
        dH -= torch.einsum("kna,knb->nab", ub, ub)
        X = torch.einsum("kna,knb->nab", pb, ub)
        dG -= X + X.transpose(1, 2)
        alive[j] = False
        if st.full() and s < steps - 1:
            alive = st.fold(alive, shrink)
            dH, dG = _blocks(st.Hb, g), _blocks(st.Gb, g)
    return order, losses


def greedy_groups(
    Hinv: torch.Tensor,
    G: torch.Tensor,
    g: int,
    steps: int,
    lazy: int = DEFAULT_LAZY,
    shrink: float = DEFAULT_SHRINK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy structured OBS on ``(H⁻¹, G = WᵀW)``, both ``(C, C)``, groups of ``g`` columns.

    ``G`` is overwritten (scratch); ``H⁻¹`` is not. Speed knobs (results do not depend on them
    beyond rounding): ``lazy`` columns of low-rank correction between folds; the matrices are
    compacted to the remaining columns once those fall below ``shrink`` of them.

    Returns ``(order (steps,) long, step_loss (steps,) float64)``: the group removed at each step
    and ``½ tr(W_B [H⁻¹]_BB⁻¹ W_Bᵀ)`` of that step in the then-current state.
    """
    n = Hinv.shape[0] // g
    steps = max(0, min(int(steps), n - 1))
    st = _State(Hinv, G, g, g * max(1, int(lazy) // g))
    if steps == 0:
        order, losses = [], []
    elif g == 1:
        order, losses = _greedy_single(st, steps, shrink)
    else:
        order, losses = _greedy_block(st, steps, shrink)
    dev = Hinv.device
    return (
        torch.tensor(order, dtype=torch.long, device=dev),
        torch.tensor(losses, dtype=torch.float64, device=dev),
    )
