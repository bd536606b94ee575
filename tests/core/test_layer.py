"""The public layer API (optbrain.core.layer) with method "obc": predicted loss == measured loss,
every level from one trace, masks and grids hold, invariances, dead/singular inputs, bad input."""

import pytest
import torch
from obs_reference import make_problem, measured_loss, singular_inputs

from optbrain import (
    HessianAccumulator,
    compress_layer,
    hessian_from_inputs,
    layer_loss,
    prune_layer,
    quantize_layer,
)
from optbrain.core.patterns import blocks_ok, nm_ok

F64, F32 = torch.float64, torch.float32
ROWS, COLS, TOKENS = 6, 16, 64

CASES = {
    "unstructured": {"sparsity": 0.5},
    "2:4": {"pattern": "2:4"},
    "1:4": {"pattern": "1:4"},
    "block4": {"sparsity": 0.5, "pattern": "block4"},
    "q3-sym": {"bits": 3},
    "q4-asym": {"bits": 4, "sym": False},
    "q3-sym-g4": {"bits": 3, "group_size": 4},
    "q4-asym-g8": {"bits": 4, "sym": False, "group_size": 8},
    "2:4+q3": {"pattern": "2:4", "bits": 3},
    "unstr0.6+q4-asym-g8": {"sparsity": 0.6, "bits": 4, "sym": False, "group_size": 8},
    "block4+q3": {"sparsity": 0.5, "pattern": "block4", "bits": 3},
}


def _problem(seed=0, dtype=F64):
    return make_problem(seed, ROWS, COLS, tokens=TOKENS, dtype=dtype, well_conditioned=True)


def _check_structure(r, kw):
    """Masks satisfy their pattern, quantized weights lie on their grid, pruned weights are 0."""
    pattern = kw.get("pattern", "unstructured")
    if "sparsity" in kw or ":" in pattern:
        assert r.mask is not None and r.mask.shape == (ROWS, COLS)
        assert (r.weight[~r.mask] == 0).all()
        assert r.sparsity == pytest.approx(float((~r.mask).float().mean()))
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        assert nm_ok(r.mask, n, m)
        assert int((~r.mask).sum()) == ROWS * COLS // m * (m - n)
    if pattern.startswith("block"):
        assert blocks_ok(r.mask, int(pattern[5:]))
    if "bits" in kw:
        assert r.grid is not None and r.grid.bits == kw["bits"]
        assert r.grid.on_grid(r.weight.to(r.grid.scale.dtype))
        G = r.weight.reshape(ROWS, -1, kw.get("group_size") or COLS)
        for row in range(ROWS):
            for j in range(G.shape[1]):
                assert torch.unique(G[row, j]).numel() <= 2 ** kw["bits"]
    else:
        assert r.grid is None


@pytest.mark.parametrize("name", list(CASES))
def test_predicted_loss_equals_measured_float64(name):
    kw = CASES[name]
    W, X, H = _problem(1)
    r = compress_layer(W, H, damp=0.0, dtype=F64, **kw)
    _check_structure(r, kw)
    assert r.weight.dtype == F64 and r.damping == 0.0 and r.fallback is None
    meas = measured_loss(W, r.weight, X)
    assert meas > 0
    assert r.loss == pytest.approx(meas, rel=1e-9)
    assert float(r.row_loss.sum()) == pytest.approx(r.loss, rel=1e-12)
    for row in (0, ROWS - 1):
        assert float(r.row_loss[row]) == pytest.approx(
            measured_loss(W[row : row + 1], r.weight[row : row + 1], X), rel=1e-9, abs=1e-12
        )


@pytest.mark.parametrize("name", list(CASES))
def test_predicted_loss_equals_measured_float32(name):
    kw = CASES[name]
    W, X, H = _problem(2, dtype=F32)
    r = compress_layer(W, H, damp=0.0, dtype=F32, **kw)
    _check_structure(r, kw)
    assert r.weight.dtype == F32
    assert r.loss == pytest.approx(measured_loss(W, r.weight, X), rel=2e-3)


@pytest.mark.parametrize(
    "name", ["unstructured", "2:4", "block4", "q4-asym-g8", "2:4+q3", "unstr0.6+q4-asym-g8"]
)
@pytest.mark.parametrize("damp", [0.01, 0.3])
def test_predicted_loss_equals_layer_loss_under_damped_hessian(name, damp):
    kw = CASES[name]
    W, X, H = _problem(3)
    r = compress_layer(W, H, damp=damp, dtype=F64, **kw)
    lam = damp * float(torch.diagonal(H).mean())
    assert r.damping == pytest.approx(lam, rel=1e-12)
    Hd = H + lam * torch.eye(COLS, dtype=F64)
    assert r.loss == pytest.approx(layer_loss(W, r.weight, Hd), rel=1e-9)
    # the damped objective is not the real one: the measured loss is smaller
    assert measured_loss(W, r.weight, X) < layer_loss(W, r.weight, Hd)


