"""Structured OBS over a tied group (optbrain.core.structured_group) against brute force and a
naive re-solve.

Tiny float64 problems, ``damp=0``: two or three layers sharing ``n`` channels, each with its
own correlated inputs (``obs_reference.make_problem``) and channel size. The naive reference
solves every layer's constrained least squares from scratch (``constrained_optimum``, one
solve per row) for every candidate set; it never uses the OBS update formulas.
"""

import itertools

import pytest
import torch
from obs_reference import constrained_optimum, make_problem

from optbrain.core.structured import structured_obs
from optbrain.core.structured_group import group_obs, solve_group

F64 = torch.float64
EXACT = {"damp": 0.0, "dtype": F64}
CASES = [(0, 5, (1, 2)), (1, 4, (2, 1, 1)), (2, 6, (1, 1)), (3, 5, (3, 2))]


def _group(seed, n, sizes):
    Ws, Hs = [], []
    for i, g in enumerate(sizes):
        W, _, H = make_problem(100 * seed + i, 2 + i, n * g)
        Ws.append(W)
        Hs.append(H)
    return Ws, Hs


def _naive(Ws, Hs, sizes, removed):
    """Σ_l of the from-scratch optimum with the columns of channels ``removed`` fixed to 0."""
    total, weights = 0.0, []
    for W, H, g in zip(Ws, Hs, sizes, strict=True):
        cols = [c * g + j for c in removed for j in range(g)]
        rows = [constrained_optimum(W[r], H, cols, [0.0] * len(cols)) for r in range(W.shape[0])]
        weights.append(torch.stack([x for x, _ in rows]))
        total += sum(loss for _, loss in rows)
    return total, weights


@pytest.mark.parametrize("seed,n,sizes", CASES)
def test_greedy_matches_naive_resolve_and_is_bounded_by_brute_force(seed, n, sizes):
    Ws, Hs = _group(seed, n, sizes)
    trace = group_obs(Ws, Hs, sizes, **EXACT)
    assert trace.order.numel() == n - 1
    removed = []
    for k in range(1, n):
        # naive greedy step: the channel whose removal (with the earlier ones) costs least
        cands = {c: _naive(Ws, Hs, sizes, removed + [c])[0] for c in range(n) if c not in removed}
        c = min(cands, key=cands.get)
        removed.append(c)
        assert int(trace.order[k - 1]) == c
        frac = k / n
        weights, keep, loss = trace.solve(frac)
        naive_loss, naive_w = _naive(Ws, Hs, sizes, removed)
        assert loss == pytest.approx(naive_loss, rel=1e-8, abs=1e-10)  # Σ step = Σ_l optimum
        for w, nw in zip(weights, naive_w, strict=True):
            torch.testing.assert_close(w, nw, rtol=1e-7, atol=1e-9)
        assert set((~keep).nonzero().flatten().tolist()) == set(removed)
        best = min(_naive(Ws, Hs, sizes, list(S))[0] for S in itertools.combinations(range(n), k))
        assert loss >= best - 1e-9  # greedy is not globally optimal, but never below it
    # the per-layer step losses add up to the summed one
    torch.testing.assert_close(trace.layer_loss.sum(1), trace.step_loss)


def test_one_layer_group_is_structured_obs():
    W, _, H = make_problem(7, 3, 12)
    a = group_obs([W], [H], [3], **EXACT)
    b = structured_obs(W, H, 3, **EXACT)
    assert a.order.tolist() == b.order.tolist()
    torch.testing.assert_close(a.step_loss, b.step_loss, rtol=1e-8, atol=1e-12)


def test_group_choice_differs_from_the_layers_alone():
    # diagonal H: channel 0 costs 1 + 1, channel 1 costs 3 + 0.5, channel 2 is expensive
    W1 = torch.tensor([[1.0, 3.0**0.5, 10.0]], dtype=F64)
    W2 = torch.tensor([[1.0, 0.5**0.5, 10.0]], dtype=F64)
    H = 2 * torch.eye(3, dtype=F64)  # ½ w² · 2 = w²
    trace = group_obs([W1, W2], [H, H], [1, 1], **EXACT, max_fraction=0.3)
    assert trace.order.tolist() == [0]
    assert float(trace.step_loss[0]) == pytest.approx(2.0)
    assert structured_obs(W2, H, 1, **EXACT).order[0] == 1  # layer 2 alone would take 1


@pytest.mark.parametrize("method", ["magnitude", "obd"])
def test_baselines_remove_the_least_summed_score(method):
    Ws, Hs = _group(5, 6, (2, 1))
    res = solve_group(Ws, Hs, (2, 1), 0.5, method, **EXACT)
    if method == "magnitude":
        score = sum(W.reshape(W.shape[0], 6, -1).pow(2).sum((0, 2)).sqrt() for W in Ws)
    else:
        score = sum(
            (0.5 * W**2 * torch.diagonal(H)).reshape(W.shape[0], 6, -1).sum((0, 2))
            for W, H in zip(Ws, Hs, strict=True)
        )
    expect = set(torch.topk(score, 3, largest=False).indices.tolist())
    assert set((~res.keep).nonzero().flatten().tolist()) == expect
    for W, w, g in zip(Ws, res.weights, (2, 1), strict=True):
        cols = res.keep.repeat_interleave(g)
        torch.testing.assert_close(w[:, cols], W[:, cols])  # no compensation
        assert not w[:, ~cols].any()
    naive, _ = _naive(Ws, Hs, (2, 1), sorted(expect))
    assert res.loss >= naive - 1e-9  # zeroing without update never beats the optimum


def test_obc_beats_baselines_and_predicted_equals_measured():
    Ws, Hs = _group(9, 8, (3, 1))
    obc = solve_group(Ws, Hs, (3, 1), 0.5, "obc", **EXACT)
    assert obc.loss == pytest.approx(sum(obc.layer_losses), rel=1e-8)
    for m in ("magnitude", "obd"):
        assert obc.loss <= solve_group(Ws, Hs, (3, 1), 0.5, m, **EXACT).loss + 1e-12


def test_bad_input_is_refused():
    W1, W2 = torch.randn(2, 6, dtype=F64), torch.randn(2, 4, dtype=F64)
    H6, H4 = torch.eye(6, dtype=F64), torch.eye(4, dtype=F64)
    with pytest.raises(ValueError, match="share one channel count"):
        group_obs([W1, W2], [H6, H4], [1, 1])
    with pytest.raises(ValueError, match="does not divide"):
        group_obs([W1], [H6], [4])
    with pytest.raises(ValueError, match="removes all"):
        solve_group([W1, W2], [H6, H4], [3, 2], 0.99)
    with pytest.raises(ValueError, match="structured method"):
        solve_group([W1], [H6], [1], 0.5, "gptq")
