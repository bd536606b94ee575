"""GPTQ (method="gptq") against round-to-nearest, a naive float64 re-derivation, its own loss.

Loss ordering (measured, not proved — all three are greedy or heuristic): on 16×32 layers with
X = Gaussian · random mixing matrix (N = 256), over 200 seeds (100..299):

    GPTQ/RTN  max 0.83 (3- and 4-bit), mean 0.60        OBC/RTN  max 0.65, mean 0.48
    OBC/GPTQ  3-bit max 0.97, mean 0.77; 4-bit max 1.09, mean 0.82

so OBC ≤ GPTQ is asserted on every seed at 3 bits, and at 4 bits only on average (with a
per-seed bound of 1.15): it failed on some of the 200 seeds.
"""

import pytest
import torch
from fast_reference import F64, damped, make_problem, naive_columns, round_to

from optbrain import compress_layer, prune_layer, quantize_layer
from optbrain.core.grid import fit_grid
from optbrain.core.hessian import layer_loss, prepare_hessian

QUANT_CASES = [
    {"bits": 4},
    {"bits": 3, "sym": False},
    {"bits": 3, "group_size": 8},
    {"bits": 2, "group_size": 8, "sym": False},
    {"bits": 3, "group_size": 8, "static_groups": True},
    {"bits": 3, "group_size": 8, "act_order": True},
    {"bits": 4, "group_size": 8, "act_order": True, "static_groups": True},
    {"bits": 4, "act_order": True, "sym": False},
]


