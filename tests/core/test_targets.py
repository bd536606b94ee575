"""Dense targets (core.targets): W* and r from completing the square, checked by hand."""

import pytest
import torch

from optbrain import compress_layer
from optbrain.core.hessian import hessian_from_inputs
from optbrain.core.targets import CrossAccumulator, compress_to_dense, dense_target, target_loss

F64 = torch.float64


def _pair(seed=0, n=400, cols=12, rows=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g, dtype=F64) @ torch.randn(
        cols, cols, generator=g, dtype=F64
    )
    Xc = X + 0.3 * torch.randn(n, cols, generator=g, dtype=F64)  # upstream error
    W = torch.randn(rows, cols, generator=g, dtype=F64)
    acc = CrossAccumulator(cols)
    acc.add_pair(Xc[:150], X[:150])
    acc.add_pair(Xc[150:], X[150:])  # batching does not matter
    return W, X, Xc, acc


def test_accumulator_gives_the_three_matrices():
    W, X, Xc, acc = _pair()
    N = X.shape[0]
    assert torch.allclose(acc.hessian(), 2 * Xc.T @ Xc / N, rtol=1e-12)
    assert torch.allclose(acc.cross(), 2 * Xc.T @ X / N, rtol=1e-12)
    assert torch.allclose(acc.dense_hessian(), 2 * X.T @ X / N, rtol=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        acc.add_pair(Xc[:3], X[:4])


def test_one_column_example_doubles_the_weight():
    x = torch.randn(50, 1, dtype=F64)
    acc = CrossAccumulator(1)
    acc.add_pair(0.5 * x, x)  # upstream halved the input
    w = torch.tensor([[1.5]], dtype=F64)
    Wstar, r = dense_target(w, acc.hessian(), acc.cross(), acc.dense_hessian(), 0.0)
    assert float(Wstar) == pytest.approx(3.0, rel=1e-12)
    assert float(r) == pytest.approx(0.0, abs=1e-12)  # the refit restores the output exactly


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.3])
def test_completed_square_equals_the_objective(damp):
    """f(ŵ) = ‖X̃ŵ − Xw‖²/N + ½λ‖ŵ − w‖² == ½(ŵ − w*)ᵀ(H̃+λI)(ŵ − w*) + r for any ŵ."""
    W, X, Xc, acc = _pair(1)
    Ht, C, H = acc.hessian(), acc.cross(), acc.dense_hessian()
    lam = damp * float(torch.diagonal(Ht).mean())
    Wstar, r = dense_target(W, Ht, C, H, damp)
    A = Ht + lam * torch.eye(W.shape[1], dtype=F64)
    for s in range(3):
        Q = W + torch.randn(W.shape, generator=torch.Generator().manual_seed(s), dtype=F64)
        f = ((Xc @ Q.T - X @ W.T) ** 2).sum(0) / X.shape[0] + 0.5 * lam * ((Q - W) ** 2).sum(1)
        D = Q - Wstar
        assert torch.allclose(0.5 * ((D @ A) * D).sum(1) + r, f, rtol=1e-9)
        meas = target_loss(W, Q, Ht, C, H)
        assert torch.allclose(meas, ((Xc @ Q.T - X @ W.T) ** 2).sum(0) / X.shape[0], rtol=1e-9)


def test_fixed_mask_solution_is_the_closed_form_refit():
    """ExactOBS on (W*, H̃): the kept weights are ((H̃+λI)_SS)⁻¹ ((C+λI) w)_S for the mask S,
    and the loss is f(Ŵ) (measured against the dense outputs plus the damping term)."""
    W, X, Xc, acc = _pair(2)
    Ht, C, H = acc.hessian(), acc.cross(), acc.dense_hessian()
    res = compress_to_dense(W, Ht, C, H, sparsity=0.5, damp=0.01, dtype=F64)
    lam = 0.01 * float(torch.diagonal(Ht).mean())
    eye = torch.eye(W.shape[1], dtype=F64)
    A, B = Ht + lam * eye, C + lam * eye
    for r in range(W.shape[0]):
        S = res.mask[r].nonzero().squeeze(1)
        want = torch.linalg.solve(A[S][:, S], (B @ W[r])[S])
        assert torch.allclose(res.weight[r, S], want, rtol=1e-8, atol=1e-10)
    meas = target_loss(W, res.weight, Ht, C, H).sum() + 0.5 * lam * ((res.weight - W) ** 2).sum()
    assert res.loss == pytest.approx(float(meas), rel=1e-8)
    assert res.info["targets"]["mode"] == "dense"
    assert res.info["targets"]["residual_loss"] > 0  # the upstream error is not all recoverable


def test_same_inputs_reduce_to_the_plain_problem():
    W, X, _, _ = _pair(3)
    acc = CrossAccumulator(X.shape[1])
    acc.add(X)  # X̃ = X
    res = compress_to_dense(
        W, acc.hessian(), acc.cross(), acc.dense_hessian(), bits=3, method="gptq", dtype=F64
    )
    plain = compress_layer(W, hessian_from_inputs(X), bits=3, method="gptq", dtype=F64)
    assert torch.allclose(res.weight, plain.weight, atol=1e-9)
    assert res.loss == pytest.approx(plain.loss, rel=1e-7, abs=1e-12)
    assert res.info["targets"]["residual_loss"] == pytest.approx(0.0, abs=1e-9)


def test_rank_deficient_without_damping_is_the_least_squares_optimum():
    """λ = 0 and an input the compressed model never feeds: H̃ singular. The fallback must still
    reach the optimum (LAPACK's gelsy least squares did not: its W* was worse than W)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 10, generator=g, dtype=torch.float64)
    Xt = X + 0.3 * torch.randn(200, 10, generator=g, dtype=torch.float64)
    Xt[:, 2] = 0
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)
    acc = CrossAccumulator(10)
    acc.add_pair(Xt, X)
    Ht, C, H = acc.hessian(), acc.cross(), acc.dense_hessian()
    Wstar, _ = dense_target(W, Ht, C, H, 0.0)
    ref = torch.linalg.lstsq(Xt[:, [i for i in range(10) if i != 2]], X @ W.T).solution
    got = target_loss(W, Wstar, Ht, C, H).sum()
    best = ((Xt[:, [i for i in range(10) if i != 2]] @ ref - X @ W.T) ** 2).sum() / 200
    assert float(got) == pytest.approx(float(best), rel=1e-8)
