"""ExactOBS (optbrain.core.obs) against a naive from-scratch greedy, lstsq and brute force.

Every problem is brute-force sized (6–10 columns, a few rows), float64, damp=0, with correlated
inputs ``X = Gaussian · random mixing`` and ``N = 4 · cols`` tokens, so H is invertible.
"""

import pytest
import torch
from obs_reference import (
    all_blocks,
    all_nm,
    all_unstructured,
    best_mask_loss,
    block_candidates,
    layerwide_counts,
    make_problem,
    naive_greedy,
    nm_candidates,
    single_candidates,
    zero_target,
)

from optbrain import prepare_hessian, prune_layer
from optbrain.core import obs_fused, trace
from optbrain.core.patterns import Pattern, blocks_ok, nm_ok
from optbrain.core.trace import masked_optimum, obs_trace

F64 = torch.float64
# the naive references are the plain greedy: the per-row guard (core.methods.guard) is off
EXACT = {"damp": 0.0, "dtype": F64, "guard": False}
ATOL = 1e-8  # float64 engine vs. from-scratch solves on conditioned-but-random H


def _naive_prune(W, H, steps, candidates):
    return [naive_greedy(W[r], H, steps, candidates, zero_target) for r in range(W.shape[0])]


def _removed_sets(mask):
    return [set((~mask[r]).nonzero().flatten().tolist()) for r in range(mask.shape[0])]


def _assert_row_state(weight, mask, row_loss, r, ref, k, group=1):
    """Row r of a result equals the naive greedy state after k steps (weights, mask, loss)."""
    torch.testing.assert_close(weight[r], ref.states[k], atol=ATOL, rtol=1e-7)
    removed = {i for grp in ref.order[:k] for i in grp}
    assert len(removed) == k * group
    assert set((~mask[r]).nonzero().flatten().tolist()) == removed
    assert float(row_loss[r]) == pytest.approx(ref.losses[k], rel=1e-7, abs=1e-10)


# --- unstructured --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "engine",
    [
        {"lazy": 1},
        {"lazy": 3, "shrink": 0.9},
        {"lazy": 32, "shrink": 0.0},
        {},
        {"kernel": "torch"},
        {"kernel": "torch", "lazy": 3, "shrink": 0.9},
    ],
)
@pytest.mark.parametrize("seed,rows,cols", [(0, 3, 6), (1, 2, 8), (2, 3, 10)])
def test_unstructured_per_row_equals_naive_greedy(seed, rows, cols, engine):
    W, X, H = make_problem(seed, rows, cols)
    refs = _naive_prune(W, H, cols - 1, single_candidates(cols))
    r = prune_layer(W, H, 0.5, per_row=True, **engine, **EXACT)
    k = round(0.5 * cols)
    for row in range(rows):
        _assert_row_state(r.weight, r.mask, r.row_loss, row, refs[row], k)
    # every other per-row level comes from the same trace
    for s in (0.2, 0.4, 0.7, 0.9):
        weight, mask, row_loss = r.trace.at(s, per_row=True)
        k = round(s * cols)
        for row in range(rows):
            _assert_row_state(weight, mask, row_loss, row, refs[row], k)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("seed", [3, 4])
def test_unstructured_layerwide_selection_equals_naive(seed, sparsity):
    rows, cols = 4, 8
    W, X, H = make_problem(seed, rows, cols)
    W = W * torch.tensor([[0.2], [1.0], [3.0], [1.0]], dtype=F64)  # rows of different size
    refs = _naive_prune(W, H, cols, single_candidates(cols))
    r = prune_layer(W, H, sparsity, **EXACT)
    counts = (~r.mask).sum(1).tolist()
    assert sum(counts) == round(sparsity * rows * cols)
    increments = [torch.diff(torch.tensor(ref.losses, dtype=F64)).tolist() for ref in refs]
    assert counts == layerwide_counts(increments, round(sparsity * rows * cols))
    for row in range(rows):
        _assert_row_state(r.weight, r.mask, r.row_loss, row, refs[row], counts[row])
    assert r.loss == pytest.approx(sum(refs[i].losses[counts[i]] for i in range(rows)), rel=1e-7)


# --- N:M --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "engine", [{"lazy": 2}, {"shrink": 0.0}, {"kernel": "torch", "lazy": 2, "shrink": 0.9}]
)
@pytest.mark.parametrize("pattern,cols,seed", [("2:4", 8, 5), ("1:3", 9, 6), ("3:4", 8, 7)])
def test_nm_equals_naive_greedy(pattern, cols, seed, engine):
    n, m = map(int, pattern.split(":"))
    rows = 3
    W, X, H = make_problem(seed, rows, cols)
    steps = cols // m * (m - n)
    refs = _naive_prune(W, H, steps, nm_candidates(cols, n, m))
    r = prune_layer(W, H, pattern=pattern, **engine, **EXACT)
    assert nm_ok(r.mask, n, m)
    assert int((~r.mask).sum()) == rows * steps
    for row in range(rows):
        _assert_row_state(r.weight, r.mask, r.row_loss, row, refs[row], steps)


