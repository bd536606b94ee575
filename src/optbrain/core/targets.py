"""Dense targets (GPTAQ-style): fit a layer fed by the compressed model to the dense outputs.

In sequential mode the inputs of layer ``ℓ`` come from the model compressed so far,
``X̃ (N, cols)``, while the dense model gives the same tokens ``X (N, cols)``. Compressing
against the *compressed* inputs' own outputs (``min ‖X̃ (ŵ − w)‖²``) ignores the error made
upstream; dense targets fit the dense outputs instead, so the layer also compensates it.
Per output row ``w`` (cols,), with the damping as a proximal term towards ``w``::

    f(ŵ) = ‖X̃ ŵ − X w‖² / N + ½ λ ‖ŵ − w‖²
         = ½ ŵᵀ (H̃ + λI) ŵ − ŵᵀ (C + λI) w + ½ wᵀ (H + λI) w

    H̃ = 2 X̃ᵀ X̃ / N,   C = 2 X̃ᵀ X / N (the cross term),   H = 2 Xᵀ X / N

Completing the square (``H̃ + λI`` is symmetric positive definite)::

    f(ŵ) = ½ (ŵ − w*)ᵀ (H̃ + λI) (ŵ − w*) + r
    w*   = (H̃ + λI)⁻¹ (C + λI) w            i.e.  W* = W (C + λI)ᵀ (H̃ + λI)⁻¹
    r    = ½ wᵀ (H + λI) w − ½ w*ᵀ (H̃ + λI) w*     (= min f ≥ 0)

So the dense-target problem is the standard layer problem ``(W*, H̃)`` — the weight every
solver starts from is ``W*`` (the unconstrained least-squares refit to the dense outputs) and
its loss is offset by ``r``. Every solver that takes ``H`` therefore runs unchanged on it; the
result's loss is the solver's loss plus ``r`` = ``f(Ŵ)``, the damped mean squared error
against the dense outputs. ``λ = damp · mean(diag H̃)`` over live inputs, the λ the solver adds
to ``H̃``. When ``X̃ = X`` (nothing compressed upstream): ``C = H̃ = H``, ``W* = W``, ``r = 0``.

Tiny example (1 column): ``X̃ = ½ X`` (upstream halved the input), ``λ = 0``:
``H̃ = H/4``, ``C = H/2``, ``w* = 2 w`` — the layer doubles its weight to restore the output.
"""

from __future__ import annotations

from typing import Any

import torch

from .hessian import HessianAccumulator
from .layer import compress_layer
from .result import LayerResult
from .spec import DEFAULT_DAMP, DEFAULT_METHOD

#: Methods that do not update weights from H (scores / rounding only): a dense-target refit
#: would change what they are, so ``calibration.targets: dense`` refuses them.
NO_REFIT_METHODS = frozenset({"magnitude", "wanda", "obd", "rtn"})


