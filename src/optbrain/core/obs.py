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

from dataclasses import dataclass

import torch

from . import obs_fused, ticks

DEFAULT_MEMORY = 1 << 30  # bytes of per-row H⁻¹ state per chunk of rows


@dataclass(frozen=True)
class EngineConfig:
    """Performance knobs of the greedy engine; results do not depend on them (up to rounding).

    kernel: ``"fused"`` — the compiled per-row kernel (``core.obs_fused``: CPU tensors, numba),
    ``"torch"`` — batched tensor operations (any device), ``"auto"`` (default) — fused where it
    can run (CPU tensors, a scorer it knows, numba importable), else torch.
    lazy: rank-1 downdates kept as a low-rank term before folding into the per-row H⁻¹
    (default: 16 for the fused kernel, 32 for the tensor engine — the measured best of each,
    ``benchmarks/bench_engine.py --engine``).
    shrink: (tensor engine) compact the working set once it has shrunk to this fraction
    (0 = never); the fused kernel compacts at every step.
    memory: bytes of per-row H⁻¹ state processed at once (rows are chunked to fit).
    step_threads: torch threads for the small per-step operations (``(R, C)`` vectors: each is
    one parallel region, and on a busy machine every region waits for its slowest thread); the
    folds and gathers keep the caller's thread count. 0 (default): the caller's count everywhere.
    Tensor engine only: the fused kernel has no per-step parallel regions; its rows run on a
    pool of the caller's thread count, plus workers while other processes are busy
    (``obs_fused.pool_threads``).
    Measured (``benchmarks/bench_engine.py --engine "default step_threads=1" --busy 3``, 256×512
    full trace, 2-core machine shared with other jobs): step_threads=1 was ~10% faster quiet but
    1.3–1.5× slower with 3 competing busy processes, hence not the default.
    """

    lazy: int | None = None
    shrink: float = 0.5
    memory: int = DEFAULT_MEMORY
    step_threads: int = 0
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.lazy is not None and (not isinstance(self.lazy, int) or self.lazy < 1):
            raise ValueError(f"lazy must be an integer >= 1, got {self.lazy!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if not (0.0 <= float(self.shrink) < 1.0):
            raise ValueError(f"shrink must be in [0, 1), got {self.shrink!r}")
        if not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"memory must be a positive number of bytes, got {self.memory!r}")
        if not isinstance(self.step_threads, int) or self.step_threads < 0:
            raise ValueError(f"step_threads must be an integer >= 0, got {self.step_threads!r}")

    def lazy_for(self, kernel: str) -> int:
        """The lazy depth of ``kernel`` ("fused" or "torch"): the set one, else its default."""
        return self.lazy if self.lazy is not None else LAZY_DEFAULT[kernel]

    def fused_for(self, W: torch.Tensor, scorer: Scorer) -> bool:
        """Whether the fused kernel runs this call (``kernel`` and what can run here)."""
        if self.kernel == "torch":
            return False
        can = W.device.type == "cpu" and scorer.fused() is not None and obs_fused.available()
        if self.kernel == "fused" and not can:
            raise ValueError(
                "kernel='fused' needs CPU tensors, a prune / N:M / quantization scorer and numba "
                f"(device {W.device.type}, numba importable: {obs_fused.available()}); "
                "use kernel='auto' to fall back to the tensor engine"
            )
        return can


