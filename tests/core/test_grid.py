"""Quantization grids (optbrain.core.grid): levels, zero on the grid, codes, MSE scale search."""

import pytest
import torch

from optbrain import fit_grid

F64 = torch.float64


def _weights(seed, rows=5, cols=32, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    W[1] = W[1].abs() + 0.1  # all positive
    W[2] = -W[2].abs()  # all non-positive
    W[3, ::3] = 0  # some exact zeros
    return W


def _groups(T, group_size):
    rows, cols = T.shape
    gs = cols if group_size is None else group_size
    return T.reshape(rows, cols // gs, gs)


GRIDS = [(b, sym, gs) for b in (1, 2, 3, 4, 8) for sym in (True, False) for gs in (None, 8)]


@pytest.mark.parametrize("bits,sym,group_size", GRIDS)
@pytest.mark.parametrize("search", [False, True])
def test_levels_codes_and_zero(bits, sym, group_size, search):
    W = _weights(bits)
    grid = fit_grid(W, bits, sym=sym, group_size=group_size, search=search)
    Q = grid.quantize(W)
    maxq = 2**bits - 1
    assert grid.maxq == maxq
    # at most 2**bits distinct values in every (row, group)
    G = _groups(Q, group_size)
    for r in range(G.shape[0]):
        for j in range(G.shape[1]):
            assert torch.unique(G[r, j]).numel() <= 2**bits
    # codes are integers in [0, maxq] and reproduce the values: q = scale · (code − zero)
    codes = grid.codes(Q)
    assert codes.min() >= 0 and codes.max() <= maxq
    scale, zero = grid.columns(W.shape[1])
    torch.testing.assert_close(scale * (codes.to(F64) - zero), Q, rtol=0, atol=1e-12)
    # the zero point is an integer code, so 0 is a level; symmetric grids centre it
    assert torch.equal(zero, torch.round(zero))
    assert ((zero >= 0) & (zero <= maxq)).all()
    if sym:
        assert (grid.zero == (maxq + 1) / 2).all()
    assert (grid.quantize(torch.zeros_like(W)) == 0).all()
    assert (Q[W == 0] == 0).all()
    # values are on the grid, quantizing twice changes nothing, off-grid values are detected
    assert grid.on_grid(Q)
    assert torch.equal(grid.quantize(Q), Q)
    assert not grid.on_grid(Q + 0.37 * scale)
    assert (scale > 0).all()


@pytest.mark.parametrize("bits,sym,group_size", [(2, True, None), (3, False, None), (4, True, 8)])
def test_rounding_is_to_the_nearest_level_inside_the_range(bits, sym, group_size):
    """Against an explicit list of levels: q(w) is the nearest level whenever w is in range."""
    W = _weights(7)
    grid = fit_grid(W, bits, sym=sym, group_size=group_size, search=False)
    scale, zero = grid.columns(W.shape[1])
    Q = grid.quantize(W)
    codes = torch.arange(2**bits, dtype=F64)
    for r in range(W.shape[0]):
        for c in range(W.shape[1]):
            levels = scale[r, c] * (codes - zero[r, c])
            nearest = levels[(levels - W[r, c]).abs().argmin()]
            assert float((Q[r, c] - W[r, c]).abs()) <= float((nearest - W[r, c]).abs()) + 1e-12


@pytest.mark.parametrize(
    "bits,sym,group_size", [(2, True, None), (3, False, None), (3, True, 8), (4, False, 8)]
)
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_search_never_worse_than_min_max(bits, sym, group_size, weighted):
    W = _weights(11, rows=6, cols=32)
    g = torch.Generator().manual_seed(12)
    weight = torch.rand(32, generator=g, dtype=F64) * 3 if weighted else None
    plain = fit_grid(W, bits, sym=sym, group_size=group_size, search=False)
    searched = fit_grid(W, bits, sym=sym, group_size=group_size, search=True, weight=weight)
    wcol = torch.ones(32, dtype=F64) if weight is None else weight

    def err(grid):
        return _groups((grid.quantize(W) - W) ** 2 * wcol, group_size).sum(-1)

    e_plain, e_search = err(plain), err(searched)
    assert (e_search <= e_plain * (1 + 1e-12) + 1e-15).all()  # per (row, group)
    assert float(e_search.sum()) < float(e_plain.sum())  # and the search does find something


def test_min_max_grid_spans_the_row_range():
    """Plain min-max: the lowest and highest levels are the row's min and max (the range
    extended to include 0), up to half a step from rounding the zero point."""
    W = _weights(13)
    grid = fit_grid(W, 4, sym=False, search=False)
    s, z = grid.scale.squeeze(1), grid.zero.squeeze(1)
    lo, hi = W.min(1).values.clamp(max=0), W.max(1).values.clamp(min=0)
    assert ((-z * s - lo).abs() <= s / 2 + 1e-12).all()
    assert (((grid.maxq - z) * s - hi).abs() <= s / 2 + 1e-12).all()
    torch.testing.assert_close(s, (hi - lo) / grid.maxq)


def test_group_size_equal_to_cols_is_per_channel():
    W = _weights(14)
    a = fit_grid(W, 3, group_size=W.shape[1])
    b = fit_grid(W, 3)
    torch.testing.assert_close(a.quantize(W), b.quantize(W))


def test_fit_grid_rejects_bad_arguments():
    W = _weights(15, cols=12)
    for bits in (0, -1, 2.5, 17, True, "4"):
        with pytest.raises(ValueError, match="bits"):
            fit_grid(W, bits)
    for gs in (5, 0, -4, 2.5):
        with pytest.raises(ValueError, match="group_size"):
            fit_grid(W, 4, group_size=gs)
    with pytest.raises(ValueError, match="W"):
        fit_grid(W[0], 4)


def _ill_conditioned(cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(cols, 4 * cols, generator=g) * torch.logspace(-2, 0, cols)[:, None]
    X = torch.randn(cols, cols, generator=g) @ X
    return 2 * X @ X.T / X.shape[1] + 1e-3 * torch.eye(cols)


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_refit_scales_is_the_least_squares_optimum_of_the_codes(group_size, sym):
    """Against a per-row least-squares solve written out with the code matrix C_r = diag(c) E;
    codes unchanged, pruned weights still exactly zero, never worse on any row."""
    from optbrain.core.grid import refit_scales
    from optbrain.core.hessian import row_losses

    torch.manual_seed(0)
    rows, cols = 12, 32
    W = torch.randn(rows, cols)
    H = _ill_conditioned(cols, 1)
    grid = fit_grid(W, 3, sym=sym, group_size=group_size, weight=torch.diagonal(H))
    Wq = grid.quantize(W)
    Wq[:, ::5] = 0.0  # "pruned": on the grid (zero is a level), code offset 0
    new, g2, taken, after = refit_scales(W, Wq, grid, H)
    assert torch.equal(g2.codes(new), grid.codes(Wq)) and bool((new[:, ::5] == 0).all())
    before = row_losses(W, Wq, H)
    torch.testing.assert_close(after, row_losses(W, new, H))  # the returned row losses
    assert bool((after <= before).all()) and float(after.sum()) < 0.99 * float(before.sum())
    gs = group_size or cols
    E = torch.zeros(cols, cols // gs, dtype=torch.float64)
    E[torch.arange(cols), torch.arange(cols) // gs] = 1
    _, zero = grid.columns(cols)
    for r in range(rows):
        c = (grid.codes(Wq)[r] - zero[r]).double()
        C = c[:, None] * E
        s = torch.linalg.lstsq(C.T @ H.double() @ C, C.T @ H.double() @ W[r].double()).solution
        if taken[r]:
            torch.testing.assert_close(g2.scale[r].double(), s, rtol=1e-5, atol=0)
        else:
            assert torch.equal(g2.scale[r], grid.scale[r])


def test_refit_scales_keeps_a_group_without_codes():
    from optbrain.core.grid import refit_scales

    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    grid = fit_grid(W, 4, group_size=8)
    Wq = grid.quantize(W)
    Wq[0, :8] = 0.0  # row 0's first group: every code at the zero point
    new, g2, taken, _ = refit_scales(W, Wq, grid, _ill_conditioned(16, 2))
    assert bool(taken[0]) and g2.scale[0, 1] != grid.scale[0, 1]  # its other group refitted
    assert g2.scale[0, 0] == grid.scale[0, 0] and bool((new[0, :8] == 0).all())
    assert bool(torch.isfinite(g2.scale).all()) and bool((g2.scale > 0).all())