# --- block ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,cols,seed", [("block2", 8, 8), ("block3", 9, 9)])
def test_block_equals_naive_group_greedy(pattern, cols, seed):
    b = int(pattern[5:])
    rows, nb = 3, cols // b
    W, X, H = make_problem(seed, rows, cols)
    refs = _naive_prune(W, H, nb - 1, block_candidates(cols, b))
    # per-row: the same number of blocks in every row
    r = prune_layer(W, H, 0.5, pattern=pattern, per_row=True, lazy=b, **EXACT)
    k = round(0.5 * nb)
    assert blocks_ok(r.mask, b)
    for row in range(rows):
        _assert_row_state(r.weight, r.mask, r.row_loss, row, refs[row], k, group=b)
    # layer-wide: each row equals the naive state after its own number of blocks
    r = prune_layer(W, H, 0.5, pattern=pattern, **EXACT)
    assert blocks_ok(r.mask, b)
    counts = ((~r.mask).sum(1) // b).tolist()
    assert sum(counts) == round(0.5 * rows * nb)
    for row in range(rows):
        _assert_row_state(r.weight, r.mask, r.row_loss, row, refs[row], counts[row], group=b)


# --- fixed mask: least-squares optimum ---------------------------------------------------------


def _lstsq_row(w, X, keep_row):
    """min ||X ŵ − X w||² over ŵ supported on the kept coordinates, via lstsq on X itself."""
    out = torch.zeros_like(w)
    if keep_row.any():
        sol = torch.linalg.lstsq(X[:, keep_row], (X @ w).unsqueeze(1)).solution
        out[keep_row] = sol.squeeze(1)
    return out


@pytest.fixture(params=["row by row", "batched"])
def masked_path(request, monkeypatch):
    """``masked_optimum``'s two paths on the CPU: row by row (its CPU default) and batched."""
    monkeypatch.setattr(trace, "ROW_BY_ROW", lambda device: request.param == "row by row")
    return request.param


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_masked_optimum_equals_lstsq(seed, masked_path):
    rows, cols = 6, 8
    W, X, H = make_problem(seed, rows, cols)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, cols, generator=g) < 0.5
    keep[0] = True  # nothing pruned
    keep[1] = False  # everything pruned
    keep[2] = torch.arange(cols) != 3  # a single weight pruned
    got = masked_optimum(W, H, keep)
    for r in range(rows):
        torch.testing.assert_close(got[r], _lstsq_row(W[r], X, keep[r]), atol=1e-9, rtol=1e-8)
    assert (got[~keep] == 0).all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_masked_optimum_paths_agree_on_rows_of_different_counts(sparsity, monkeypatch):
    """Both paths, rows with different pruned counts (some solve the S system, some the F
    system, one with nothing and one with everything pruned), 240 columns; row by row serially
    and on the thread pool (which leaves the caller's thread count as it was)."""
    threads = torch.get_num_threads()
    W, X, H = make_problem(7, 12, 240)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(12, 240, generator=g) >= sparsity * torch.linspace(0.4, 1.6, 12)[:, None]
    keep[0] = True
    keep[1] = False
    n = (~keep).sum(1)
    if sparsity == 0.5:  # both systems occur
        assert bool((n[2:] < 120).any()) and bool((n[2:] > 120).any())
    a = masked_optimum(W, H, keep)  # row by row, serially (small work)
    monkeypatch.setattr(obs_fused, "SERIAL_WORK", 0)
    threaded = masked_optimum(W, H, keep)  # row by row on the pool
    assert torch.equal(threaded, a) and torch.get_num_threads() == threads
    monkeypatch.setattr(trace, "ROW_BY_ROW", lambda device: False)
    b = masked_optimum(W, H, keep, memory=1 << 16)  # batched, several chunks
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert (a[~keep] == 0).all() and torch.equal(a[0], W[0])


@pytest.mark.parametrize(
    "pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("block2", 0.5)]
)
def test_kept_weights_are_the_lstsq_optimum_for_their_mask(pattern, sparsity):
    rows, cols = 4, 8
    W, X, H = make_problem(13, rows, cols)
    r = prune_layer(W, H, sparsity, pattern=pattern, **EXACT)
    for row in range(rows):
        torch.testing.assert_close(
            r.weight[row], _lstsq_row(W[row], X, r.mask[row]), atol=1e-8, rtol=1e-7
        )


# --- greedy is never better than the optimum over all masks -------------------------------------


