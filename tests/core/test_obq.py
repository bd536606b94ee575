"""OBQ and OBC compound (optbrain.core.obq) against a naive from-scratch greedy and brute force.

The naive OBQ step: for every weight not yet quantized, fix it to the grid value of its *current*
(compensated) value, re-solve the rest by least squares from scratch, keep the cheapest. The grid
is the one the solver reports (``result.grid``); the rounding formula is re-written in the test.
"""

import pytest
import torch
from obs_reference import (
    block_candidates,
    grid_columns,
    grid_target,
    make_problem,
    naive_greedy,
    nm_candidates,
    single_candidates,
    zero_target,
)

from optbrain import compress_layer, quantize_layer
from optbrain.core.patterns import blocks_ok, nm_ok

F64 = torch.float64
# the naive references are the plain greedy: no per-row guard (core.methods.guard), no slack, no
# scale refit (core.grid.refit_scales)
EXACT = {"damp": 0.0, "dtype": F64, "guard": False, "slack": 0.0, "refit_scales": False}


def _naive_quant_row(W, H, grid, row, fixed=None, outliers=True):
    """Naive OBQ of one row, continuing from the pruned set ``fixed`` ({coord: 0}) if given;
    ``outliers``: apply OBQ's outlier rule (the library default)."""
    cols = W.shape[1]
    scale, zero = grid_columns(grid, cols)
    fixed = fixed or {}
    kept = [i for i in range(cols) if i not in fixed]
    return naive_greedy(
        W[row],
        H,
        len(kept),
        single_candidates(cols, kept),
        grid_target(scale[row], zero[row], grid.maxq),
        fixed=fixed,
        outlier_scale=scale[row].tolist() if outliers else None,
    )


def _check_row(r, row, ref):
    torch.testing.assert_close(r.weight[row], ref.states[-1], atol=1e-8, rtol=1e-7)
    assert float(r.row_loss[row]) == pytest.approx(ref.losses[-1], rel=1e-7, abs=1e-10)


@pytest.mark.parametrize(
    "bits,sym,group_size,cols,seed",
    [
        (3, True, None, 8, 0),
        (3, False, None, 8, 1),
        (2, True, 4, 8, 2),
        (4, False, 3, 9, 3),
        (1, False, None, 6, 4),
    ],
)
@pytest.mark.parametrize(
    "engine", [{"lazy": 2}, {}, {"kernel": "torch", "lazy": 2, "shrink": 0.9}, {"kernel": "torch"}]
)
@pytest.mark.parametrize("outliers", [True, False])
def test_obq_equals_naive_greedy(bits, sym, group_size, cols, seed, engine, outliers):
    rows = 3
    W, X, H = make_problem(seed, rows, cols)
    r = quantize_layer(
        W, H, bits, sym=sym, group_size=group_size, outliers=outliers, **engine, **EXACT
    )
    assert r.grid is not None and r.grid.bits == bits and r.grid.sym is sym
    assert r.grid.on_grid(r.weight)
    for row in range(rows):
        _check_row(r, row, _naive_quant_row(W, H, r.grid, row, outliers=outliers))


def test_outlier_rule_fires_and_changes_the_order():
    """A shrunken grid range leaves weights outside it: the rule must pick them first."""
    W, X, H = make_problem(7, 4, 8)
    W[:, 3] *= 6.0  # far outside any range the MSE search keeps
    a = quantize_layer(W, H, 2, **EXACT)
    b = quantize_layer(W, H, 2, outliers=False, **EXACT)
    assert not torch.equal(a.weight, b.weight)


def _compound_reference(W, H, r, prune_candidates, counts, group=1):
    """Naive prune greedy (``counts[row]`` steps) then naive OBQ on the kept weights."""
    for row in range(W.shape[0]):
        pruned = naive_greedy(W[row], H, counts[row], prune_candidates, zero_target)
        removed = {i for grp in pruned.order for i in grp}
        assert set((~r.mask[row]).nonzero().flatten().tolist()) == removed
        ref = _naive_quant_row(W, H, r.grid, row, fixed=pruned.fixed)
        _check_row(r, row, ref)
        assert (r.weight[row][sorted(removed)] == 0).all()  # exactly zero, not just small


