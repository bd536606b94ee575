"""Layer Hessians: streaming accumulation of H = 2 X Xᵀ / N, damping, dead inputs, inversion policy.

Conventions (used everywhere in optbrain):

* ``X`` holds calibration inputs of one layer as rows: ``(N, cols)``; ``N`` counts tokens
  (positions, pixels, samples) — every row is one input vector the layer multiplies.
* ``H = 2 Xᵀ X / N``, shape ``(cols, cols)``: the Hessian of the per-token mean squared output
  error, so for any weight change ``δ (rows, cols)``::

      ½ Σ_r δ_r H δ_rᵀ  ==  ||δ Xᵀ||² / N          (layer loss, per token)

* ``damp`` is *relative*: ``λ = damp · mean(diag H)`` over live inputs, added to the diagonal.
* A *dead* input (``H_pp == 0``: the input is always zero) gets ``H_pp = 1`` so H stays
  invertible; its weights are irrelevant to the output and solvers set them to zero for free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .spec import (
    DEFAULT_DAMP,
    DEFAULT_DTYPE,
    DEFAULT_ON_SINGULAR,
    all_finite,
    check_damp,
    check_on_singular,
)

if TYPE_CHECKING:
    from .spec import CompressSpec


class HessianAccumulator:
    """Streaming ``H = 2 Xᵀ X / N``; the result does not depend on how X is split into batches.

    Accumulates ``Xᵀ X`` in float64 by default, so splitting the calibration set differently
    changes H by rounding only (~1e-16 relative).

    >>> acc = HessianAccumulator(3)
    >>> acc.add(torch.ones(4, 3)); acc.add(torch.ones(2, 3))
    >>> acc.hessian()[0, 0].item(), acc.tokens
    (2.0, 6)
    """

    def __init__(
        self,
        cols: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if cols < 1:
            raise ValueError(f"cols must be >= 1, got {cols}")
        self.cols = int(cols)
        self.dtype = dtype
        self._sum = torch.zeros(cols, cols, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, X: torch.Tensor) -> None:
        """Add a batch of inputs ``X (n, cols)`` (or ``(..., cols)``, flattened to rows)."""
        if X.shape[-1] != self.cols:
            raise ValueError(
                f"input has {X.shape[-1]} features in its last dimension, expected {self.cols}"
            )
        if self._sum.numel() == 0:
            raise ValueError("this accumulator's sum was handed over (take); start a new one")
        X = X.reshape(-1, self.cols)
        if not torch.isfinite(X).all():
            raise ValueError("calibration input contains NaN or Inf")
        X = X.to(device=self._sum.device, dtype=self.dtype)
        self._sum.addmm_(X.T, X)
        self.tokens += X.shape[0]

    def hessian(self) -> torch.Tensor:
        """``H = 2 Xᵀ X / N`` over everything added, ``(cols, cols)`` in the accumulator dtype."""
        self._check_tokens()
        return self._sum * (2.0 / self.tokens)

    def _check_tokens(self) -> None:
        if self.tokens == 0:
            raise ValueError("no calibration inputs were added; cannot form a Hessian")

    def take(self) -> torch.Tensor:
        """``hessian()`` without a second ``(cols, cols)`` buffer: the sum is scaled in place
        and handed over (the same values: one elementwise product either way), and the
        accumulator is left empty (``tokens`` 0, so a later ``hessian()`` raises)."""
        self._check_tokens()
        H = self._sum.mul_(2.0 / self.tokens)
        self._sum = torch.zeros(0, 0, dtype=self.dtype, device=H.device)
        self.tokens = 0
        return H


def hessian_from_inputs(X: torch.Tensor) -> torch.Tensor:
    """``H = 2 Xᵀ X / N`` for ``X (N, cols)``, accumulated in float64.

    Returned in float64 for float64 inputs, else float32 (float16 / bfloat16 / integer inputs
    would overflow or truncate in their own dtype: |x| = 300 gives H_pp = 1.8e5 > 65504);
    float64 when the float32 result would not be finite (|x| ≳ 1e19).
    """
    acc = HessianAccumulator(X.shape[-1], device=X.device)
    acc.add(X)
    H = acc.hessian()
    if X.dtype == torch.float64:
        return H
    H32 = H.to(torch.float32)
    return H32 if all_finite(H32) else H


@dataclass(frozen=True)
class PreparedHessian:
    """A damped, invertible Hessian and its inverse, with what was done to get there.

    H, Hinv: ``(cols, cols)`` in the compute dtype (None in a copy made by a solver that has
    released them to save memory, as the column methods do once they hold ``H⁻¹``'s upper
    factor: then only the damping and fallback remain to report).  dead: ``(cols,)`` bool,
    inputs with ``H_pp == 0``.  damping: the absolute λ added to the diagonal.  fallback: None,
    or a short text saying which policy step was needed ("damping x10", "eigenvalue clamp").
    """

    H: torch.Tensor | None
    Hinv: torch.Tensor | None
    dead: torch.Tensor
    damping: float
    fallback: str | None
    diagonal: torch.Tensor | None = None  # (cols,): the damped H's diagonal, kept with or without H


def _damp_(H: torch.Tensor, diag: torch.Tensor, lam: float) -> torch.Tensor:
    """``H + λ I`` in place: the diagonal set to ``diag + λ`` (``diag``: the undamped diagonal,
    kept aside), so that a retry with another λ gives the same values as damping a fresh copy
    (``H_ij + λ·0`` is ``H_ij`` off the diagonal), with no second ``(C, C)`` buffer."""
    torch.add(diag, lam, out=H.diagonal())
    return H


def _chol_inverse(H: torch.Tensor) -> torch.Tensor | None:
    """``H⁻¹`` from the Cholesky factor ``L`` (``H = L Lᵀ``), written over ``L``: one new
    ``(C, C)`` buffer (bit-identical to ``cholesky_inverse`` into a fresh one); None if ``H``
    is not positive definite or the inverse is not finite."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return None
    Hinv = torch.cholesky_inverse(L, out=L)
    if not all_finite(Hinv):
        return None
    return Hinv