def _assert_not_better_than_brute_force(r, W, H, removals_for_row):
    for row in range(W.shape[0]):
        best = best_mask_loss(W[row], H, removals_for_row())
        assert float(r.row_loss[row]) >= best - 1e-9 * (1 + best)


@pytest.mark.parametrize("seed", range(20, 32))
def test_greedy_never_beats_brute_force(seed):
    rows, cols = 3, 8
    W, X, H = make_problem(seed, rows, cols)
    for k in (2, 4, 6):
        r = prune_layer(W, H, k / cols, per_row=True, **EXACT)
        _assert_not_better_than_brute_force(r, W, H, lambda k=k: all_unstructured(cols, k))
    r = prune_layer(W, H, pattern="2:4", **EXACT)
    _assert_not_better_than_brute_force(r, W, H, lambda: all_nm(cols, 2, 4))
    r = prune_layer(W, H, 0.5, pattern="block2", per_row=True, **EXACT)
    _assert_not_better_than_brute_force(r, W, H, lambda: all_blocks(cols, 2, 2))


# --- engine settings must not change the answer -------------------------------------------------


@pytest.mark.parametrize(
    "pattern,sparsity", [("unstructured", 0.6), ("2:4", None), ("block2", 0.5)]
)
def test_engine_settings_do_not_change_results(pattern, sparsity):
    rows, cols = 5, 8
    W, X, H = make_problem(40, rows, cols)
    ref = prune_layer(W, H, sparsity, pattern=pattern, **EXACT)
    one_row = cols * cols * 8 * 2  # memory budget of exactly one row of per-row H⁻¹ state
    for opts in (
        {"lazy": 1},
        {"lazy": 2},
        {"lazy": 5},
        {"memory": one_row},
        {"memory": 2 * one_row, "lazy": 3},
        {"shrink": 0.0},
        {"shrink": 0.9, "lazy": 2},
        {"shrink": 0.3, "memory": one_row},
        {"kernel": "torch"},
        {"kernel": "torch", "lazy": 2, "shrink": 0.9, "memory": one_row},
    ):
        r = prune_layer(W, H, sparsity, pattern=pattern, **EXACT, **opts)
        assert torch.equal(r.mask, ref.mask), opts
        torch.testing.assert_close(r.weight, ref.weight, atol=1e-10, rtol=1e-9)
        assert r.loss == pytest.approx(ref.loss, rel=1e-9)


def test_partial_trace_gives_the_same_levels_as_a_full_trace():
    """``obs_trace(max_sparsity=s_max)`` records fewer steps; levels up to s_max must not move."""
    rows, cols = 3, 8
    W, X, H = make_problem(41, rows, cols)
    prep = prepare_hessian(H, 0.0, dtype=F64)
    full = obs_trace(W, prep, Pattern("unstructured"))
    part = obs_trace(W, prep, Pattern("unstructured"), max_sparsity=0.5)
    for s in (0.25, 0.5):
        for per_row in (False, True):
            wf, mf, lf = full.at(s, per_row=per_row)
            wp, mp, lp = part.at(s, per_row=per_row)
            assert int((~mp).sum()) == round(s * rows * cols)
            assert torch.equal(mp, mf)
            torch.testing.assert_close(wp, wf)
            torch.testing.assert_close(lp, lf)


@pytest.mark.parametrize("kind", ["unstructured", "2:4", "obq"])
def test_step_threads_give_identical_results_and_restore_the_thread_count(kind):
    """Per-step thread count (``EngineConfig.step_threads``) changes only speed: bitwise the
    same trace / N:M / OBQ result, and the caller's thread count is back afterwards."""
    from optbrain.core.grid import fit_grid
    from optbrain.core.obq import obq
    from optbrain.core.obs import EngineConfig
    from optbrain.core.trace import prune_nm

    W, X, H = make_problem(42, 128, 256)  # (R, C) ops above torch's parallel grain size
    prep = prepare_hessian(H, 0.01, dtype=torch.float32)
    W = W.float()
    grid = fit_grid(W, 4, weight=torch.diagonal(prep.H))

    def run(engine):
        if kind == "unstructured":
            out = obs_trace(W, prep, Pattern("unstructured"), engine=engine)
            return out.order, out.step_loss
        if kind == "2:4":
            out = prune_nm(W, prep, 2, 4, engine)
        else:
            out = obq(W, prep, grid, engine=engine)
        return out.order, out.step_loss, out.weight

    before = torch.get_num_threads()
    ref = run(EngineConfig(lazy=8, kernel="torch"))
    for st in (1, 2):
        got = run(EngineConfig(lazy=8, step_threads=st, kernel="torch"))
        assert torch.get_num_threads() == before
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a, b), (kind, st)
    with pytest.raises(ValueError, match="step_threads"):
        EngineConfig(step_threads=-1)