class CrossAccumulator(HessianAccumulator):
    """Streaming ``H̃ = 2 X̃ᵀX̃/N`` (the base class), ``C = 2 X̃ᵀX/N`` and ``H = 2 XᵀX/N`` from
    paired rows: ``add_pair(X̃ (n, cols), X (n, cols))`` — the same tokens in the compressed and
    the dense model. ``hessian()`` is ``H̃``, the Hessian the solver sees."""

    def __init__(self, cols: int, device=None, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(cols, device, dtype)
        self._cross = torch.zeros_like(self._sum)
        self._dense = torch.zeros_like(self._sum)

    def add_pair(self, Xc: torch.Tensor, Xd: torch.Tensor) -> None:
        """Add compressed-model rows ``Xc`` and the dense model's rows ``Xd`` (same shape)."""
        if Xc.shape != Xd.shape:
            raise ValueError(
                f"compressed and dense inputs differ in shape: {tuple(Xc.shape)} vs "
                f"{tuple(Xd.shape)}; the two models must see the same calibration tokens"
            )
        Xd2 = Xd.reshape(-1, self.cols).to(device=self._sum.device, dtype=self.dtype)
        if not torch.isfinite(Xd2).all():
            raise ValueError("dense calibration input contains NaN or Inf")
        super().add(Xc)
        Xc2 = Xc.reshape(-1, self.cols).to(device=self._sum.device, dtype=self.dtype)
        self._cross.addmm_(Xc2.T, Xd2)
        self._dense.addmm_(Xd2.T, Xd2)

    def add(self, X: torch.Tensor) -> None:  # the same rows in both models
        self.add_pair(X, X)

    def cross(self) -> torch.Tensor:
        """``C = 2 X̃ᵀ X / N (cols, cols)``."""
        self.hessian()  # raises when empty
        return self._cross * (2.0 / self.tokens)

    def dense_hessian(self) -> torch.Tensor:
        """``H = 2 Xᵀ X / N (cols, cols)`` of the dense inputs."""
        self.hessian()
        return self._dense * (2.0 / self.tokens)


def target_damping(Ht: torch.Tensor, damp: float) -> float:
    """``λ = damp · mean(diag H̃)`` over live inputs (``prepare_hessian``'s λ)."""
    d = torch.diagonal(Ht).double()
    live = d > 0
    return damp * (float(d[live].mean()) if bool(live.any()) else 1.0)


def solve_spd(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A⁻¹ B`` for symmetric positive semidefinite ``A (…, k, k)`` and ``B (…, k, m)``:
    Cholesky; where a factor fails (λ = 0 and a rank-deficient ``H̃``) the pseudo-inverse of
    the symmetric ``A`` (eigendecomposition: the minimum-norm least-squares solution;
    LAPACK's default ``gelsy`` least squares returned wrong values on such matrices)."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info == 0).all()):
        return torch.cholesky_solve(B, L)
    return torch.linalg.pinv(A, hermitian=True) @ B


def dense_target(
    W: torch.Tensor, Ht: torch.Tensor, C: torch.Tensor, H: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W*, r)`` of the module docstring: ``W* (rows, cols)`` in W's dtype, ``r (rows,)``
    float64 on CPU. ``W (rows, cols)``; ``Ht, C, H (cols, cols)``; ``damp`` relative."""
    lam = target_damping(Ht, damp)
    Wd = W.double()
    eye = torch.eye(W.shape[1], dtype=torch.float64, device=W.device)
    A = Ht.to(W.device).double() + lam * eye
    B = C.to(W.device).double() + lam * eye
    Wstar = solve_spd(A, B @ Wd.T).T  # (H̃+λI)⁻¹ (C+λI) w for every row
    Hd = H.to(W.device).double() + lam * eye
    r = 0.5 * ((Wd @ Hd) * Wd).sum(1) - 0.5 * ((Wstar @ A) * Wstar).sum(1)
    return Wstar.to(W.dtype), r.clamp_min(0).cpu()


def target_loss(
    W: torch.Tensor, W_hat: torch.Tensor, Ht: torch.Tensor, C: torch.Tensor, H: torch.Tensor
) -> torch.Tensor:
    """Measured per-row ``‖X̃ ŵ − X w‖² / N = ½ ŵᵀH̃ŵ − ŵᵀCw + ½ wᵀHw`` (no damping), float64
    ``(rows,)`` on CPU."""
    w, q = W.double(), W_hat.double()
    Ht, C, H = (M.to(W.device).double() for M in (Ht, C, H))
    out = 0.5 * ((q @ Ht) * q).sum(1) - ((q @ C) * w).sum(1) + 0.5 * ((w @ H) * w).sum(1)
    return out.cpu()


def compress_to_dense(
    W: torch.Tensor,
    Ht: torch.Tensor,
    C: torch.Tensor,
    H: torch.Tensor,
    *,
    method: str = DEFAULT_METHOD,
    damp: float = DEFAULT_DAMP,
    **settings: Any,
) -> LayerResult:
    """Compress ``W (rows, cols)`` against the dense outputs: ``compress_layer(W*, H̃, ...)``
    with every other setting passed on, the loss offset by ``r`` (module docstring), so
    ``loss`` is ``f(Ŵ)``. ``info["targets"]`` records ``{"mode": "dense", "residual_loss": Σ r,
    "refit_loss": the solver's own loss}``."""
    Wstar, r = dense_target(W, Ht, C, H, damp)
    res = compress_layer(Wstar, Ht.to(W.dtype), method=method, damp=damp, **settings)
    solver_loss = res.loss
    res.row_loss = (res.row_loss if res.row_loss is not None else 0.0) + r
    res.loss = solver_loss + float(r.sum())
    res.info["targets"] = {
        "mode": "dense",
        "residual_loss": float(r.sum()),
        "refit_loss": solver_loss,
    }
    return res
