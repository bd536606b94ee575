"""Wanda baseline: |w|·‖X_j‖ per output row from the raw diag H, no update, exact counts."""

import pytest
import torch
from fast_reference import make_problem

from optbrain import compress_layer, prune_layer
from optbrain.core.hessian import layer_loss, prepare_hessian
from optbrain.core.patterns import nm_ok

ROWS, COLS = 12, 64


def _problem(seed=0):
    W, H, X = make_problem(seed, rows=ROWS, cols=COLS)
    return W.float(), H.float(), X


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_wanda_removes_the_lowest_activation_weighted_magnitudes_in_each_row(sparsity):
    W, H, X = _problem(3)
    r = prune_layer(W, H, sparsity, method="wanda")
    score = W.abs() * X.float().norm(dim=0)  # the paper's |W_ij| · ‖X_j‖₂, from the inputs
    k = round(sparsity * COLS)
    for row in range(ROWS):
        pruned = ~r.mask[row]
        assert int(pruned.sum()) == k
        assert float(score[row][pruned].max()) <= float(score[row][~pruned].min())
    assert torch.equal(r.weight[r.mask], W[r.mask]) and bool((r.weight[~r.mask] == 0).all())
    prep = prepare_hessian(H, 0.01)
    assert r.loss == pytest.approx(layer_loss(W, r.weight, prep.H), rel=1e-9)


def test_wanda_differs_from_magnitude_when_input_norms_differ():
    W, H, X = _problem(4)
    scale = torch.linspace(0.1, 3.0, COLS, dtype=H.dtype)
    Hs = H * scale[:, None] * scale[None, :]  # inputs rescaled column by column
    wanda = prune_layer(W, Hs, 0.5, method="wanda")
    mag = prune_layer(W, Hs, 0.5, method="magnitude", scope="row")
    assert not torch.equal(wanda.mask, mag.mask)
    assert wanda.loss < mag.loss  # the activation weighting is what makes wanda better here


def test_wanda_nm_layer_scope_dead_inputs_and_bits():
    W, H, _ = _problem(5)
    r = prune_layer(W, H, pattern="2:4", method="wanda")
    assert nm_ok(r.mask, 2, 4)
    lay = prune_layer(W, H, 0.5, method="wanda", scope="layer")
    assert int((~lay.mask).sum()) == round(0.5 * ROWS * COLS)
    assert lay.info["scope"] == "layer"
    Hd = H.clone()
    Hd[7, :] = 0
    Hd[:, 7] = 0  # a dead input scores 0: pruned first in every row
    d = prune_layer(W, Hd, 0.1, method="wanda")
    assert not bool(d.mask[:, 7].any())
    q = compress_layer(W, H, 0.5, bits=4, method="wanda")
    assert q.grid is not None and q.grid.on_grid(q.weight)
    with pytest.raises(ValueError, match="scope"):
        prune_layer(W, H, 0.5, method="wanda", scope="column")