KERNELS = ("auto", "fused", "torch")
LAZY_DEFAULT = {"fused": 16, "torch": 32}
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

    def fused(self) -> dict | None:
        """Keyword arguments of ``obs_fused.fused_greedy`` for this scorer (its ``mode`` and
        parameters), or None when only the tensor engine knows it."""
        return None

    def __call__(
        self, w: torch.Tensor, d: torch.Tensor, alive: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PruneScorer(Scorer):
    """OBS pruning saliency ``w_p² / [H⁻¹]_pp``; target 0."""

    def fused(self):
        return {"mode": obs_fused.PRUNE}

    def __call__(self, w, d, alive, step):
        score = (w * w / d).masked_fill_(~alive, float("inf"))
        return score, None


class NMScorer(Scorer):
    """Pruning saliency restricted to groups of ``m`` columns that still keep more than ``n``."""

    def __init__(self, rows: int, cols: int, n: int, m: int, device: torch.device) -> None:
        self.n, self.m = n, m
        self.count = torch.zeros(rows, cols // m, dtype=torch.long, device=device)
        self.group = None

    def fused(self):
        return {"mode": obs_fused.NM, "nm": (self.n, self.m)}

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
    shared = Hinv.dim() == 2
    if pos is not None and shared:
        raise ValueError("a shared Hinv (C, C) needs pos=None")
    if engine.fused_for(W, scorer):
        weight, order, step_loss = obs_fused.fused_greedy(
            W, Hinv, steps, pos=pos, lazy=engine.lazy_for("fused"), progress=ticks.tick,
            **scorer.fused(),
        )  # fmt: skip
        return GreedyOut(weight=weight, order=order, step_loss=step_loss)
    dev, dt = W.device, W.dtype
    out = W.clone()
    if pos is None:
        pos = torch.arange(C, device=dev).expand(R, C)
        w = W.clone()
    else:
        w = W.gather(1, pos)
    Cw = pos.shape[1]
    steps = min(steps, Cw)
    B = Hinv
    d = (torch.diagonal(Hinv).expand(R, Cw) if shared else torch.diagonal(Hinv, 0, 1, 2)).clone()
    alive = torch.ones(R, Cw, dtype=torch.bool, device=dev)
    lazy = max(1, min(engine.lazy_for("torch"), steps))
    U = torch.zeros(R, lazy, Cw, dtype=dt, device=dev)
    order = torch.zeros(R, steps, dtype=torch.long, device=dev)
    step_loss = torch.zeros(R, steps, dtype=torch.float64, device=dev)
    scorer.gather(pos)
    big = torch.get_num_threads()
    small = engine.step_threads or big
    try:
        _set_threads(small)
        w, pos, alive = _steps(
            out, w, B, d, pos, alive, U, order, step_loss, scorer, steps, lazy, engine, big, small
        )
    finally:
        _set_threads(big)
    vals = torch.where(alive, w, out.gather(1, pos))
    out.scatter_(1, pos, vals)
    return GreedyOut(weight=out, order=order, step_loss=step_loss)


def _set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _steps(out, w, B, d, pos, alive, U, order, step_loss, scorer, steps, lazy, engine, big, small):
    """The step loop of ``greedy_single`` (its state, updated in place) → ``(w, pos, alive)``;
    per-step work runs with ``small`` threads, folds and gathers with ``big``."""
    R = w.shape[0]
    dev, dt = w.device, w.dtype
    ar = torch.arange(R, device=dev)
    shared = B.dim() == 2
    B = B if shared else B.contiguous()
    tiny = torch.finfo(dt).tiny
    Cw = alive.shape[1]
    k = 0
    # per-row picks are read with gather / index_select on flat rows (row copies) rather than
    # advanced indexing ``B[ar, p]`` (an element-wise index kernel): same values, fewer cycles
    for s in range(steps):
        score, target = scorer(w, d, alive, s)
        p1 = score.argmin(1, keepdim=True)  # (R, 1)
        p = p1.squeeze(1)
        if shared:
            col = B.index_select(0, p)
        else:
            n_w = B.shape[1]
            col = B.view(R * n_w, n_w).index_select(0, ar * n_w + p)
        if k:
            up = U[:, :k].gather(2, p1.unsqueeze(1).expand(R, k, 1))  # (R, k, 1)
            col.unsqueeze(1).baddbmm_(up.transpose(1, 2), U[:, :k], alpha=-1)
        dp = col.gather(1, p1).clamp_min_(tiny)  # (R, 1)
        wp = w.gather(1, p1)
        t = target.gather(1, p1) if target is not None else torch.zeros_like(wp)
        val = wp - t
        step_loss[:, s] = (0.5 * val.double() ** 2 / dp.double()).squeeze(1)
        w.addcmul_(col, val / dp, value=-1)
        p_orig = pos.gather(1, p1)
        out.scatter_(1, p_orig, t)
        torch.mul(col, dp.rsqrt(), out=U[:, k])
        d.addcmul_(U[:, k], U[:, k], value=-1)
        alive.scatter_(1, p1, False)
        p_orig = p_orig.squeeze(1)
        order[:, s] = p_orig
        scorer.removed(p_orig)
        k += 1
        if k == lazy or s == steps - 1:
            _set_threads(big)
            B = fold(B, U[:, :k], shared)
            shared = False
            n = alive.shape[1] - int((~alive[0]).sum())
            k = 0
            ticks.tick(ticks.cubic_done(s + 1, steps, Cw))
            if s == steps - 1 or n > engine.shrink * alive.shape[1]:
                d = torch.diagonal(B, 0, 1, 2).clone()
                _set_threads(small)
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
            _set_threads(small)
    return w, pos, alive


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
    lazy = g * max(1, engine.lazy_for("torch") // g)
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
            ticks.tick((s + 1) / steps)  # no working-set shrink: equal work per step
    keep = alive.repeat_interleave(g, dim=1)
    w = torch.where(keep, w, torch.zeros_like(w))
    return GreedyOut(weight=w, order=order, step_loss=step_loss)


def selected_positions(sel: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` selected columns of every row of ``sel (R, C)``, in column order:
    ``(pos (R, n), valid (R, n))`` — rows with fewer are padded (``valid`` False)."""
    pos = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :n]
    return pos, sel.gather(1, pos)


def restricted_cholesky(M: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row Cholesky factor ``(R, n, n)`` of ``M (C, C)`` restricted to the coordinates
    ``pos (R, n)``; padding (``valid`` False) is decoupled (identity).

    With ``M = H`` its inverse is ``[H_FF]⁻¹`` (= H⁻¹ after exact OBS downdates of every
    coordinate outside F: OBQ's working inverse); with ``M = H⁻¹`` it solves the masked
    optimum's ``(H⁻¹_SS)⁻¹`` system (``core.trace.masked_optimum``).
    """
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    eye = torch.eye(pos.shape[1], dtype=M.dtype, device=M.device)
    A = torch.where(both, M[pos.unsqueeze(2), pos.unsqueeze(1)], eye)
    L, _ = torch.linalg.cholesky_ex(A)
    return L
