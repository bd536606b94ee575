"""Test helpers for the fast solvers: problem generators and a naive column-order OBS reference.

The reference re-derives GPTQ / SparseGPT from scratch in float64, without Cholesky factors or
lazy blocks: to fix column ``p`` (with the still-free set ``F``, ``p`` first), invert
``H[F, F]`` explicitly and apply the OBS step ``w_F −= (w_p − t_p) / [H_F⁻¹]_pp · H_F⁻¹[p, :]``.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def make_problem(
    seed: int, rows: int = 16, cols: int = 32, tokens: int = 256, corr: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W (rows, cols), H = 2 XᵀX / N, X)`` with ``X`` = Gaussian times a random mixing matrix
    (``corr``) or i.i.d. Gaussian."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g, dtype=F64)
    if corr:
        X = X @ torch.randn(cols, cols, generator=g, dtype=F64)
    W = torch.randn(rows, cols, generator=g, dtype=F64)
    H = 2 * X.T @ X / tokens
    return W, H, X


def damped(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` (all inputs live), float64."""
    H = H.to(F64)
    return H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=F64)


def round_to(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``scale · (clamp(round(x / scale) + zero, 0, maxq) − zero)``, written out again."""
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)


def cond_diag(H: torch.Tensor, order: list[int], t: int) -> float:
    """``[H_F⁻¹]_pp`` for ``F = order[t:]``, ``p = order[t]``."""
    F = order[t:]
    return float(torch.linalg.inv(H[F][:, F])[0, 0])


def naive_columns(
    W: torch.Tensor,
    H: torch.Tensor,
    order: list[int],
    target,
    on_start=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the columns of ``W`` in ``order``; ``target(w, t, p) -> (rows,)`` gives the value of
    column ``p`` (``t``-th fixed) from the current weights ``w``; ``on_start(w, t)`` is called
    before each column (to choose masks). Returns ``(weights, per-row loss)``, float64."""
    w = W.to(F64).clone()
    H = H.to(F64)
    loss = torch.zeros(W.shape[0], dtype=F64)
    for t, p in enumerate(order):
        if on_start is not None:
            on_start(w, t)
        F = order[t:]
        Hinv = torch.linalg.inv(H[F][:, F])
        tp = target(w, t, p)
        err = w[:, p] - tp
        loss += 0.5 * err**2 / Hinv[0, 0]
        w[:, F] -= torch.outer(err / Hinv[0, 0], Hinv[0, :])
        w[:, p] = tp
    return w, loss


def naive_sparsegpt(
    W: torch.Tensor, H: torch.Tensor, sparsity: float, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unstructured SparseGPT, natural order, layer-wide mask choice per block of columns:
    at each block start prune the ``round(s·R·i2) − round(s·R·i1)`` smallest ``w_p² / [H_F⁻¹]_pp``
    of the block. Returns ``(weights, keep, per-row loss)``."""
    R, C = W.shape
    order = list(range(C))
    pruned = torch.zeros(R, C, dtype=torch.bool)

    def on_start(w, t):
        if t % block:
            return
        i1, i2 = t, min(t + block, C)
        d = torch.tensor([cond_diag(H, order, p) for p in range(i1, i2)], dtype=F64)
        score = (w[:, i1:i2] ** 2 / d).reshape(-1)
        k = round(sparsity * R * i2) - round(sparsity * R * i1)
        idx = torch.sort(score, stable=True).indices[:k]
        sel = torch.zeros(R * (i2 - i1), dtype=torch.bool)
        sel[idx] = True
        pruned[:, i1:i2] = sel.reshape(R, i2 - i1)

    def target(w, t, p):
        return torch.where(pruned[:, p], torch.zeros_like(w[:, p]), w[:, p])

    w, loss = naive_columns(W, H, order, target, on_start)
    return w, ~pruned, loss


def naive_sparsegpt_nm(
    W: torch.Tensor, H: torch.Tensor, n: int, m: int, bits_grid=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N:M SparseGPT: at each group start prune the ``m − n`` smallest ``w_p² / [H_F⁻¹]_pp`` of
    each row among the group's current weights; kept weights rounded on ``bits_grid`` =
    ``(scale (R, C), zero (R, C), maxq)`` if given."""
    R, C = W.shape
    order = list(range(C))
    pruned = torch.zeros(R, C, dtype=torch.bool)

    def on_start(w, t):
        if t % m:
            return
        d = torch.tensor([cond_diag(H, order, p) for p in range(t, t + m)], dtype=F64)
        score = w[:, t : t + m] ** 2 / d
        idx = torch.sort(score, dim=1, stable=True).indices[:, : m - n]
        pruned[:, t : t + m].scatter_(1, idx, True)

    def target(w, t, p):
        v = torch.where(pruned[:, p], torch.zeros_like(w[:, p]), w[:, p])
        if bits_grid is not None:
            scale, zero, maxq = bits_grid
            v = round_to(v, scale[:, p], zero[:, p], maxq)
        return v

    w, loss = naive_columns(W, H, order, target, on_start)
    return w, ~pruned, loss
