"""ExactOBS pruning runs: the unstructured / block trace (``PruneTrace``, every sparsity from one
greedy pass, read off with the fixed-mask optimum ``masked_optimum``) and N:M (``prune_nm``).
The greedy engine itself is ``core.obs``."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from . import ticks
from .hessian import PreparedHessian
from .obs import (
    DEFAULT_ENGINE,
    DEFAULT_MEMORY,
    EngineConfig,
    GreedyOut,
    NMScorer,
    PruneScorer,
    greedy_block,
    greedy_single,
    restricted_cholesky,
    row_chunks,
    selected_positions,
)
from .obs_fused import run_rows
from .patterns import Pattern, pruned_count


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


def _on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


#: ``masked_optimum``: whether the systems on ``device`` are factored row by row (else batched)
ROW_BY_ROW = _on_cpu


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

        Ŵ_F = W_F + H_FF⁻¹ (H_FS W_S)                   (a |F|×|F| solve)
        Ŵ   = W − H⁻¹[:, S] (H⁻¹_SS)⁻¹ W_S,  Ŵ_S = 0     (a |S|×|S| solve)

    and each row solves the smaller. ``H_FS W_S`` is ``((W ∘ ¬keep) H)_F`` and ``H⁻¹[:, S] x``
    is ``z H⁻¹`` with ``z`` the solutions scattered into ``(R, C)``: one GEMM each for all
    rows. On the CPU the systems are factored row by row at their own size (``Θ(n³/3)``, no
    padding, no ``(R, n, n)`` gather); elsewhere batched over rows, padded to the largest
    system, in chunks of ``memory`` bytes (one launch per chunk instead of one per row).
    Measured on 576×1536 at 50% (one thread, the other core busy): 13.1 s batched, 13.6 s as
    an OBS replay of the removals, 3.2 s row by row; row by row on two threads 1.7 s.
    """
    R, C = W.shape
    n_pruned = (~keep).sum(1)
    rows = ((n_pruned > 0) & (n_pruned < C)).nonzero().squeeze(1)
    out = torch.where(keep, W, torch.zeros_like(W))
    if rows.numel() == 0:
        return out
    small_s = n_pruned[rows] <= C - n_pruned[rows]  # rows that solve the |S|×|S| system
    z = torch.zeros_like(W)  # (R, C): (H⁻¹_SS)⁻¹ W_S scattered, rows solving the S system
    delta = torch.zeros_like(W)  # (R, C): H_FF⁻¹ (H_FS W_S) scattered, rows solving the F one
    rhs = (W * ~keep) @ H if not bool(small_s.all()) else None
    if bool(small_s.any()) and Hinv is None:
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    for use_s in (True, False):
        r_all = rows[small_s == use_s]
        if r_all.numel() == 0:
            continue
        M, target = (Hinv, z) if use_s else (H, delta)
        vec = W if use_s else rhs
        if ROW_BY_ROW(W.device):
            _solve_rows(M, vec, ~keep if use_s else keep, r_all, target)
        else:
            n = int((n_pruned[r_all] if use_s else C - n_pruned[r_all]).max())
            per_row = 4 * n * n * W.element_size() + n * n  # gather, where, factor; bool mask
            for sl in row_chunks(r_all.numel(), per_row, memory):
                r = r_all[sl]
                pos, valid = selected_positions(~keep[r] if use_s else keep[r], n)
                L = restricted_cholesky(M, pos, valid)
                b = (vec[r].gather(1, pos) * valid).unsqueeze(2)
                sol = torch.cholesky_solve(b, L).squeeze(2) * valid
                target[r] = torch.zeros_like(target[r]).scatter_(1, pos, sol)
    if bool(small_s.any()):
        out = out - z @ Hinv
    out = out + delta
    return torch.where(keep, out, torch.zeros_like(out))


def _solve_rows(
    M: torch.Tensor, vec: torch.Tensor, sel: torch.Tensor, rows: torch.Tensor, out: torch.Tensor
) -> None:
    """``out[r, P] = (M_PP)⁻¹ vec[r, P]`` for each row r of ``rows``, P = the columns where
    ``sel[r]``: one Cholesky factor per row at its own size, rows spread over torch's threads
    (``obs_fused.run_rows``), each factor single-threaded (LAPACK barely speeds up one
    768² factor with a second thread; two rows at once do)."""
    M = M.detach().contiguous()  # row gathers of a transposed H⁻¹ (cholesky_inverse's) are slow
    vec = vec.detach()
    idx = rows.tolist()
    n = int(sel[rows].sum(1).double().mean())
    caller, threads = threading.get_ident(), torch.get_num_threads()

    def solve(lo: int, hi: int) -> None:
        worker = threading.get_ident() != caller
        if worker:  # a pool worker: its factors single-threaded
            torch.set_num_threads(1)
        try:
            with torch.no_grad():
                for r in idx[lo:hi]:
                    p = sel[r].nonzero().squeeze(1)
                    L, _ = torch.linalg.cholesky_ex(M.index_select(0, p).index_select(1, p))
                    out[r, p] = torch.cholesky_solve(vec[r, p].unsqueeze(1), L).squeeze(1)
        finally:
            if worker:  # torch's default for new threads is the last count set: put it back
                torch.set_num_threads(threads)

    run_rows(solve, [], len(idx), len(idx) * n**3 / 3)


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
        per = pruned_count(sparsity, self.units)
        if per > S or sparsity > self.max_sparsity + 1e-12:
            raise ValueError(
                f"sparsity {sparsity} is beyond this trace, which stops at "
                f"max_sparsity={self.max_sparsity:.4g}; run the trace further"
            )
        uniform = torch.full((R,), per, dtype=torch.long, device=self.step_loss.device)
        if per_row:
            return uniform
        layer = select_counts(self.step_loss, pruned_count(sparsity, R * self.units))
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
    for _, sl in ticks.chunks(row_chunks(R, 2 * C * C * W.element_size(), engine.memory)):
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
        for _, sl in ticks.chunks(row_chunks(R, 2 * C * C * W.element_size(), engine.memory))
    ]
    return GreedyOut(
        torch.cat([o.weight for o in outs]),
        torch.cat([o.order for o in outs]),
        torch.cat([o.step_loss for o in outs]),
    )
