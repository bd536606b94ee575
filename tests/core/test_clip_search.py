"""core.clip_search: each row's grid chosen by its GPTQ loss after compensation.

Checked against the candidates run one at a time through ``column_solve`` (the search must
return, per row, exactly the best of them), never worse than the searched grid on any row,
weights on the returned grid with the predicted loss equal to the measured one.
"""

import pytest
import torch

from optbrain.core.clip_search import SHRINKS, clip_search
from optbrain.core.columnwise import column_solve, upper_inverse_factor
from optbrain.core.grid import fit_grid
from optbrain.core.hessian import row_losses


def _problem(seed: int, rows: int = 24, cols: int = 32):
    """Heavy-tailed weights (Student-t, 2 dof) and an ill-conditioned H with outlier inputs:
    where clipping a row's range pays off after compensation."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).sqrt()
    X = torch.randn(8 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    X[:, :3] *= 10
    H = 2 * X.T @ X / X.shape[0]
    H += 0.01 * H.diagonal().mean() * torch.eye(cols)
    return W.double(), H.double()


def _factor(H: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    Hp = H if perm is None else H[perm][:, perm]
    U, _ = upper_inverse_factor(Hp, torch.cholesky_inverse(torch.linalg.cholesky(Hp)))
    return U


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_each_row_takes_the_best_candidate(group_size, sym, act_order):
    """Every candidate solved on its own: the search's row loss is their per-row minimum and
    the row's weights are that candidate's (stacked in chunks of 3 candidates here)."""
    W, H = _problem(0)
    d = H.diagonal()
    perm = torch.argsort(d, descending=True) if act_order else None
    U = _factor(H, perm)
    kw = {"sym": sym, "group_size": group_size}
    base = fit_grid(W, 3, weight=d, **kw)
    out = clip_search(W, d, U, 3, base, perm=perm, chunk=3 * W.numel(), **kw)
    grids = [base] + [fit_grid(W * p, 3, search=False, **kw) for p in SHRINKS]
    each = [
        column_solve(W.clone(), d, U, perm=perm, bits=3, static_groups=True, grid=g, **kw)
        for g in grids
    ]
    losses = torch.stack([o.row_loss for o in each])  # (k, rows)
    best = losses.argmin(0)
    torch.testing.assert_close(out.row_loss, losses.min(0).values, rtol=1e-12, atol=0)
    for r in range(W.shape[0]):
        torch.testing.assert_close(out.weight[r], each[int(best[r])].weight[r], rtol=0, atol=1e-12)
    assert out.grid.on_grid(out.weight)
    assert sum(out.info["clip_search"].values()) == W.shape[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_worse_than_the_searched_grid_and_better_on_heavy_tails(seed):
    """Per row ≤ GPTQ on ``fit_grid``'s searched grid (a candidate); on heavy-tailed rows the
    layer loss drops by more than 10% (measured 19%, 23%, 24% on these seeds at 3 bits)."""
    W, H = _problem(seed)
    d = H.diagonal()
    U = _factor(H)
    base = column_solve(W.clone(), d, U, bits=3, sym=False)
    out = clip_search(W, d, U, 3, fit_grid(W, 3, sym=False, weight=d), sym=False)
    assert bool((out.row_loss <= base.row_loss * (1 + 1e-12)).all())
    assert out.row_loss.sum() < 0.9 * base.row_loss.sum()
    # the predicted (accumulated) loss is the loss measured from the weights
    torch.testing.assert_close(row_losses(W, out.weight, H), out.row_loss, rtol=1e-9, atol=1e-9)


def test_column_solve_rejects_a_grid_of_another_layout():
    W, H = _problem(0)
    d, U = H.diagonal(), _factor(H)
    g = fit_grid(W, 3)
    with pytest.raises(ValueError, match="group_size=8"):
        column_solve(W, d, U, bits=3, group_size=8, static_groups=True, grid=g)
    with pytest.raises(ValueError, match="static"):
        column_solve(W, d, U, bits=3, group_size=8, grid=fit_grid(W, 3, group_size=8))
    with pytest.raises(ValueError, match="rows"):
        column_solve(W[:4], d, U, bits=3, grid=g)