def _lean_inverse(Hd: torch.Tensor) -> torch.Tensor | None:
    """``_chol_inverse`` written over ``Hd`` itself: no new ``(C, C)`` buffer, the same values
    (``Hd`` is lost either way; None when it is not positive definite)."""
    info = torch.empty((), dtype=torch.int32, device=Hd.device)
    _, info = torch.linalg.cholesky_ex(Hd, out=(Hd, info))
    if int(info) != 0:
        return None
    Hinv = torch.cholesky_inverse(Hd, out=Hd)
    return Hinv if all_finite(Hinv) else None


def prepare_hessian(
    H: torch.Tensor,
    damp: float = DEFAULT_DAMP,
    *,
    dtype: torch.dtype = DEFAULT_DTYPE,
    on_singular: str = DEFAULT_ON_SINGULAR,
    max_tries: int = 6,
    keep_hessian: bool = True,
) -> PreparedHessian:
    """Damp H, fix dead inputs and invert it, following a stated failure policy.

    ``λ = damp · mean(diag H over live inputs)``; ``H + λ I`` is inverted by Cholesky.
    If that fails (H not positive definite in the compute dtype), ``on_singular`` decides:

    * ``"raise"``: ``ValueError`` saying the Hessian is singular and what to try;
    * ``"damp"`` (default): multiply λ by 10 and retry, up to ``max_tries`` times, then
      fall through to ``"eig"``;
    * ``"eig"``: clamp eigenvalues from below at ``1e-6 · max eigenvalue`` and invert.

    The λ actually used and the fallback taken are recorded on the result.

    ``keep_hessian=False`` (solvers that read only ``H⁻¹`` and the damped diagonal, kept as
    ``diagonal``): ``H⁻¹`` is computed over the damped copy of ``H`` and ``H`` is None, so one
    ``(C, C)`` buffer instead of two — the same ``H⁻¹``; when the first λ fails, the policy
    above runs on a fresh copy and ``H`` is dropped at the end.
    """
    damp = check_damp(damp)
    check_on_singular(on_singular)
    H0 = H
    if keep_hessian:
        H = H.to(dtype, copy=True)
    else:  # column-major: LAPACK works in place on it (a row-major one is copied first)
        H = torch.empty_strided(H.shape, (1, H.shape[0]), dtype=dtype, device=H.device)
        H.copy_(H0)
    if not all_finite(H):
        raise ValueError(
            f"H overflows {dtype} (max |H| = {float(H.double().abs().max()):.3g} before the "
            "cast): the calibration activations are too large; solve with dtype=torch.float64 "
            "or scale the inputs down"
        )
    dead = torch.diagonal(H) <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    torch.diagonal(H)[dead] = 1.0
    diag = torch.diagonal(H).clone()  # undamped, (C,): H itself is damped in place
    live = ~dead
    mean_diag = float(diag[live].mean()) if bool(live.any()) else 1.0
    lam = damp * mean_diag
    fallback = None
    Hd = _damp_(H, diag, lam)
    if not keep_hessian:
        Hinv = _lean_inverse(Hd)
        del H, Hd
        if Hinv is not None:
            return PreparedHessian(None, Hinv, dead, lam, None, diagonal=torch.add(diag, lam))
        prep = prepare_hessian(H0, damp, dtype=dtype, on_singular=on_singular, max_tries=max_tries)
        return replace(prep, H=None)
    Hinv = _chol_inverse(Hd)
    if Hinv is None and on_singular == "raise":
        raise ValueError(
            f"the Hessian H (+ damping λ={lam:.3g}) is not positive definite in {dtype}; "
            "increase damp, use more calibration tokens, or set on_singular='damp'"
        )
    if Hinv is None and on_singular == "damp":
        lam_try = max(lam, 1e-8 * mean_diag)
        for k in range(1, max_tries + 1):
            lam_try *= 10.0
            Hd = _damp_(H, diag, lam_try)
            Hinv = _chol_inverse(Hd)
            if Hinv is not None:
                lam = lam_try
                fallback = f"damping x10^{k}"
                break
    if Hinv is None:
        Hd = _damp_(H, diag, lam)
        evals, evecs = torch.linalg.eigh(Hd.double())
        floor = 1e-6 * float(evals.abs().max().clamp_min(1e-30))
        evals = evals.clamp_min(floor)
        Hd = ((evecs * evals) @ evecs.T).to(dtype)
        Hd = 0.5 * (Hd + Hd.T)
        Hinv = ((evecs / evals) @ evecs.T).to(dtype)
        Hinv = 0.5 * (Hinv + Hinv.T)
        fallback = "eigenvalue clamp"
    return PreparedHessian(Hd, Hinv, dead, lam, fallback, diagonal=torch.diagonal(Hd).clone())


