"""Baselines (magnitude, obd, rtn): selection rules, pattern masks, grids, measured loss."""

import pytest
import torch
from fast_reference import F64, make_problem

from optbrain import compress_layer, prune_layer, quantize_layer
from optbrain.core.grid import fit_grid
from optbrain.core.hessian import layer_loss, prepare_hessian
from optbrain.core.patterns import blocks_ok, nm_ok

ROWS, COLS = 10, 48


def _problem(seed=0, dtype=torch.float32):
    W, H, _ = make_problem(seed, rows=ROWS, cols=COLS)
    return W.to(dtype), H.to(dtype)


def _check_loss(r, W, H, dtype):
    prep = prepare_hessian(H, 0.01, dtype=dtype)
    assert r.loss == pytest.approx(layer_loss(W, r.weight, prep.H), rel=1e-9)
    assert float(r.row_loss.sum()) == pytest.approx(r.loss, rel=1e-12)


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("method", ["magnitude", "obd"])
def test_unstructured_layer_scope_removes_the_lowest_scores(sparsity, method):
    W, H = _problem(1)
    r = prune_layer(W, H, sparsity, method=method)
    keep = r.mask
    assert int((~keep).sum()) == round(sparsity * ROWS * COLS)
    if method == "magnitude":
        score = W.abs()
    else:
        score = W**2 * torch.diagonal(prepare_hessian(H, 0.01).H)
    assert float(score[~keep].max()) <= float(score[keep].min())
    assert bool((r.weight[~keep] == 0).all()) and torch.equal(r.weight[keep], W[keep])
    _check_loss(r, W, H, torch.float32)


@pytest.mark.parametrize("method", ["magnitude", "obd"])
def test_row_scope_prunes_every_row_equally(method):
    W, H = _problem(2)
    r = prune_layer(W, H, 0.6, method=method, scope="row")
    pruned = (~r.mask).sum(1)
    assert bool((pruned == round(0.6 * COLS)).all())
    score = W.abs() if method == "magnitude" else W**2 * torch.diagonal(prepare_hessian(H).H)
    for i in range(ROWS):
        assert float(score[i][~r.mask[i]].max()) <= float(score[i][r.mask[i]].min())


