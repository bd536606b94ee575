"""Hessians (optbrain.core.hessian): accumulation, damping, dead inputs, singular-H policy, loss."""

import pytest
import torch
from obs_reference import make_problem, measured_loss, singular_inputs

from optbrain import HessianAccumulator, hessian_from_inputs, layer_loss, prepare_hessian
from optbrain.core.hessian import row_losses

F64 = torch.float64


def _reference_hessian(X):
    X = X.double().reshape(-1, X.shape[-1])
    return 2.0 * X.T @ X / X.shape[0]


def test_accumulator_equals_2_xtx_over_n():
    W, X, H = make_problem(0, 2, 7, tokens=50)
    acc = HessianAccumulator(7)
    for part in X.split([13, 1, 30, 6]):
        acc.add(part.float())  # float32 inputs, accumulated in float64
    assert acc.tokens == 50
    torch.testing.assert_close(acc.hessian(), _reference_hessian(X.float()), rtol=1e-12, atol=1e-12)


def test_accumulator_flattens_leading_dims_and_hessian_from_inputs_keeps_dtype():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 5, 4, generator=g)  # (batch, seq, features): 15 tokens
    acc = HessianAccumulator(4)
    acc.add(X)
    assert acc.tokens == 15
    torch.testing.assert_close(acc.hessian(), _reference_hessian(X), rtol=1e-12, atol=1e-12)
    H = hessian_from_inputs(X.reshape(-1, 4))
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, _reference_hessian(X).float())


@pytest.mark.parametrize("splits", [[64], [1] * 64, [10, 20, 34], [63, 1]])
def test_accumulator_does_not_depend_on_batch_split(splits):
    W, X, H = make_problem(2, 2, 6, tokens=64)
    acc = HessianAccumulator(6)
    for part in X.split(splits):
        acc.add(part)
    torch.testing.assert_close(acc.hessian(), H, rtol=1e-13, atol=1e-13)


