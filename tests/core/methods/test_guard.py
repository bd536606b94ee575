"""The per-row guarantee of method "obc" (core.methods.guard) on a fixed set of ill-conditioned
layers: no row above GPTQ's / SparseGPT's on the same H and grid settings.

The layers: 32×64, inputs with an axis-aligned eigenvalue spread of 10⁻² (independent columns,
variances log-spaced from 1 to 10⁻², shuffled) and only 32 tokens (H rank deficient, its null
space held by the damping). There plain greedy OBQ loses to GPTQ on many rows.
"""

import pytest
import torch

from optbrain import compress_layer
from optbrain.core.hessian import prepare_hessian, prepare_layer, row_losses
from optbrain.core.methods.guard import guard
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
        plain = compress_layer(W, H, guard=False, **kw)
        r = compress_layer(W, H, **kw)
        fr, pr, rr = _rows(W, H, fast), _rows(W, H, plain), _rows(W, H, r)
        assert bool((rr <= fr * (1 + 1e-5) + 1e-7).all()), (seed, float((rr - fr).max()))
        assert bool((rr <= pr * (1 + 1e-5) + 1e-7).all())
        assert r.info["guard"]["reference"] == ref and r.info["guard"]["layout"] == "rows"
        assert r.info["guard"]["rows_from_reference"] == int((rr < pr * (1 - 1e-6)).sum())
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
    off = compress_layer(W, H, bits=3, guard=False)
    assert "guard" not in off.info
    on = compress_layer(W, H, bits=3)
    assert on.loss < off.loss  # on this layer GPTQ wins some rows
    comp = compress_layer(W, H, 0.5, bits=4)
    fast = compress_layer(W, H, 0.5, bits=4, method="sparsegpt")
    assert comp.info["guard"]["layout"] in ("layer", "rows")
    assert float(_rows(W, H, comp).sum()) <= fast.loss * (1 + 1e-5)
    assert comp.grid.on_grid(comp.weight)
    with pytest.raises(ValueError, match="guard"):
        compress_layer(W, H, bits=3, guard="yes")
