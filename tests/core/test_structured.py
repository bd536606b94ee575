"""Structured OBS (optbrain.core.structured) against brute force, a naive re-solve and real layers.

Tiny problems are float64 with ``damp=0`` and correlated inputs (``obs_reference.make_problem``:
``X = Gaussian · random mixing``, ``N = 4 · cols`` tokens). The naive reference re-solves the
constrained least squares from scratch (``constrained_optimum``, one ``torch.linalg.solve`` per
row) for every candidate group at every step; it never uses the OBS update formulas.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from obs_reference import constrained_optimum, make_problem

from optbrain.adapters import adapter_for
from optbrain.core.hessian import hessian_from_inputs, layer_loss, prepare_hessian, row_losses
from optbrain.core.structured import (
    StructuredPattern,
    group_columns,
    parse_structured,
    removed_count,
    solve_structured,
    structured_group_size,
    structured_obs,
    structured_optimum,
)
from optbrain.core.trace import masked_optimum

F64 = torch.float64
EXACT = {"damp": 0.0, "dtype": F64}
TINY = [(0, 3, 6, 1), (1, 2, 8, 1), (2, 4, 8, 2), (3, 3, 6, 2), (4, 2, 8, 4)]


def _naive_loss(W, H, removed_cols):
    """Σ over rows of the from-scratch optimum with ``removed_cols`` fixed to 0; (Ŵ, loss)."""
    rows = [
        constrained_optimum(W[r], H, removed_cols, [0.0] * len(removed_cols))
        for r in range(W.shape[0])
    ]
    return torch.stack([x for x, _ in rows]), sum(loss for _, loss in rows)


def _cols(groups, g):
    return [c for b in groups for c in range(b * g, (b + 1) * g)]


def _naive_greedy(W, H, g, steps):
    """Greedy by exhaustive re-solve: order of removed groups, cumulative losses, states."""
    n = W.shape[1] // g
    removed, losses, states = [], [0.0], [W.clone()]
    for _ in range(steps):
        best = None
        for b in range(n):
            if b in removed:
                continue
            x, loss = _naive_loss(W, H, _cols(removed + [b], g))
            if best is None or loss < best[0]:
                best = (loss, b, x)
        removed.append(best[1])
        losses.append(best[0])
        states.append(best[2])
    return removed, losses, states


# --- brute force and the naive greedy ------------------------------------------------------


@pytest.mark.parametrize("seed,rows,cols,g", TINY)
def test_brute_force_optimum_is_the_closed_form_and_bounds_the_greedy(seed, rows, cols, g):
    W, X, H = make_problem(seed, rows, cols)
    n = cols // g
    trace = structured_obs(W, H, g, **EXACT)
    for k in range(1, n):
        best = None
        for S in itertools.combinations(range(n), k):
            x, loss = _naive_loss(W, H, _cols(list(S), g))
            if best is None or loss < best[0]:
                best = (loss, S, x)
        loss, S, x = best
        keep = torch.ones(n, dtype=torch.bool)
        keep[list(S)] = False
        kc = group_columns(keep, g)
        closed, rl = structured_optimum(W, H, kc)
        torch.testing.assert_close(closed, x, atol=1e-9, rtol=1e-9)
        assert float(rl.sum()) == pytest.approx(loss, rel=1e-9)
        per_row = masked_optimum(W, H, kc.expand(rows, cols).clone())
        torch.testing.assert_close(closed, per_row, atol=1e-9, rtol=1e-9)
        greedy = trace.loss(k / n)
        assert greedy >= loss * (1 - 1e-9)
        if k == 1:  # one removal: the greedy tries every group
            assert greedy == pytest.approx(loss, rel=1e-9)


@pytest.mark.parametrize("lazy", [1, 2, 3, 256])
@pytest.mark.parametrize("seed,rows,cols,g", TINY)
def test_greedy_equals_naive_resolve(seed, rows, cols, g, lazy):
    W, X, H = make_problem(seed, rows, cols)
    n = cols // g
    order, losses, states = _naive_greedy(W, H, g, n - 1)
    trace = structured_obs(W, H, g, lazy=lazy, **EXACT)
    assert trace.order.tolist() == order
    cum = torch.cumsum(trace.step_loss, 0)
    torch.testing.assert_close(cum, torch.tensor(losses[1:], dtype=F64), atol=1e-8, rtol=1e-8)
    for k in range(n):
        weight, keep, loss = trace.at(k / n)
        torch.testing.assert_close(weight, states[k], atol=1e-8, rtol=1e-8)
        assert set((~keep).nonzero().flatten().tolist()) == set(order[:k])
        assert loss == pytest.approx(losses[k], rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("seed,g", [(0, 1), (1, 1), (2, 3), (3, 4)])
def test_engine_knobs_do_not_change_the_result(seed, g):
    W, X, H = make_problem(seed, 8, 48, well_conditioned=True)
    ref = structured_obs(W, H, g, lazy=1, **EXACT)
    for lazy in (4, 7, 64):
        other = structured_obs(W, H, g, lazy=lazy, **EXACT)
        assert other.order.tolist() == ref.order.tolist()
        torch.testing.assert_close(other.step_loss, ref.step_loss, atol=1e-10, rtol=1e-9)


# --- predicted == measured; levels == separate runs ----------------------------------------


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
@pytest.mark.parametrize("g", [1, 4])
def test_predicted_loss_equals_measured(dtype, rel, g):
    W, X, H = make_problem(5, 12, 32, tokens=256)
    trace = structured_obs(W, H, g, dtype=dtype, damp=0.01)
    H_damped = trace.prepared.H
    for f in (0.125, 0.25, 0.5, 0.75):
        res = solve_structured(W, H, g, f, dtype=dtype, damp=0.01)
        measured = layer_loss(res.weight.double(), trace.W.double(), H_damped.double())
        assert res.loss == pytest.approx(measured, rel=rel)
        assert res.measured_loss == pytest.approx(measured, rel=1e-6)
        rl = row_losses(trace.W, res.weight, H_damped)
        torch.testing.assert_close(res.row_loss, rl, rtol=rel * 10, atol=1e-9)
        weight, keep, loss = trace.at(f)  # the level from the full trace == the separate run
        assert torch.equal(keep, res.keep)
        torch.testing.assert_close(weight, res.weight, rtol=1e-4, atol=1e-5)
        assert loss == pytest.approx(res.loss, rel=1e-9)


def test_undamped_loss_is_the_output_error_on_the_calibration_inputs():
    W, X, H = make_problem(6, 5, 12, tokens=96)
    res = solve_structured(W, H, 3, 0.5, **EXACT)
    err = ((W - res.weight) @ X.T).pow(2).sum() / X.shape[0]
    assert res.loss == pytest.approx(float(err), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("g", [1, 4])
def test_structured_obc_beats_magnitude_and_obd_at_every_level(seed, g):
    W, X, H = make_problem(seed, 16, 32, tokens=128)
    trace = structured_obs(W, H, g)
    n = 32 // g
    for k in range(1, n):
        f = k / n
        obc = trace.loss(f)
        for method in ("magnitude", "obd"):
            base = solve_structured(W, H, g, f, method)
            assert obc <= base.loss * (1 + 1e-5), (method, f)
            assert int((~base.keep).sum()) == k


def test_float32_and_float64_traces_agree():
    W, X, H = make_problem(7, 32, 64, tokens=512, well_conditioned=True)
    for g in (1, 4):
        t32 = structured_obs(W.float(), H.float(), g, dtype=torch.float32)
        t64 = structured_obs(W, H, g, dtype=F64)
        assert t32.order.tolist() == t64.order.tolist()
        c32, c64 = torch.cumsum(t32.step_loss, 0), torch.cumsum(t64.step_loss, 0)
        torch.testing.assert_close(c32, c64, rtol=1e-4, atol=1e-4 * float(c64[-1]))


def test_dead_inputs_are_removed_first_for_free():
    W, X, H = make_problem(8, 4, 8)
    X[:, [2, 5]] = 0
    H = 2 * X.T @ X / X.shape[0]
    trace = structured_obs(W, H, 1, **EXACT)
    assert set(trace.order[:2].tolist()) == {2, 5}
    assert float(trace.step_loss[:2].abs().max()) == 0.0


def test_baselines_zero_the_columns_without_update():
    W, X, H = make_problem(9, 6, 12)
    for method in ("magnitude", "obd"):
        res = solve_structured(W, H, 2, 0.5, method, **EXACT)
        kc = res.keep_columns
        assert torch.equal(res.weight[:, kc], W[:, kc])
        assert bool((res.weight[:, ~kc] == 0).all())
    mag = solve_structured(W, H, 2, 0.5, "magnitude", **EXACT)
    norms = W.reshape(6, 6, 2).pow(2).sum((0, 2))
    assert set((~mag.keep).nonzero().flatten().tolist()) == set(norms.argsort()[:3].tolist())
    obd = solve_structured(W, H, 2, 0.5, "obd", **EXACT)
    sal = (0.5 * W.pow(2) * torch.diagonal(H)).reshape(6, 6, 2).sum((0, 2))
    assert set((~obd.keep).nonzero().flatten().tolist()) == set(sal.argsort()[:3].tolist())


# --- real layers ---------------------------------------------------------------------------


def test_linear_input_features_removed():
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 7).double()
    x = torch.randn(200, 10, dtype=F64) @ torch.randn(10, 10, dtype=F64)
    H = hessian_from_inputs(x)
    res = solve_structured(lin.weight.detach(), H, 1, 0.4, **EXACT)
    kc = res.keep_columns
    assert int((~kc).sum()) == 4
    y_comp = F.linear(x, res.weight, lin.bias)
    y_small = F.linear(x[:, kc], res.weight[:, kc], lin.bias)  # the features really gone
    torch.testing.assert_close(y_small, y_comp, atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        err = (lin(x) - y_comp).pow(2).sum() / x.shape[0]
    assert res.loss == pytest.approx(float(err), rel=1e-8)


def test_conv2d_input_channels_removed():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1).double()
    x = torch.randn(8, 6, 7, 7, dtype=F64)
    x = x + 0.5 * x.roll(1, dims=1)  # correlated channels
    ad = adapter_for(conv)
    (X,) = ad.input_rows(x)
    W = ad.weight(0)
    g = structured_group_size(StructuredPattern("channels"), W.shape[1], 9)
    res = solve_structured(W, hessian_from_inputs(X), g, 0.5, **EXACT)
    kept = res.keep.nonzero().flatten()
    assert kept.numel() == 3
    w_hat = res.weight.reshape(conv.weight.shape)
    assert bool((w_hat[:, ~res.keep] == 0).all())  # group b = input channel b, all kh·kw
    y_small = F.conv2d(x[:, kept], w_hat[:, kept], conv.bias.detach(), padding=1)
    y_comp = F.conv2d(x, w_hat, conv.bias.detach(), padding=1)
    torch.testing.assert_close(y_small, y_comp, atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        y = conv(x)
    err = (y - y_small).pow(2).sum() / X.shape[0]  # per output position (token)
    assert res.loss == pytest.approx(float(err), rel=1e-8)


# --- patterns and bad input ----------------------------------------------------------------


def test_parse_structured_patterns():
    assert parse_structured("channels") == StructuredPattern("channels")
    assert parse_structured("heads") == StructuredPattern("heads")
    assert parse_structured("heads", head_dim=64) == StructuredPattern("heads", 64)
    assert (
        parse_structured("heads64")
        == parse_structured("heads:64")
        == StructuredPattern("heads", 64)
    )
    assert str(StructuredPattern("heads", 64)) == "heads64"
    for other in ("unstructured", "2:4", "block4", 3):
        assert parse_structured(other) is None
    assert structured_group_size(StructuredPattern("heads", 64), 768) == 64
    assert structured_group_size(StructuredPattern("channels"), 27, 9) == 9
    assert structured_group_size(StructuredPattern("channels"), 10) == 1


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: parse_structured("heads64", head_dim=32), "says head size 64"),
        (lambda: parse_structured("channels", head_dim=32), "heads' only"),
        (lambda: parse_structured("heads", head_dim=0), "positive integer"),
        (lambda: structured_group_size(StructuredPattern("heads"), 64), "needs the head size"),
        (lambda: structured_group_size(StructuredPattern("heads", 48), 64), "does not divide"),
        (lambda: removed_count(1.0, 4), r"in \[0, 1\)"),
        (lambda: removed_count(-0.1, 4), r"in \[0, 1\)"),
        (lambda: removed_count("x", 4), "must be a number"),
        (lambda: removed_count(0.9, 4), "removes all 4 groups"),
    ],
)
def test_pattern_and_fraction_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_solver_input():
    W, X, H = make_problem(0, 3, 8)
    with pytest.raises(ValueError, match="group_size=3 does not divide the 8 columns"):
        solve_structured(W, H, 3, 0.5)
    with pytest.raises(ValueError, match="group_size=3 does not divide the 8 columns"):
        structured_obs(W, H, 3)
    with pytest.raises(ValueError, match="removes all 4 groups"):
        solve_structured(W, H, 2, 0.9)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        solve_structured(W, H, 2, 1.0)
    with pytest.raises(ValueError, match="structured method must be one of"):
        solve_structured(W, H, 2, 0.5, "gptq")
    with pytest.raises(ValueError, match="max_fraction"):
        structured_obs(W, H, 1, max_fraction=0.0)
    with pytest.raises(ValueError, match="H has shape"):
        structured_obs(W, H[:4, :4], 1)
    trace = structured_obs(W, H, 1, max_fraction=0.25, **EXACT)
    assert trace.max_fraction == 0.25
    with pytest.raises(ValueError, match="beyond this trace"):
        trace.at(0.5)
    res = solve_structured(W, H, 2, 0.0, **EXACT)
    assert res.loss == 0.0 and bool(res.keep.all())
    torch.testing.assert_close(res.weight, W)


def test_prepared_hessian_is_not_modified():
    W, X, H = make_problem(1, 4, 16)
    trace = structured_obs(W, H, 1, lazy=2, **EXACT)
    again = prepare_hessian(H, 0.0, dtype=F64)
    torch.testing.assert_close(trace.prepared.Hinv, again.Hinv, atol=0, rtol=0)


def test_layer_result_for_the_registry():
    W, X, H = make_problem(2, 3, 8)
    res = solve_structured(W, H, 2, 0.5, **EXACT)
    lr = res.to_layer_result("channels")
    assert lr.mask.shape == W.shape and torch.equal(lr.mask[0], res.keep_columns)
    assert bool((lr.mask == lr.mask[0]).all())
    assert lr.loss == res.loss and lr.info["group_size"] == 2
    assert torch.equal(lr.info["keep_groups"], res.keep)