def test_accumulator_rejects_bad_input():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no calibration inputs"):
        acc.hessian()
    with pytest.raises(ValueError, match="expected 4"):
        acc.add(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.add(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.add(torch.tensor([[0.0, float("inf"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="cols"):
        HessianAccumulator(0)


def test_layer_loss_equals_measured_output_error():
    W, X, H = make_problem(3, 4, 8, tokens=40)
    g = torch.Generator().manual_seed(3)
    W_hat = W + 0.3 * torch.randn(W.shape, generator=g, dtype=F64)
    assert layer_loss(W, W_hat, H) == pytest.approx(measured_loss(W, W_hat, X), rel=1e-12)
    rl = row_losses(W, W_hat, H)
    assert rl.shape == (4,)
    assert float(rl.sum()) == pytest.approx(layer_loss(W, W_hat, H), rel=1e-12)
    for r in range(4):
        one = measured_loss(W[r : r + 1], W_hat[r : r + 1], X)
        assert float(rl[r]) == pytest.approx(one, rel=1e-12)


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_damping_is_relative_to_mean_diagonal(damp, dtype):
    W, X, H = make_problem(4, 2, 6, well_conditioned=True)
    prep = prepare_hessian(H, damp, dtype=dtype)
    lam = damp * float(torch.diagonal(H).mean())
    assert prep.damping == pytest.approx(lam, rel=1e-6)
    assert prep.fallback is None and not prep.dead.any()
    assert prep.H.dtype == dtype and prep.Hinv.dtype == dtype
    tol = 1e-10 if dtype == F64 else 1e-4
    torch.testing.assert_close(
        prep.H.double(), H + lam * torch.eye(6, dtype=F64), rtol=tol, atol=tol
    )
    torch.testing.assert_close(
        (prep.Hinv.double() @ prep.H.double()),
        torch.eye(6, dtype=F64),
        rtol=tol * 100,
        atol=tol * 100,
    )


def test_dead_inputs_are_marked_and_excluded_from_the_damping_mean():
    W, X, H = make_problem(5, 2, 6)
    X[:, [1, 4]] = 0  # two inputs that are always zero
    H = _reference_hessian(X)
    prep = prepare_hessian(H, 0.05, dtype=F64)
    assert prep.dead.tolist() == [False, True, False, False, True, False]
    live = [0, 2, 3, 5]
    lam = 0.05 * float(torch.diagonal(H)[live].mean())
    assert prep.damping == pytest.approx(lam, rel=1e-12)
    assert torch.isfinite(prep.Hinv).all()
    # the live block is H + λI, untouched by the dead ones
    torch.testing.assert_close(
        prep.H[live][:, live], H[live][:, live] + lam * torch.eye(4, dtype=F64)
    )
    torch.testing.assert_close(prep.Hinv @ prep.H, torch.eye(6, dtype=F64), atol=1e-9, rtol=1e-9)


def _singular_hessian():
    """An exactly singular H with no dead input: input 1 is a copy of input 0."""
    return _reference_hessian(singular_inputs(5, 16))


def test_singular_hessian_policy_raise():
    with pytest.raises(ValueError, match=r"(?i)hessian|\bH\b.*positive definite"):
        prepare_hessian(_singular_hessian(), 0.0, dtype=F64, on_singular="raise")


def test_singular_hessian_policy_damp_records_the_fallback():
    H = _singular_hessian()
    prep = prepare_hessian(H, 0.0, dtype=F64, on_singular="damp")
    assert prep.fallback is not None and "damp" in prep.fallback
    assert prep.damping > 0
    torch.testing.assert_close(prep.H, H + prep.damping * torch.eye(5, dtype=F64))
    assert torch.isfinite(prep.Hinv).all()
    torch.testing.assert_close(prep.Hinv @ prep.H, torch.eye(5, dtype=F64), atol=1e-6, rtol=1e-6)


def test_singular_hessian_policy_eig_clamps_eigenvalues():
    H = _singular_hessian()
    prep = prepare_hessian(H, 0.0, dtype=F64, on_singular="eig")
    assert prep.fallback is not None and "eig" in prep.fallback
    evals = torch.linalg.eigvalsh(prep.H)
    assert float(evals.min()) >= 1e-6 * float(evals.max()) * (1 - 1e-9)
    assert torch.isfinite(prep.Hinv).all()
    torch.testing.assert_close(prep.Hinv @ prep.H, torch.eye(5, dtype=F64), atol=1e-6, rtol=1e-6)
    # clamping only lifts the null direction: H itself is unchanged elsewhere
    assert float((prep.H - H).abs().max()) <= 1e-5 * float(H.abs().max())


def test_prepare_hessian_rejects_bad_arguments():
    H = torch.eye(3, dtype=F64)
    for damp in (-0.1, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="damp"):
            prepare_hessian(H, damp)
    with pytest.raises(ValueError, match="on_singular"):
        prepare_hessian(H, 0.01, on_singular="ignore")


# ------------------------------------------------------------- memory-lean variants ----
def _hessian(cols: int = 40, n: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64)
    return 2.0 * X.T @ X / n


def test_take_hands_over_the_same_hessian_and_empties_the_accumulator():
    X = torch.randn(64, 12, dtype=torch.float64)
    a, b = HessianAccumulator(12), HessianAccumulator(12)
    a.add(X)
    b.add(X)
    H = a.take()
    assert torch.equal(H, b.hessian())
    assert a.tokens == 0
    with pytest.raises(ValueError, match="no calibration inputs"):
        a.hessian()
    with pytest.raises(ValueError, match="handed over"):
        a.add(X)
    with pytest.raises(ValueError, match="no calibration inputs"):
        HessianAccumulator(3).take()


@pytest.mark.parametrize("policy", ["damp", "eig"])
@pytest.mark.parametrize("singular", [False, True])
def test_prepare_without_keeping_h_gives_the_same_inverse(policy, singular):
    H = _hessian()
    if singular:  # exactly singular and no damping: the first Cholesky fails, the policy runs
        X = singular_inputs(8, 40)
        H = 2.0 * X.T @ X / X.shape[0]
    damp = 0.0 if singular else 0.01
    full = prepare_hessian(H, damp, on_singular=policy)
    lean = prepare_hessian(H, damp, on_singular=policy, keep_hessian=False)
    assert lean.H is None and full.H is not None
    assert torch.equal(lean.Hinv, full.Hinv)
    assert torch.equal(lean.diagonal, full.diagonal)
    assert torch.equal(full.diagonal, torch.diagonal(full.H))
    assert lean.damping == full.damping and lean.fallback == full.fallback
    assert (full.fallback is not None) == singular
    assert not lean.Hinv.is_contiguous() or singular  # column-major: LAPACK worked in place


def test_row_losses_in_blocks_equal_the_direct_formula():
    H = _hessian(70)
    g = torch.Generator().manual_seed(1)
    W, Wh = torch.randn(33, 70, generator=g), torch.randn(33, 70, generator=g)
    D = W.double() - Wh.double()
    direct = 0.5 * ((D @ H) * D).sum(1)
    for block in (1, 8, 256):
        got = row_losses(W, Wh, H.float(), block=block)
        want = 0.5 * ((D @ H.float().double()) * D).sum(1)
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert torch.allclose(row_losses(W, Wh, H, block=16), direct, rtol=1e-12, atol=0)