@pytest.mark.parametrize("kw", QUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_identity_hessian_is_round_to_nearest(kw, dtype):
    """With H = c·I nothing couples the columns: GPTQ == RTN exactly, on the same grid."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 32, generator=g) * torch.rand(1, 32, generator=g) * 3
    H = 3.0 * torch.eye(32)
    r = quantize_layer(W, H, method="gptq", dtype=dtype, **kw)
    rtn_kw = {k: v for k, v in kw.items() if k not in ("static_groups", "act_order")}
    ref = quantize_layer(W, H, method="rtn", dtype=dtype, **rtn_kw)
    assert torch.equal(r.weight, ref.weight)
    assert torch.equal(r.grid.scale, ref.grid.scale)
    assert torch.equal(r.grid.zero, ref.grid.zero)
    assert r.loss == pytest.approx(ref.loss, rel=1e-6)


@pytest.mark.parametrize("kw", QUANT_CASES)
def test_block_size_does_not_change_the_result(kw):
    W, H, _ = make_problem(3, rows=8, cols=48)
    outs = [
        quantize_layer(W, H, method="gptq", dtype=F64, block_size=b, **kw) for b in (1, 5, 16, 128)
    ]
    for o in outs[1:]:
        torch.testing.assert_close(o.weight, outs[0].weight, atol=1e-10, rtol=0)
        assert o.loss == pytest.approx(outs[0].loss, rel=1e-12)


@pytest.mark.parametrize("kw", [{"bits": 3}, {"bits": 4, "sym": False}, {"bits": 2}])
@pytest.mark.parametrize("act_order", [False, True])
def test_equals_naive_column_order_obs(kw, act_order):
    """Independent float64 re-derivation with explicit inverses of the trailing H blocks."""
    W, H, _ = make_problem(5, rows=6, cols=20)
    r = quantize_layer(W, H, method="gptq", dtype=F64, act_order=act_order, block_size=7, **kw)
    Hd = damped(H)
    order = list(range(20))
    if act_order:
        order = torch.argsort(torch.diagonal(Hd), descending=True, stable=True).tolist()
    scale, zero = r.grid.columns(20)
    w, loss = naive_columns(
        W, Hd, order, lambda w, t, p: round_to(w[:, p], scale[:, p], zero[:, p], r.grid.maxq)
    )
    torch.testing.assert_close(r.weight, w, atol=1e-9, rtol=0)
    torch.testing.assert_close(r.row_loss, loss, atol=1e-9, rtol=1e-9)
    # the grid without groups is fitted on the original weights, as OBQ does
    ref = fit_grid(W, kw["bits"], sym=kw.get("sym", True), weight=torch.diagonal(Hd))
    torch.testing.assert_close(r.grid.scale, ref.scale)


@pytest.mark.parametrize("kw", QUANT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_on_grid_and_predicted_equals_measured(kw, dtype):
    W, H, _ = make_problem(7, rows=16, cols=64)
    W, H = W.to(dtype), H.to(dtype)  # the result comes back in W's dtype
    r = quantize_layer(W, H, method="gptq", dtype=dtype, block_size=16, **kw)
    assert r.method == "gptq" and r.mask is None and r.bits == kw["bits"]
    assert r.weight.dtype == W.dtype and r.weight.shape == W.shape
    assert r.grid.on_grid(r.weight)
    assert r.grid.group_size == kw.get("group_size")
    prep = prepare_hessian(H, 0.01, dtype=dtype)
    measured = layer_loss(W, r.weight, prep.H)
    rel = 1e-4 if dtype == torch.float32 else 1e-10
    assert r.loss == pytest.approx(measured, rel=rel)
    assert float(r.row_loss.sum()) == pytest.approx(r.loss, rel=1e-12)
    assert r.damping == pytest.approx(0.01 * float(torch.diagonal(H).double().mean()), rel=1e-5)


def test_act_order_groups_grid_describes_every_column():
    """act_order with lazily fitted groups: group g's grid is fitted when its first column in
    act order is reached; every column is then rounded on its own group's grid."""
    W, H, _ = make_problem(11, rows=8, cols=32)
    H[:, :16] *= 4  # make act order interleave the groups
    H[:16, :] *= 4
    r = quantize_layer(W, H, 3, group_size=8, method="gptq", dtype=F64, act_order=True)
    assert r.grid.scale.shape == (8, 4)
    assert r.grid.on_grid(r.weight)
    plain = quantize_layer(W, H, 3, group_size=8, method="gptq", dtype=F64)
    assert not torch.allclose(r.weight, plain.weight)


def test_dead_inputs_and_dtype_follow_w():
    W, H, _ = make_problem(2, rows=8, cols=16)
    H[3, :] = 0
    H[:, 3] = 0
    r = quantize_layer(W, H, 4, method="gptq", dtype=F64)
    assert bool((r.weight[:, 3] == 0).all())
    prep = prepare_hessian(H, 0.01, dtype=F64)
    Wc = W.clone()
    Wc[:, 3] = 0
    assert r.loss == pytest.approx(layer_loss(Wc, r.weight, prep.H), rel=1e-10)
    assert r.damping > 0 and r.fallback is None
    r32 = quantize_layer(W, H, 4, method="gptq")  # W float64, computed in float32
    assert r32.weight.dtype == F64


@pytest.mark.parametrize("bits", [3, 4])
def test_loss_order_obc_gptq_rtn(bits):
    ratios = []
    for seed in range(20):
        W, H, _ = make_problem(100 + seed)
        W, H = W.float(), H.float()
        gptq = quantize_layer(W, H, bits, method="gptq").loss
        rtn = quantize_layer(W, H, bits, method="rtn").loss
        obc = quantize_layer(W, H, bits, method="obc").loss
        assert gptq < 0.9 * rtn, (seed, gptq, rtn)
        assert obc < 0.7 * rtn, (seed, obc, rtn)
        assert obc < (1.0 if bits == 3 else 1.15) * gptq, (seed, obc, gptq)
        ratios.append(obc / gptq)
    assert sum(ratios) / len(ratios) < 0.9


@pytest.mark.parametrize(
    "call",
    [
        lambda W, H: prune_layer(W, H, 0.5, method="gptq"),
        lambda W, H: prune_layer(W, H, pattern="2:4", method="gptq"),
        lambda W, H: compress_layer(W, H, 0.5, bits=4, method="gptq"),
        lambda W, H: compress_layer(W, H, pattern="block4", sparsity=0.5, bits=4, method="gptq"),
        lambda W, H: quantize_layer(W, H, 4, method="gptq", blocksize=64),
        lambda W, H: quantize_layer(W, H, 4, method="gptq", act_order="yes"),
        lambda W, H: quantize_layer(W, H, 4, method="gptq", block_size=0),
    ],
)
def test_invalid_requests_name_the_method(call):
    W, H, _ = make_problem(0, rows=4, cols=8)
    with pytest.raises(ValueError, match="gptq"):
        call(W, H)