@pytest.mark.parametrize("method", ["magnitude", "obd"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
def test_nm_keeps_the_n_largest_of_each_group(method, pattern):
    W, H = _problem(3)
    n, m = map(int, pattern.split(":"))
    r = prune_layer(W, H, pattern=pattern, method=method)
    assert nm_ok(r.mask, n, m)
    assert bool((r.mask.reshape(ROWS, -1, m).sum(-1) == n).all())
    score = W.abs() if method == "magnitude" else W**2 * torch.diagonal(prepare_hessian(H).H)
    s = score.reshape(ROWS, -1, m)
    k = r.mask.reshape(ROWS, -1, m)
    low_kept = torch.where(k, s, torch.full_like(s, float("inf"))).min(-1).values
    high_pruned = torch.where(~k, s, torch.full_like(s, -1.0)).max(-1).values
    assert bool((high_pruned <= low_kept).all())
    _check_loss(r, W, H, torch.float32)


@pytest.mark.parametrize("method", ["magnitude", "obd"])
@pytest.mark.parametrize("scope", ["layer", "row"])
def test_blocks_by_block_score(method, scope):
    W, H = _problem(4)
    r = prune_layer(W, H, 0.5, "block4", method=method, scope=scope)
    assert blocks_ok(r.mask, 4)
    assert int((~r.mask).sum()) == ROWS * COLS // 2
    if method == "magnitude":
        score = W.reshape(ROWS, -1, 4).norm(dim=-1)  # L2 norm of the block
    else:
        score = (W**2 * torch.diagonal(prepare_hessian(H).H)).reshape(ROWS, -1, 4).sum(-1)
    kept = r.mask.reshape(ROWS, -1, 4)[..., 0]
    if scope == "layer":
        assert float(score[~kept].max()) <= float(score[kept].min())
    else:
        assert bool(((~kept).sum(1) == COLS // 8).all())


def test_obd_equals_exact_obs_for_a_diagonal_hessian():
    """With a diagonal H, [H⁻¹]_pp = 1/H_pp and no weight couples to another: OBD's saliency is
    the OBS saliency and the exact solver has nothing to update — the same loss."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(ROWS, COLS, generator=g, dtype=F64)
    H = torch.diag(torch.rand(COLS, generator=g, dtype=F64) * 3 + 0.1)
    obd = prune_layer(W, H, 0.5, method="obd", dtype=F64)
    obc = prune_layer(W, H, 0.5, method="obc", dtype=F64)
    assert torch.equal(obd.mask, obc.mask)
    assert obd.loss == pytest.approx(obc.loss, rel=1e-10)


@pytest.mark.parametrize("kw", [{"bits": 4}, {"bits": 3, "sym": False, "group_size": 16}])
def test_rtn_is_nearest_level_of_the_hessian_weighted_grid(kw):
    W, H = _problem(6, F64)
    r = quantize_layer(W, H, method="rtn", dtype=F64, **kw)
    prep = prepare_hessian(H, 0.01, dtype=F64)
    grid = fit_grid(
        W,
        kw["bits"],
        sym=kw.get("sym", True),
        group_size=kw.get("group_size"),
        weight=torch.diagonal(prep.H),
    )
    assert torch.equal(r.weight, grid.quantize(W))
    assert torch.equal(r.grid.scale, grid.scale)
    assert r.grid.on_grid(r.weight)
    # nearest: no level of the weight's grid is closer to it
    scale, zero = grid.columns(COLS)
    k = torch.arange(grid.maxq + 1, dtype=F64)
    levels = scale[..., None] * (k - zero[..., None])  # (rows, cols, levels)
    best = (levels - W[..., None]).abs().min(-1).values
    torch.testing.assert_close((r.weight - W).abs(), best, atol=1e-12, rtol=0)
    _check_loss(r, W, H, F64)


@pytest.mark.parametrize(
    "pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("block4", 0.5)]
)
def test_magnitude_with_bits_prunes_then_rounds(pattern, sparsity):
    W, H = _problem(7, F64)
    r = compress_layer(W, H, sparsity, pattern, bits=3, method="magnitude", dtype=F64)
    ref = prune_layer(W, H, sparsity, pattern, method="magnitude", dtype=F64)
    assert torch.equal(r.mask, ref.mask)
    assert bool((r.weight[~r.mask] == 0).all())
    assert r.grid.on_grid(r.weight) and r.bits == 3
    grid = fit_grid(ref.weight, 3, weight=torch.diagonal(prepare_hessian(H, dtype=F64).H))
    assert torch.equal(r.weight, grid.quantize(ref.weight))
    _check_loss(r, W, H, F64)


def test_dead_inputs_cost_nothing():
    W, H = _problem(8, F64)
    H[7, :] = 0
    H[:, 7] = 0
    r = prune_layer(W, H, 0.5, method="obd", dtype=F64)
    assert not bool(r.mask[:, 7].any()) and bool((r.weight[:, 7] == 0).all())


@pytest.mark.parametrize(
    "method,call",
    [
        ("obd", lambda W, H: quantize_layer(W, H, 4, method="obd")),
        ("obd", lambda W, H: compress_layer(W, H, 0.5, bits=4, method="obd")),
        ("rtn", lambda W, H: prune_layer(W, H, 0.5, method="rtn")),
        ("rtn", lambda W, H: compress_layer(W, H, pattern="2:4", bits=4, method="rtn")),
        ("rtn", lambda W, H: prune_layer(W, H, 0.0, method="rtn")),
        ("magnitude", lambda W, H: prune_layer(W, H, 0.5, method="magnitude", scope="global")),
        ("magnitude", lambda W, H: prune_layer(W, H, 0.5, method="magnitude", lazy=4)),
        ("obd", lambda W, H: prune_layer(W, H, 0.5, method="obd", search=True)),
    ],
)
def test_invalid_requests_name_the_method(method, call):
    W, H = _problem(0)
    with pytest.raises(ValueError, match=method):
        call(W, H)


@pytest.mark.parametrize("kw", [{"bits": 4}, {"bits": 3, "sym": False, "group_size": 8}])
def test_row_chunked_grid_fit_is_identical(kw, monkeypatch):
    """fit_grid works on row chunks (cache-sized); every (row, group) is independent."""
    from optbrain.core import grid

    W, H = _problem(9)
    w = torch.rand(COLS)
    whole = fit_grid(W, weight=w, **kw)
    monkeypatch.setattr(grid, "ROW_CHUNK", 3 * COLS)  # 3 rows per chunk, 4 chunks
    chunked = fit_grid(W, weight=w, **kw)
    assert torch.equal(whole.scale, chunked.scale) and torch.equal(whole.zero, chunked.zero)
    assert chunked.group_size == whole.group_size