def test_compound_nm_2_4_3bit_equals_naive_prune_then_quantize():
    rows, cols = 3, 8
    W, X, H = make_problem(10, rows, cols)
    r = compress_layer(W, H, pattern="2:4", bits=3, **EXACT)
    assert nm_ok(r.mask, 2, 4) and r.grid.on_grid(r.weight)
    _compound_reference(W, H, r, nm_candidates(cols, 2, 4), [cols // 2] * rows)


def test_compound_unstructured_layerwide_4bit_equals_naive():
    """Rows keep different numbers of weights (layer-wide selection) before quantization."""
    rows, cols = 4, 8
    W, X, H = make_problem(11, rows, cols)
    W = W * torch.tensor([[0.2], [1.0], [4.0], [1.0]], dtype=F64)
    r = compress_layer(W, H, 0.5, bits=4, sym=False, **EXACT)
    counts = (~r.mask).sum(1).tolist()
    assert sum(counts) == rows * cols // 2 and len(set(counts)) > 1
    _compound_reference(W, H, r, single_candidates(cols), counts)


def test_compound_block2_3bit_group4_equals_naive():
    rows, cols = 3, 8
    W, X, H = make_problem(12, rows, cols)
    r = compress_layer(W, H, 0.5, pattern="block2", bits=3, group_size=4, per_row=True, **EXACT)
    assert blocks_ok(r.mask, 2) and r.grid.on_grid(r.weight)
    _compound_reference(W, H, r, block_candidates(cols, 2), [2] * rows, group=2)


def _brute_force_grid_loss(w, H, scale, zero, maxq):
    """Least loss over every assignment of grid levels to the row's weights."""
    levels = [(scale[c] * (torch.arange(maxq + 1, dtype=F64) - zero[c])) for c in range(len(w))]
    Q = torch.cartesian_prod(*levels)  # (levels**cols, cols): every assignment
    D = Q - w
    return float((0.5 * (D @ H) * D).sum(1).min())


@pytest.mark.parametrize("seed", range(30, 42))
@pytest.mark.parametrize("bits,sym,cols", [(2, False, 6), (3, True, 5)])
def test_obq_never_beats_brute_force_over_the_grid(seed, bits, sym, cols):
    rows = 2
    W, X, H = make_problem(seed, rows, cols)
    r = quantize_layer(W, H, bits, sym=sym, **EXACT)
    scale, zero = grid_columns(r.grid, cols)
    for row in range(rows):
        best = _brute_force_grid_loss(W[row], H, scale[row], zero[row], r.grid.maxq)
        assert float(r.row_loss[row]) >= best - 1e-9 * (1 + best)
        # and the prediction is the loss of the weights it returns
        d = r.weight[row] - W[row]
        assert float(r.row_loss[row]) == pytest.approx(float(0.5 * d @ H @ d), rel=1e-8)


@pytest.mark.parametrize("sparsity,pattern", [(0.5, "unstructured"), (None, "2:4")])
def test_compound_with_row_chunks_equals_one_chunk(sparsity, pattern):
    """Rows split into chunks (tiny memory budget) give the same compound result; rows keep
    different counts under the layer-wide mask, so chunks must share one step count."""
    W, X, H = make_problem(21, 9, 8)
    W = W * torch.linspace(0.2, 3.0, 9, dtype=F64).unsqueeze(1)
    one = compress_layer(W, H, sparsity, pattern=pattern, bits=3, **EXACT)
    chunked = compress_layer(
        W, H, sparsity, pattern=pattern, bits=3, memory=8 * 8 * 8 * 2 * 2, **EXACT
    )
    torch.testing.assert_close(chunked.weight, one.weight, atol=1e-10, rtol=0)
    assert chunked.loss == pytest.approx(one.loss, rel=1e-9)
