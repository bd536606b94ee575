"""The per-row guarantee of method "obc" (core.methods.guard) on a fixed set of ill-conditioned
layers: no row above GPTQ's / SparseGPT's on the same H and grid settings.

The layers: 32×64, inputs with an axis-aligned eigenvalue spread of 10⁻² (independent columns,
variances log-spaced from 1 to 10⁻², shuffled) and only 32 tokens (H rank deficient, its null
space held by the damping). There plain greedy OBQ loses to GPTQ on many rows.
"""

from types import SimpleNamespace

import pytest
import torch
from obs_reference import constrained_optimum, grid_columns, make_problem, round_to_grid

from optbrain import compress_layer, quantize_layer
from optbrain.core.hessian import prepare_hessian, prepare_layer, row_losses
from optbrain.core.methods.guard import guard
from optbrain.core.methods.obc import solve_obc_levels
from optbrain.core.patterns import nm_ok
from optbrain.core.spec import make_spec

F64 = torch.float64
SEEDS = range(4)


def ill_conditioned(seed, rows=32, cols=64, tokens=32, spread=1e-2):
    g = torch.Generator().manual_seed(seed)
    var = torch.logspace(0, float(torch.log10(torch.tensor(spread))), cols, dtype=F64)
    X = (
        torch.randn(tokens, cols, generator=g, dtype=F64)
        * var.sqrt()[torch.randperm(cols, generator=g)]
    )
    W = torch.randn(rows, cols, generator=g, dtype=F64)
    return W.float(), (2 * X.T @ X / tokens).float()


def _rows(W, H, r):
    return row_losses(W, r.weight, prepare_hessian(H, 0.01).H)


ROWWISE = [  # same count of pruned weights in every row: the guarantee is row by row
    ({"bits": 3}, "gptq"),
    ({"bits": 4}, "gptq"),
    ({"bits": 3, "group_size": 16}, "gptq"),
    ({"pattern": "2:4"}, "sparsegpt"),
    ({"pattern": "2:4", "bits": 4}, "sparsegpt"),
    ({"sparsity": 0.5, "per_row": True}, "sparsegpt"),
]


@pytest.mark.parametrize("kw,ref", ROWWISE)
def test_no_row_above_the_fast_solver(kw, ref):
    plain_loses = 0
    for seed in SEEDS:
        W, H = ill_conditioned(seed)
        fast_kw = {k: v for k, v in kw.items() if k != "per_row"}
        if "per_row" in kw:
            fast_kw["scope"] = "row"
        fast = compress_layer(W, H, method=ref, **fast_kw)
        exact = compress_layer(W, H, guard=False, **kw)
        plain = compress_layer(W, H, guard=False, slack=0.0, **kw)  # plain greedy OBQ
        r = compress_layer(W, H, **kw)
        fr, er, rr = _rows(W, H, fast), _rows(W, H, exact), _rows(W, H, r)
        pr = _rows(W, H, plain)
        assert bool((rr <= fr * (1 + 1e-5) + 1e-7).all()), (seed, float((rr - fr).max()))
        assert bool((rr <= er * (1 + 1e-5) + 1e-7).all())
        if ref == "gptq":  # and act order
            act = compress_layer(W, H, method="gptq", act_order=True, **fast_kw)
            assert bool((rr <= _rows(W, H, act) * (1 + 1e-5) + 1e-7).all())
        assert r.info["guard"]["reference"] == ref and r.info["guard"]["layout"] == "rows"
        assert r.info["guard"]["rows_from_reference"] == int((rr < er * (1 - 1e-6)).sum())
        assert r.loss == pytest.approx(float(rr.sum()), rel=1e-4)  # predicted == measured
        assert r.info["measured_loss"] == pytest.approx(float(rr.sum()), rel=1e-4)
        if r.grid is not None:
            assert r.grid.on_grid(r.weight)
        if "pattern" in kw:
            assert nm_ok(r.mask, 2, 4)
        plain_loses += int((fr < pr * (1 - 1e-6)).sum())
    if "bits" in kw and "pattern" not in kw:
        assert plain_loses > 0  # the set really holds rows where plain greedy OBQ loses