# --- every sparsity from one trace --------------------------------------------------------------


def test_every_level_from_one_trace_matches_a_separate_run():
    W, X, H = _problem(4)
    W = W * torch.linspace(0.1, 3.0, ROWS, dtype=F64).unsqueeze(1)  # rows of different size
    r = prune_layer(W, H, 0.5, damp=0.0, dtype=F64)
    levels = [0.1, 0.25, 0.5, 0.7, 0.9]
    for s, (weight, mask, row_loss) in zip(levels, r.trace.levels(levels), strict=True):
        alone = prune_layer(W, H, s, damp=0.0, dtype=F64)
        assert int((~mask).sum()) == round(s * ROWS * COLS)
        assert torch.equal(mask, alone.mask)
        torch.testing.assert_close(weight, alone.weight, rtol=1e-10, atol=1e-12)
        assert float(row_loss.sum()) == pytest.approx(alone.loss, rel=1e-10)
        assert float(row_loss.sum()) == pytest.approx(measured_loss(W, weight, X), rel=1e-9)
    # layer-wide selection: rows end at different sparsities
    per_row = (~r.mask).sum(1)
    assert int(per_row.sum()) == ROWS * COLS // 2
    assert len(set(per_row.tolist())) > 1


@pytest.mark.parametrize("pattern", ["unstructured", "block4"])
def test_trace_levels_exact_counts_and_monotone_loss(pattern):
    W, X, H = _problem(5)
    r = prune_layer(W, H, 0.3, pattern=pattern, damp=0.0, dtype=F64)
    b = 4 if pattern == "block4" else 1
    grid = [i / 20 for i in range(20)]
    losses = []
    for s, (weight, mask, row_loss) in zip(grid, r.trace.levels(grid), strict=True):
        assert int((~mask).sum()) == round(s * ROWS * (COLS // b)) * b
        assert (weight[~mask] == 0).all()
        if b > 1:
            assert blocks_ok(mask, b)
        losses.append(float(row_loss.sum()))
    steps = torch.diff(torch.tensor(losses, dtype=F64))
    assert (steps >= -1e-12 * max(losses)).all()  # non-decreasing in the sparsity
    assert losses[0] == 0.0 and losses[-1] > losses[len(losses) // 2] > 0
    # per-row: every row at the same count
    for s in (0.25, 0.5, 0.75):
        weight, mask, _ = r.trace.at(s, per_row=True)
        assert ((~mask).sum(1) == round(s * (COLS // b)) * b).all()


# --- invariances ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unstructured", "2:4", "block4", "q3-sym-g4", "2:4+q3"])
def test_results_do_not_depend_on_calibration_batching(name):
    kw = CASES[name]
    W, X, _ = _problem(6)
    results = []
    for splits in ([TOKENS], [1] * 16 + [TOKENS - 16], [19, 30, TOKENS - 49]):
        acc = HessianAccumulator(COLS)
        for part in X.split(splits):
            acc.add(part)
        results.append(compress_layer(W, acc.hessian(), damp=0.01, dtype=F64, **kw))
    for other in results[1:]:
        if results[0].mask is not None:
            assert torch.equal(other.mask, results[0].mask)
        torch.testing.assert_close(other.weight, results[0].weight, rtol=1e-9, atol=1e-10)
        assert other.loss == pytest.approx(results[0].loss, rel=1e-9)


@pytest.mark.parametrize("name", ["unstructured", "2:4", "block4", "q4-asym", "2:4+q3"])
def test_float32_close_to_float64(name):
    kw = CASES[name]
    W, X, H = _problem(7)
    r64 = compress_layer(W, H, damp=0.01, dtype=F64, **kw)
    r32 = compress_layer(W.float(), H.float(), damp=0.01, dtype=F32, **kw)
    assert r32.loss == pytest.approx(r64.loss, rel=1e-3)
    if r64.mask is not None:
        agree = float((r32.mask == r64.mask).float().mean())
        assert agree >= 0.97
    same = (r64.mask is None) or torch.equal(r32.mask, r64.mask)
    if same and "bits" not in kw:
        torch.testing.assert_close(r32.weight.double(), r64.weight, rtol=1e-3, atol=1e-3)


def test_result_keeps_the_weight_dtype():
    W, X, H = _problem(8)
    r = prune_layer(W.float(), H, 0.5, dtype=F64)
    assert r.weight.dtype == F32 and r.weight.shape == (ROWS, COLS)


# --- dead inputs and singular Hessians ------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["unstructured", "2:4", "block4", "q3-sym", "q4-asym-g8", "2:4+q3"]
)
@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_dead_inputs(name, damp):
    kw = CASES[name]
    W, X, _ = _problem(9)
    dead = [3, 9, 14]
    X[:, dead] = 0
    H = hessian_from_inputs(X)
    r = compress_layer(W, H, damp=damp, dtype=F64, **kw)
    assert torch.isfinite(r.weight).all() and r.fallback is None
    assert (r.weight[:, dead] == 0).all()
    assert torch.isfinite(torch.tensor(r.loss))
    Hd = H + r.damping * torch.eye(COLS, dtype=F64)
    Wlive = W.clone()
    Wlive[:, dead] = 0  # dead weights never reach the output: their change costs nothing
    assert r.loss == pytest.approx(layer_loss(Wlive, r.weight, Hd), rel=1e-9)
    if damp == 0.0:
        assert r.loss == pytest.approx(measured_loss(W, r.weight, X), rel=1e-9)


def _singular_problem(dtype=F64):
    X = singular_inputs(COLS, TOKENS, seed=10).to(dtype)
    W = make_problem(10, ROWS, COLS, dtype=dtype)[0]
    return W, X, hessian_from_inputs(X)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_singular_hessian_raise(dtype):
    W, X, H = _singular_problem(dtype)
    with pytest.raises(ValueError, match=r"(?i)hessian|\bH\b.*positive definite"):
        prune_layer(W, H, 0.5, damp=0.0, dtype=dtype, on_singular="raise")


@pytest.mark.parametrize("policy,word", [("damp", "damp"), ("eig", "eig")])
@pytest.mark.parametrize("name", ["unstructured", "2:4", "q3-sym", "2:4+q3"])
def test_singular_hessian_fallbacks_succeed_and_are_recorded(policy, word, name):
    kw = CASES[name]
    W, X, H = _singular_problem()
    r = compress_layer(W, H, damp=0.0, dtype=F64, on_singular=policy, **kw)
    assert r.fallback is not None and word in r.fallback
    assert torch.isfinite(r.weight).all() and r.loss >= 0
    _check_structure(r, kw)
    if policy == "damp":
        assert r.damping > 0
        Hd = H + r.damping * torch.eye(COLS, dtype=F64)
        assert r.loss == pytest.approx(layer_loss(W, r.weight, Hd), rel=1e-6)


# --- bad input ----------------------------------------------------------------------------------


def _bad(W=None, H=None):
    W0, _, H0 = make_problem(11, 4, 8)
    return (W0 if W is None else W), (H0 if H is None else H)


def _with(T, idx, value):
    T = T.clone()
    T[idx] = value
    return T


W8, H8 = _bad()
BAD = [
    # (call, args, kwargs, match)
    (prune_layer, (_with(W8, (1, 2), float("nan")), H8, 0.5), {}, r"\bW\b.*NaN"),
    (prune_layer, (_with(W8, (0, 0), float("inf")), H8, 0.5), {}, r"\bW\b.*Inf"),
    (prune_layer, (W8, _with(H8, (2, 2), float("nan")), 0.5), {}, r"\bH\b.*NaN"),
    (quantize_layer, (W8, _with(H8, (0, 1), float("-inf")), 4), {}, r"\bH\b.*Inf"),
    (prune_layer, (W8[0], H8, 0.5), {}, r"\bW\b.*2-D"),
    (quantize_layer, (W8[0], H8, 4), {}, r"\bW\b.*2-D"),
    (prune_layer, (W8, H8[:, :7], 0.5), {}, r"\bH\b.*square"),
    (prune_layer, (W8, H8[0], 0.5), {}, r"\bH\b.*square"),
    (prune_layer, (W8, torch.eye(6, dtype=F64), 0.5), {}, r"\bH\b.*columns"),
    (prune_layer, (W8, H8, -0.1), {}, "sparsity"),
    (prune_layer, (W8, H8, 1.0), {}, "sparsity"),
    (prune_layer, (W8, H8, 1.5), {}, "sparsity"),
    (prune_layer, (W8, H8, float("nan")), {}, "sparsity"),
    (prune_layer, (W8, H8), {}, "sparsity"),
    (prune_layer, (W8, H8, 0.3), {"pattern": "2:4"}, "sparsity"),
    (prune_layer, (W8, H8), {"pattern": "block2"}, "sparsity"),
    (prune_layer, (W8, H8), {"pattern": "4:4"}, r"pattern.*\bN\b.*\bM\b"),
    (prune_layer, (W8, H8), {"pattern": "5:4"}, r"pattern.*\bN\b.*\bM\b"),
    (prune_layer, (W8, H8), {"pattern": "3:5"}, r"M=5"),
    (prune_layer, (W8, H8, 0.5), {"pattern": "block3"}, "block size 3"),
    (prune_layer, (W8, H8, 0.5), {"pattern": "diagonal"}, "pattern"),
    (prune_layer, (W8, H8, 0.5), {"method": "magic"}, "method"),
    (quantize_layer, (W8, H8, 0), {}, "bits"),
    (quantize_layer, (W8, H8, -1), {}, "bits"),
    (quantize_layer, (W8, H8, 2.5), {}, "bits"),
    (quantize_layer, (W8, H8, None), {}, "bits"),
    (compress_layer, (W8, H8, 0.5), {"bits": 0}, "bits"),
    (quantize_layer, (W8, H8, 4), {"group_size": 3}, "group_size"),
    (quantize_layer, (W8, H8, 4), {"group_size": 0}, "group_size"),
    (compress_layer, (W8, H8), {"pattern": "2:4", "bits": 4, "group_size": 5}, "group_size"),
    (quantize_layer, (W8, H8, 4), {"method": "magic"}, "method"),
    (quantize_layer, (W8, H8, 4), {"sym": "yes"}, "sym"),
    (prune_layer, (W8, H8, 0.5), {"damp": -0.01}, "damp"),
    (prune_layer, (W8, H8, 0.5), {"dtype": torch.float16}, "dtype"),
    (prune_layer, (W8, H8, 0.5), {"on_singular": "ignore"}, "on_singular"),
    (prune_layer, (W8, _with(H8, (0, 5), 3.0), 0.5), {}, r"\bH\b.*symmetric"),
    (prune_layer, (W8.to(torch.int64), H8, 0.5), {}, r"\bW\b.*floating"),
    (compress_layer, (W8, H8), {}, "sparsity"),
    (prune_layer, (W8, H8, 0.5), {"lazzy": 4}, "lazzy"),
    (prune_layer, (W8, H8, 0.5), {"slak": 1}, r"\['slak'\] \(did you mean 'slack'\?\)"),
    (prune_layer, (W8, H8, 0.5), {"lazy": 0}, "lazy"),
    (prune_layer, (W8, H8, 0.5), {"max_sparsity": 1.5}, "max_sparsity"),
    # every option of obc is checked before any work, on every path (N:M, no grid, pruning)
    (prune_layer, (W8, H8), {"pattern": "2:4", "max_sparsity": 5}, "max_sparsity"),
    (prune_layer, (W8, H8, 0.5), {"slack": "x"}, "slack"),
    (quantize_layer, (W8, H8, 4), {"slack": float("nan")}, "slack"),
    (prune_layer, (W8, H8, 0.5), {"refit_scales": "yes"}, "refit_scales"),
    (prune_layer, (W8, H8, 0.5), {"per_row": "no"}, "per_row"),
    (quantize_layer, (W8, H8, 4), {"outliers": "false"}, "outliers"),
    (quantize_layer, (W8, H8, 4), {"kernel": "cuda-only"}, "obc.*kernel"),
    # bits / group_size: inf and NaN are a ValueError naming the setting, not an OverflowError
    (quantize_layer, (W8, H8, float("inf")), {}, "bits"),
    (quantize_layer, (W8, H8, float("nan")), {}, "bits"),
    (quantize_layer, (W8, H8, 4), {"group_size": float("inf")}, "group_size"),
    # a symmetric 1-bit grid has the levels {-scale, 0} only: every weight would collapse
    (quantize_layer, (W8, H8, 1), {}, r"bits=1 needs sym: false"),
    (quantize_layer, (W8, H8, 1), {"method": "rtn"}, r"bits=1 needs sym: false"),
    (compress_layer, (W8, H8, 0.0), {"pattern": "block2", "bits": 4}, "sparsity > 0"),
    (prune_layer, (W8, H8, 0.5), {"method": "magnitude", "scope": "column"}, "scope"),
    (prune_layer, (W8, H8, 0.5), {"method": "wanda", "search": 1}, "search"),
    (prune_layer, (W8, H8, 0.5), {"method": "sparsegpt", "static_groups": "no"}, "static"),
]


@pytest.mark.parametrize(
    "call,args,kwargs,match", BAD, ids=[f"{c.__name__}-{i}" for i, (c, *_r) in enumerate(BAD)]
)
def test_bad_input_raises_value_error_naming_the_argument(call, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        call(*args, **kwargs)
