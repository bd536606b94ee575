"""Fixed-mask refit to the dense outputs: re-solve a compressed layer's kept weights so the
layer, fed by the compressed model, reproduces the dense model's outputs.

After a model is compressed (structured channels above all: whole inputs removed from many
layers), every layer ``ℓ`` sees inputs ``X̃ (N, cols)`` from the compressed model where the
dense model gave ``X (N, cols)`` for the same tokens. With the zeros of the compressed weight
kept (its mask ``M``: the kept entries ``L_r`` of each row ``r``), the refit of row ``r`` is the
least-squares problem against the dense outputs, damped towards the current weight ``w``::

    min over ŵ with ŵ_j = 0 (j ∉ L_r):   ‖X̃ ŵ − X w_d‖² / N + ½ λ ‖ŵ − w‖²

    ⇔  (H̃_LL + λI) ŵ_L = C_{L,:} w_d + λ w_L          H̃ = 2 X̃ᵀX̃/N,  C = 2 X̃ᵀX/N

``w_d`` is the dense weight of the row, ``λ = damp · mean(diag H̃)`` over live inputs (the
``targets.target_damping`` λ). Layers that were not compressed (``w = w_d``, no mask) are
refitted too: they absorb the error the compressed layers before them introduced. Because
``ŵ = w`` is feasible and the damping term is ≥ 0, the measured loss never rises:
``‖X̃ŵ − Xw_d‖² ≤ ‖X̃w − Xw_d‖²`` (tests). When ``X̃ = X`` and ``w = w_d`` the refit returns
``w``.

A mask shared by all rows (``channels`` / ``heads`` levels: whole input columns removed, or a
dense layer) needs one Cholesky factor of ``H̃_LL + λI`` for the whole layer; per-row masks
(unstructured, N:M) one per row, batched, each gathered to its kept entries (``rows · k³/3``
flops for ``k`` kept of a row). Quantized weights are not refitted (a refit leaves
their grid); callers skip them.

Tiny example (1 row, 2 columns, λ = 0, column 1 removed): ``X̃ = X``, ``H̃ = C = [[2, 1],
[1, 2]]``, ``w_d = [1, 1]``: ``ŵ_0 = (C w_d)_0 / H̃_00 = 3 / 2`` — the kept weight takes over
the part of the removed input it is correlated with.
"""

from __future__ import annotations

import torch

from .spec import DEFAULT_DAMP
from .targets import solve_spd, target_damping, target_loss

#: Per-row systems are solved in chunks of at most this many float64 elements (rows · k², k the
#: most entries a row keeps).
CHUNK_ELEMENTS = 1 << 25


def masked_refit(
    W: torch.Tensor,
    W_dense: torch.Tensor,
    Ht: torch.Tensor,
    C: torch.Tensor,
    mask: torch.Tensor | None = None,
    damp: float = DEFAULT_DAMP,
) -> torch.Tensor:
    """The refitted weight ``Ŵ (rows, cols)`` (module docstring), in ``W``'s dtype and device.

    W: the current (compressed) weight ``(rows, cols)``; W_dense: the dense model's weight of
    the same layer ``(rows, cols)``; Ht, C: ``H̃ = 2X̃ᵀX̃/N`` and ``C = 2X̃ᵀX/N`` ``(cols, cols)``
    (``CrossAccumulator.hessian()`` / ``.cross()``); mask: bool ``(rows, cols)``, True = kept
    (None: every weight kept); entries outside the mask are 0 in the result. damp ≥ 0.
    """
    rows, cols = W.shape
    if W_dense.shape != W.shape:
        raise ValueError(f"dense weight {tuple(W_dense.shape)} differs from {tuple(W.shape)}")
    if Ht.shape != (cols, cols) or C.shape != (cols, cols):
        raise ValueError(
            f"H̃ and C must be ({cols}, {cols}), got {tuple(Ht.shape)}, {tuple(C.shape)}"
        )
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask {tuple(mask.shape)} differs from the weight {tuple(W.shape)}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    dev = W.device
    Ht64, C64 = Ht.to(dev).double(), C.to(dev).double()
    lam = target_damping(Ht64, damp)
    w = W.double()
    rhs = lam * w + W_dense.to(dev).double() @ C64.T  # row r: C w_d,r + λ w_r
    A = Ht64 + lam * torch.eye(cols, dtype=torch.float64, device=dev)
    out = torch.zeros_like(w)
    keep = None if mask is None else mask.to(dev).bool()
    if keep is None or bool((keep == keep[:1]).all()):  # one live set for every row
        live = torch.ones(cols, dtype=torch.bool, device=dev) if keep is None else keep[0]
        idx = live.nonzero().flatten()
        if idx.numel():
            sol = solve_spd(A[idx][:, idx], rhs[:, idx].T)  # (k, rows)
            out[:, idx] = sol.T
        return out.to(W.dtype)
    # per-row live sets: each row's system gathered to its kept entries, padded to the
    # longest row's count ``k`` (padding: identity rows, zero right-hand side, result dropped)
    counts = keep.sum(1)
    k = int(counts.max())
    if k == 0:
        return out.to(W.dtype)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]  # kept first
    valid = torch.arange(k, device=dev)[None, :] < counts[:, None]  # (rows, k)
    idx = torch.where(valid, order, 0)
    chunk = max(1, CHUNK_ELEMENTS // (k * k))
    eye = torch.eye(k, dtype=torch.float64, device=dev)
    for s in range(0, rows, chunk):
        ix, v = idx[s : s + chunk], valid[s : s + chunk].double()  # (r, k)
        Ar = A[ix[:, :, None], ix[:, None, :]] * (v[:, :, None] * v[:, None, :])
        Ar = Ar + eye * (1 - v)[:, None, :]
        b = torch.gather(rhs[s : s + chunk], 1, ix) * v
        sol = solve_spd(Ar, b[:, :, None])[:, :, 0] * v
        out[s : s + chunk].scatter_add_(1, ix, sol)  # padding adds 0 at column 0
    return out.to(W.dtype)


def refit_losses(
    W_dense: torch.Tensor,
    W_before: torch.Tensor,
    W_after: torch.Tensor,
    Ht: torch.Tensor,
    C: torch.Tensor,
    H: torch.Tensor,
) -> tuple[float, float]:
    """Measured ``‖X̃ŵ − Xw_d‖²/N`` summed over rows, before and after the refit (float64,
    no damping; ``targets.target_loss``)."""
    before = float(target_loss(W_dense, W_before, Ht, C, H).sum())
    after = float(target_loss(W_dense, W_after, Ht, C, H).sum())
    return before, after