def layer_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``½ Σ_r (W - Ŵ)_r H (W - Ŵ)_rᵀ`` = ``||(W - Ŵ) Xᵀ||² / N`` for ``H = 2 Xᵀ X / N``.

    W, W_hat: ``(rows, cols)``; H: ``(cols, cols)``. Computed in float64.
    """
    D = W.double() - W_hat.double()
    return float(0.5 * ((D @ H.double()) * D).sum())


def row_losses(
    W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, block: int = 256
) -> torch.Tensor:
    """Per-row ``½ δ_r H δ_rᵀ``, shape ``(rows,)``, float64: ``δ`` in blocks of ``block`` rows
    and ``H`` in blocks of ``block`` columns (``½ Σ_j (δ H_{:,j}) ⊙ δ_{:,j}``), so the float64
    temporaries are ``(block, cols)`` and ``(cols, block)``, never a float64 copy of ``H``."""
    out = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    C = H.shape[1]
    for i in range(0, W.shape[0], block):
        D = W[i : i + block].double() - W_hat[i : i + block].double()
        for j in range(0, C, block):
            out[i : i + block] += ((D @ H[:, j : j + block].double()) * D[:, j : j + block]).sum(1)
    return out.mul_(0.5)


def prepare_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: CompressSpec,
    keep_hessian: bool = True,
    column_major: bool = False,
) -> tuple[torch.Tensor, PreparedHessian]:
    """``(W in the compute dtype with dead-input columns zeroed, damped prepared H)``.

    A dead input (``H_pp == 0``) never reaches the output, so its weights are set to 0 for free;
    all losses are measured from this ``W`` under ``prepared.H`` (as the exact solver does).
    ``keep_hessian``: see ``prepare_hessian``. ``column_major``: the copy of ``W`` is laid out
    by columns (its transpose is a contiguous ``(cols, rows)`` buffer, as column solvers
    work on), the same values.
    """
    prep = prepare_hessian(
        H, spec.damp, dtype=spec.dtype, on_singular=spec.on_singular, keep_hessian=keep_hessian
    )
    if column_major:
        Wc = torch.empty_strided(W.shape, (1, W.shape[0]), dtype=spec.dtype, device=W.device)
        Wc.copy_(W)
    else:
        Wc = W.to(spec.dtype).clone()
    Wc[:, prep.dead] = 0
    return Wc, prep