@pytest.mark.parametrize(
    "kw", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"sparsity": 0.5, "pattern": "block4"}]
)
def test_layerwide_pruning_never_above_sparsegpt(kw):
    for seed in SEEDS:
        W, H = ill_conditioned(seed)
        fast = compress_layer(W, H, method="sparsegpt", **kw)
        r = compress_layer(W, H, **kw)
        plain = compress_layer(W, H, guard=False, **kw)
        assert r.info["guard"]["layout"] == "reference counts"
        rr = _rows(W, H, r)
        assert float(rr.sum()) <= min(fast.loss, plain.loss) * (1 + 1e-5)
        assert int((~r.mask).sum()) == int((~fast.mask).sum())  # the layer's count is kept
        if r.info["guard"]["rows_from_reference"]:  # at SparseGPT's counts: row by row
            assert torch.equal(r.mask.sum(1), fast.mask.sum(1))
            assert bool((rr <= _rows(W, H, fast) * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_reference_counts_candidate_matches_refitting_every_trace_row(sparsity):
    """guard() given a weak "exact" result (magnitude) and the real trace: it refits only the
    trace rows whose predicted loss beats the refit reference, and its rows equal the full
    candidate's (every trace row refitted at SparseGPT's counts, by hand here)."""
    from optbrain.core.trace import masked_optimum, obs_trace

    for seed in SEEDS:
        W, H = ill_conditioned(seed)
        spec = make_spec(W.shape[1], sparsity=sparsity)
        Wc, prep = prepare_layer(W, H, spec)
        trace = obs_trace(Wc, prep, spec.pattern)
        mag = compress_layer(W, H, sparsity, method="magnitude")
        fast = compress_layer(W, H, sparsity, method="sparsegpt")
        counts = (~fast.mask).sum(1)
        refit = row_losses(Wc, masked_optimum(Wc, prep.H, fast.mask, Hinv=prep.Hinv), prep.H)
        tw = masked_optimum(Wc, prep.H, trace.mask(counts), Hinv=prep.Hinv)
        full = torch.minimum(refit, row_losses(Wc, tw, prep.H))
        parts = [(x.weight, x.mask, None, row_losses(Wc, x.weight, prep.H)) for x in (mag, fast)]
        (weight, keep, _, rl), info = guard(Wc, prep, *parts, "sparsegpt", trace, False)
        assert info["layout"] == "reference counts" and info["rows_from_reference"] == 32
        torch.testing.assert_close(rl, full, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(rl, row_losses(Wc, weight, prep.H), rtol=1e-6, atol=1e-9)
        assert torch.equal(keep.sum(1), fast.mask.sum(1)) and bool((weight[~keep] == 0).all())
        assert bool((rl < refit * (1 - 1e-6)).any())  # some trace rows are refitted and taken


def test_reference_counts_skips_trace_refits_when_exact_wins(monkeypatch):
    """With the real exact result (it wins on these layers), the guard refits SparseGPT's mask
    once and no trace rows: their predicted losses cannot make the candidate win."""
    from optbrain.core.methods import guard as guard_mod
    from optbrain.core.trace import obs_trace

    calls = []
    real = guard_mod.masked_optimum
    monkeypatch.setattr(
        guard_mod, "masked_optimum", lambda W, *a, **k: calls.append(W.shape[0]) or real(W, *a, **k)
    )
    W, H = ill_conditioned(0)
    spec = make_spec(W.shape[1], sparsity=0.5)
    Wc, prep = prepare_layer(W, H, spec)
    trace = obs_trace(Wc, prep, spec.pattern)
    exact = compress_layer(W, H, 0.5, guard=False)
    fast = compress_layer(W, H, 0.5, method="sparsegpt")
    parts = [(x.weight, x.mask, None, row_losses(Wc, x.weight, prep.H)) for x in (exact, fast)]
    (weight, _, _, rl), info = guard(Wc, prep, *parts, "sparsegpt", trace, False)
    assert calls == [32]  # the refit of the reference mask only
    assert info["rows_from_reference"] == 0 and torch.equal(weight, exact.weight)


def test_reference_counts_candidate_is_row_by_row_below_sparsegpt():
    """guard() itself, given a weak "exact" result (magnitude, layer-wide: rows at other counts
    than SparseGPT's) and no trace: the candidate at SparseGPT's counts is SparseGPT's mask
    refitted exactly, every row ≤ SparseGPT's, and it is taken."""
    W, H = ill_conditioned(2)
    spec = make_spec(W.shape[1], sparsity=0.6)
    Wc, prep = prepare_layer(W, H, spec)
    mag = compress_layer(W, H, 0.6, method="magnitude")
    fast = compress_layer(W, H, 0.6, method="sparsegpt")
    assert not torch.equal(mag.mask.sum(1), fast.mask.sum(1))
    parts = [(x.weight, x.mask, None, row_losses(Wc, x.weight, prep.H)) for x in (mag, fast)]
    (weight, keep, _, rl), info = guard(Wc, prep, parts[0], parts[1], "sparsegpt", None, False)
    assert info["layout"] == "reference counts" and info["rows_from_reference"] == W.shape[0]
    assert torch.equal(keep, fast.mask) and bool((weight[~keep] == 0).all())
    assert torch.allclose(rl, row_losses(Wc, weight, prep.H))
    assert bool((rl <= parts[1][3] * (1 + 1e-6) + 1e-9).all())
    assert float(rl.sum()) < 0.99 * float(parts[1][3].sum())  # the exact refit gains


def test_guard_off_is_the_plain_greedy_and_compound_layer_fallback():
    W, H = ill_conditioned(1)
    off = compress_layer(W, H, bits=3, guard=False, slack=0.0, refit_scales=False)
    assert "guard" not in off.info
    on = compress_layer(W, H, bits=3, slack=0.0)
    assert on.loss < off.loss  # on this layer GPTQ wins some rows of plain greedy OBQ
    comp = compress_layer(W, H, 0.5, bits=4)
    fast = compress_layer(W, H, 0.5, bits=4, method="sparsegpt")
    assert comp.info["guard"]["layout"] in ("layer", "rows")
    assert float(_rows(W, H, comp).sum()) <= fast.loss * (1 + 1e-5)
    assert comp.grid.on_grid(comp.weight)
    with pytest.raises(ValueError, match="guard"):
        compress_layer(W, H, bits=3, guard="yes")


def _naive_slack_row(w, H, scale, zero, maxq, c):
    """Naive OBQ of one row with the slack rule: at every step, for every free coordinate p,
    score ``(e_p² − c·s_p²) / [H_FF⁻¹]_pp`` from scratch (outlier rule first); fix the best."""
    cols = w.shape[0]
    fixed = {}
    x, loss = constrained_optimum(w, H, [], [])
    for _ in range(cols):
        free = [i for i in range(cols) if i not in fixed]
        d = torch.diagonal(torch.linalg.inv(H[free][:, free]))
        q = {p: round_to_grid(float(x[p]), scale[p], zero[p], maxq) for p in free}
        err = {p: (q[p] - float(x[p])) ** 2 for p in free}
        out = [p for p in free if err[p] > 0.25 * scale[p] ** 2]
        if out:
            p = max(out, key=lambda i: err[i])
        else:
            p = min(free, key=lambda i: (err[i] - c * scale[i] ** 2) / float(d[free.index(i)]))
        fixed[p] = q[p]
        x, loss = constrained_optimum(w, H, list(fixed), list(fixed.values()))
    return x, loss


@pytest.mark.parametrize("bits,sym,group_size,seed", [(3, True, None, 0), (2, False, 4, 1)])
def test_slack_rule_equals_naive(bits, sym, group_size, seed):
    W, X, H = make_problem(seed, 3, 8)
    r = quantize_layer(
        W,
        H,
        bits,
        sym=sym,
        group_size=group_size,
        guard=False,
        refit_scales=False,
        damp=0.0,
        dtype=F64,
    )
    scale, zero = grid_columns(r.grid, 8)
    for row in range(3):
        x, loss = _naive_slack_row(
            W[row], H, scale[row].tolist(), zero[row].tolist(), r.grid.maxq, 0.25
        )
        torch.testing.assert_close(r.weight[row], x, atol=1e-8, rtol=1e-7)
        assert float(r.row_loss[row]) == pytest.approx(loss, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("bits", [3, 4])
def test_slack_rule_beats_plain_greedy_and_gptq_on_ill_conditioned_layers(bits):
    plain_total = gptq_total = slack_total = 0.0
    for seed in SEEDS:
        W, H = ill_conditioned(seed)
        plain_total += compress_layer(
            W, H, bits=bits, slack=0.0, guard=False, refit_scales=False
        ).loss
        slack_total += compress_layer(W, H, bits=bits, guard=False, refit_scales=False).loss
        gptq_total += compress_layer(W, H, bits=bits, method="gptq").loss
    assert plain_total > gptq_total  # the pathology
    assert slack_total < 0.7 * gptq_total, (slack_total, gptq_total, plain_total)


@pytest.mark.parametrize(
    "kw", [{"bits": 4}, {"bits": 3, "group_size": 16}, {"pattern": "2:4", "bits": 4}]
)
def test_scale_refit_lowers_the_loss_and_keeps_the_codes(kw):
    """``refit_scales=True``: the least-squares scales of the solved codes; never a row above
    the default (unrefitted) result, lower in total, predicted loss == measured; the budget
    levels (``solve_obc_levels(scale_refit=True)``) give the same weights."""
    total_on = total_off = 0.0
    for seed in SEEDS:
        W, H = ill_conditioned(seed)
        on = compress_layer(W, H, refit_scales=True, **kw)
        off = compress_layer(W, H, **kw)
        ron, roff = _rows(W, H, on), _rows(W, H, off)
        assert bool((ron <= roff * (1 + 1e-5) + 1e-7).all())
        assert on.info["scale_refit"]["loss_after"] <= on.info["scale_refit"]["loss_before"]
        assert "scale_refit" not in off.info
        assert on.loss == pytest.approx(float(ron.sum()), rel=1e-4)
        total_on, total_off = total_on + float(ron.sum()), total_off + float(roff.sum())
        if seed == SEEDS[0]:
            level = SimpleNamespace(sparsity=0.0, pattern=kw.get("pattern"), bits=kw["bits"])
            (lv,) = solve_obc_levels(
                W, H, [level], group_size=kw.get("group_size"), scale_refit=True
            )
            torch.testing.assert_close(lv[0], on.weight, rtol=1e-5, atol=1e-6)
    assert total_on < 0.995 * total_off, (total_on, total_off)
