"""Naive, independent references for the exact layer-wise solvers (tests only).

Nothing here uses the OBS update formulas or the library's inverse-Hessian bookkeeping: every
greedy step tries every candidate, re-solves the constrained least-squares problem from scratch
with ``torch.linalg.solve`` and keeps the cheapest. Slow (``O(cols² · solve)`` per row), so only
for brute-force-sized problems (6–10 columns), always in float64.

Problem: one row ``w (cols,)``, ``H (cols, cols)`` positive definite. Fixing coordinates ``F``
to targets ``t`` gives the optimum ``x_F = t``, ``x_U = w_U − H_UU⁻¹ H_UF (t − w_F)`` and the
loss ``½ (x − w)ᵀ H (x − w)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

F64 = torch.float64


def make_problem(
    seed: int,
    rows: int,
    cols: int,
    tokens: int | None = None,
    dtype: torch.dtype = F64,
    well_conditioned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``W (rows, cols)``, correlated inputs ``X (tokens, cols)`` and ``H = 2XᵀX/N``.

    ``X = Z · M`` with Gaussian ``Z`` and a random mixing ``M`` (``I + 0.5·G/√cols`` when
    ``well_conditioned``, else a plain Gaussian matrix). ``H`` is formed here, in float64,
    without the library, then cast to ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = 4 * cols if tokens is None else tokens
    Z = torch.randn(tokens, cols, generator=g, dtype=F64)
    G = torch.randn(cols, cols, generator=g, dtype=F64)
    M = torch.eye(cols, dtype=F64) + 0.5 * G / cols**0.5 if well_conditioned else G
    X = Z @ M
    W = torch.randn(rows, cols, generator=g, dtype=F64)
    H = 2.0 * X.T @ X / tokens
    return W.to(dtype), X.to(dtype), H.to(dtype)


def measured_loss(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """``||(W − Ŵ) Xᵀ||² / N`` on the real inputs ``X (N, cols)``, in float64."""
    D = W.double() - W_hat.double()
    return float(((D @ X.double().T) ** 2).sum() / X.shape[0])


def constrained_optimum(
    w: torch.Tensor, H: torch.Tensor, idx: Sequence[int], targets: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, float]:
    """``argmin ½ (x − w)ᵀ H (x − w)`` s.t. ``x[idx] = targets``, solved directly; ``(x, loss)``."""
    w, H = w.double(), H.double()
    C = w.shape[0]
    idx = list(idx)
    t = torch.as_tensor(targets, dtype=F64).reshape(-1)
    x = w.clone()
    if idx:
        x[idx] = t
        free = [i for i in range(C) if i not in set(idx)]
        if free:
            rhs = H[free][:, idx] @ (t - w[idx])
            x[free] = w[free] - torch.linalg.solve(H[free][:, free], rhs)
    d = x - w
    return x, float(0.5 * d @ H @ d)


# candidates(fixed) -> groups of coordinates that may be fixed next (each a tuple)
Candidates = Callable[[dict], list[tuple[int, ...]]]
# target(group, x, row) -> values the group is fixed to, given the current state x
Target = Callable[[tuple[int, ...], torch.Tensor], list[float]]


@dataclass
class NaiveGreedy:
    """States after 0..steps greedy steps: ``states[k] (cols,)``, ``losses[k]`` (cumulative),
    ``order[k]`` the group fixed at step k+1, ``fixed`` the final {coordinate: target}."""

    states: list[torch.Tensor]
    losses: list[float]
    order: list[tuple[int, ...]]
    fixed: dict


def naive_greedy(
    w: torch.Tensor,
    H: torch.Tensor,
    steps: int,
    candidates: Candidates,
    target: Target,
    fixed: dict | None = None,
    outlier_scale: Sequence[float] | None = None,
) -> NaiveGreedy:
    """Greedy: at each step try every candidate group, re-solve from scratch, keep the cheapest.

    ``fixed`` (optional) holds coordinates already fixed before the first step (e.g. the pruned
    set when quantizing after pruning); they stay fixed at their targets.
    ``outlier_scale`` (OBQ's outlier rule, single-coordinate candidates): when some candidate's
    rounding error exceeds half its grid step ``outlier_scale[i] / 2``, the candidate with the
    largest error is taken instead of the cheapest.
    """
    fixed = dict(fixed or {})
    x, loss = constrained_optimum(w, H, list(fixed), list(fixed.values()))
    states, losses, order = [x], [loss], []
    for _ in range(steps):
        best = None
        cands = candidates(fixed)
        if outlier_scale is not None:
            errs = {g: (target(g, x)[0] - float(x[g[0]])) ** 2 for g in cands}
            outl = [g for g in cands if errs[g] > 0.25 * outlier_scale[g[0]] ** 2]
            if outl:
                cands = [max(outl, key=lambda g: errs[g])]
        for grp in cands:
            t = target(grp, x)
            trial = dict(fixed)
            trial.update(zip(grp, t, strict=True))
            xn, ln = constrained_optimum(w, H, list(trial), list(trial.values()))
            if best is None or ln < best[0]:
                best = (ln, xn, grp, trial)
        assert best is not None, "no candidate left"
        loss, x, grp, fixed = best
        states.append(x)
        losses.append(loss)
        order.append(grp)
    return NaiveGreedy(states, losses, order, fixed)


def single_candidates(cols: int, allowed: Iterable[int] | None = None) -> Candidates:
    """Every coordinate not fixed yet (restricted to ``allowed`` if given)."""
    pool = list(range(cols)) if allowed is None else sorted(allowed)
    return lambda fixed: [(i,) for i in pool if i not in fixed]


def nm_candidates(cols: int, n: int, m: int) -> Candidates:
    """Coordinates not fixed yet whose group of ``m`` still keeps more than ``n``."""

    def cand(fixed: dict) -> list[tuple[int, ...]]:
        out = []
        for g0 in range(0, cols, m):
            group = range(g0, g0 + m)
            kept = [i for i in group if i not in fixed]
            if len(kept) > n:
                out += [(i,) for i in kept]
        return out

    return cand


def block_candidates(cols: int, b: int) -> Candidates:
    """Whole runs of ``b`` consecutive coordinates, none fixed yet."""
    blocks = [tuple(range(j, j + b)) for j in range(0, cols, b)]
    return lambda fixed: [blk for blk in blocks if blk[0] not in fixed]


def zero_target(grp: tuple[int, ...], x: torch.Tensor) -> list[float]:
    return [0.0] * len(grp)


def round_to_grid(v: float, scale: float, zero: float, maxq: int) -> float:
    """The documented grid: ``scale · (clamp(round(v/scale) + zero, 0, maxq) − zero)``."""
    code = min(max(round(v / scale) + zero, 0), maxq)
    return scale * (code - zero)


def grid_target(scale_row: torch.Tensor, zero_row: torch.Tensor, maxq: int) -> Target:
    """Fix a coordinate to the grid value of its *current* value (OBQ)."""
    s = scale_row.double().tolist()
    z = zero_row.double().tolist()

    def target(grp: tuple[int, ...], x: torch.Tensor) -> list[float]:
        return [round_to_grid(float(x[i]), s[i], z[i], maxq) for i in grp]

    return target


def grid_columns(grid, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column ``(scale, zero) (rows, cols)`` of a ``QuantGrid`` read from its fields."""
    scale, zero = grid.scale.double(), grid.zero.double()
    gs = cols if grid.group_size is None else grid.group_size
    col_group = torch.arange(cols) // gs
    return scale[:, col_group], zero[:, col_group]


def best_mask_loss(w: torch.Tensor, H: torch.Tensor, removals: Iterable[Sequence[int]]) -> float:
    """Brute force: least loss over every candidate set of removed coordinates."""
    return min(constrained_optimum(w, H, list(r), [0.0] * len(r))[1] for r in removals)


def all_unstructured(cols: int, k: int) -> Iterable[tuple[int, ...]]:
    return itertools.combinations(range(cols), k)


def all_nm(cols: int, n: int, m: int) -> Iterable[tuple[int, ...]]:
    per_group = [list(itertools.combinations(range(g0, g0 + m), m - n)) for g0 in range(0, cols, m)]
    for choice in itertools.product(*per_group):
        yield tuple(i for grp in choice for i in grp)


def all_blocks(cols: int, b: int, k: int) -> Iterable[tuple[int, ...]]:
    for blocks in itertools.combinations(range(cols // b), k):
        yield tuple(j * b + i for j in blocks for i in range(b))


def layerwide_counts(step_losses: list[list[float]], total: int) -> list[int]:
    """The documented layer-wide rule, re-derived: make each row's step costs non-decreasing
    (running max), take the ``total`` cheapest steps over all rows (ties: lower row, then
    earlier step); a row's count is how many of its steps were taken."""
    items = []
    for r, steps in enumerate(step_losses):
        run = float("-inf")
        for k, c in enumerate(steps):
            run = max(run, c)
            items.append((run, r, k))
    items.sort()
    counts = [0] * len(step_losses)
    for _, r, _ in items[:total]:
        counts[r] += 1
    return counts


def singular_inputs(cols: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Inputs ``X (tokens, cols)`` whose H = 2XᵀX/N is exactly singular with no dead input.

    Input 1 is a copy of input 0, which is ±2 on half the tokens and 0 elsewhere, so
    ``H_00 = H_01 = H_11 = 4`` exactly and Cholesky meets an exactly zero pivot at input 1 (in
    float32 and float64 alike) instead of a rounding-sized one of either sign.
    """
    assert tokens % 2 == 0 and cols >= 3
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g, dtype=F64)
    signs = torch.where(torch.rand(tokens, generator=g) < 0.5, -2.0, 2.0).to(F64)
    signs[tokens // 2 :] = 0
    X[:, 0] = signs
    X[:, 1] = signs
    return X
