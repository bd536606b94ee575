"""Silent wrong results closed: huge weights solve in float64 (same mask as the unscaled layer),
float16 / integer inputs give a float32 H, results a float16 W cannot hold are refused,
sparsity < 1 never prunes everything, dead inputs are reported as pruned, overflowing
Hessians and non-tensor inputs are clear errors; the thread count's effect is bounded."""

from __future__ import annotations

import pytest
import torch

from optbrain.core.hessian import hessian_from_inputs, prepare_hessian
from optbrain.core.layer import prune_layer, quantize_layer
from optbrain.core.methods import safe_dtype
from optbrain.core.patterns import nm_ok, pruned_count


def _problem(rows: int = 8, cols: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, cols, generator=g) @ (
        torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)
    )
    return torch.randn(rows, cols, generator=g), hessian_from_inputs(X)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_huge_weights_are_solved_in_float64_with_the_unscaled_mask(pattern):
    """The OBS choice is invariant to scaling W; at |W| = 1e19 float32 overflowed (16% sparsity
    for 50%, masks not 2:4)."""
    W, H = _problem()
    sp = 0.5 if pattern == "unstructured" else None
    ref = prune_layer(W, H, sp, pattern, dtype=torch.float64)
    big = prune_layer(W * 1e19, H, sp, pattern)
    assert big.info["dtype"] == "float64"
    assert big.sparsity == 0.5
    assert torch.equal(big.mask, ref.mask)
    assert nm_ok(big.mask, 2, 4) or pattern == "unstructured"
    torch.testing.assert_close(
        big.weight.double() / 1e19, ref.weight.double(), rtol=1e-5, atol=1e-6
    )
    assert prune_layer(W, H, sp, pattern).info["dtype"] == "float32"  # normal layers unchanged


def test_beyond_float64_is_refused():
    W, H = _problem()
    with pytest.raises(ValueError, match="too large to solve even in float64"):
        safe_dtype(W.double() * 1e150, H, torch.float32)


def test_hessian_of_float16_and_integer_inputs():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g) * 300
    ref = 2 * X.double().T @ X.double() / 64
    H = hessian_from_inputs(X.half())
    assert H.dtype == torch.float32 and bool(torch.isfinite(H).all())  # was all Inf (float16)
    torch.testing.assert_close(
        H.double(), 2 * X.half().double().T @ X.half().double() / 64, rtol=1e-6, atol=1e-3
    )
    assert float((H.double() - ref).abs().max() / ref.abs().max()) < 1e-3
    Xi = torch.tensor([[1, 2], [3, 4], [5, 7]])
    Hi = hessian_from_inputs(Xi)
    assert Hi.dtype == torch.float32  # was int64, truncated: 2/3 · 35 = 23.33 → 23
    torch.testing.assert_close(Hi.double(), 2 * Xi.double().T @ Xi.double() / 3, rtol=1e-6, atol=0)
    assert hessian_from_inputs(X.double()).dtype == torch.float64
    assert hessian_from_inputs(torch.full((4, 2), 1e20)).dtype == torch.float64  # float32 overflows


def test_result_that_float16_cannot_hold_is_refused():
    """Two copies of one input: pruning one weight of 6e4 moves it onto the other (1.2e5),
    past float16's 65504; the layer API returned Inf weights."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, 1, generator=g)
    H = hessian_from_inputs(torch.cat([x, x + 1e-3 * torch.randn(128, 1, generator=g)], 1))
    W = torch.full((1, 2), 6.0e4, dtype=torch.float16)
    with pytest.raises(ValueError, match="beyond what W's dtype torch.float16 holds"):
        prune_layer(W, H, 0.5)
    ok = prune_layer(W.float(), H, 0.5)
    assert float(ok.weight.abs().max()) > 65504


@pytest.mark.parametrize("method", ["obc", "sparsegpt", "magnitude", "obd"])
def test_sparsity_below_one_keeps_a_weight(method):
    W, H = _problem(4, 8)
    res = prune_layer(W, H, 0.999, method=method)
    assert int(res.mask.sum()) == 1 and res.sparsity == 31 / 32  # was 0 kept
    assert (
        pruned_count(0.999, 32) == 31 and pruned_count(0.5, 32) == 16 and pruned_count(0.0, 5) == 0
    )


@pytest.mark.parametrize("method", ["obc", "sparsegpt", "magnitude"])
def test_dead_inputs_are_reported_as_pruned(method):
    """Inputs always zero: their weights are set to 0, and now the mask and sparsity say so
    (an all-zero layer reported sparsity 0.5 with every weight 0)."""
    W, _ = _problem(4, 8)
    res = prune_layer(W, hessian_from_inputs(torch.zeros(32, 8)), 0.5, method=method)
    assert bool((res.weight == 0).all()) and res.sparsity == 1.0
    assert res.info["dead_inputs"] == 8
    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 8, generator=g)
    X[:, 5] = 0
    part = prune_layer(W, hessian_from_inputs(X), 0.25, method=method)
    assert not bool(part.mask[:, 5].any()) and part.info["dead_inputs"] == 1
    assert part.sparsity == float((part.weight == 0).float().mean())
    q = quantize_layer(W, hessian_from_inputs(X), 4)
    assert q.info["dead_inputs"] == 1 and bool((q.weight[:, 5] == 0).all())


def test_huge_activations_are_solved_or_refused_clearly():
    """|x| = 1e30: H (1e60) is kept in float64 and the layer solves in float64; casting it to
    float32 is a clear error (was a raw LinAlgError)."""
    g = torch.Generator().manual_seed(4)
    H = hessian_from_inputs(torch.randn(64, 8, generator=g) * 1e30)
    assert H.dtype == torch.float64 and bool(torch.isfinite(H).all())
    W, _ = _problem(4, 8)
    res = prune_layer(W, H, 0.5)
    assert res.sparsity == 0.5 and res.info["dtype"] == "float64"
    with pytest.raises(ValueError, match="H overflows torch.float32"):
        prepare_hessian(H, dtype=torch.float32)


def test_non_tensor_weight_is_a_clear_error():
    _, H = _problem(4, 8)
    with pytest.raises(ValueError, match="W must be a torch.Tensor, got list"):
        prune_layer([[0.0] * 8] * 4, H, 0.5)
    with pytest.raises(ValueError, match="H must be a torch.Tensor, got list"):
        quantize_layer(torch.zeros(4, 8), H.tolist(), 4)


def test_thread_count_divergence_is_bounded():
    """Same thread count: identical results. 1 vs 2 threads: float32 reductions are summed in
    another order, so near-ties of the greedy choice may flip. Measured on this 64×128 layer
    (ExactOBS 50%): 0 of 8192 mask entries differ here, 0 of 131,072 at 256×512; the
    losses agree to 3e-8."""
    W, H = _problem(64, 128, seed=5)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = prune_layer(W, H, 0.5)
        a2 = prune_layer(W, H, 0.5)
        torch.set_num_threads(2)
        b = prune_layer(W, H, 0.5)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a.mask, a2.mask) and torch.equal(a.weight, a2.weight)
    differ = int((a.mask != b.mask).sum())
    assert differ <= 0.01 * a.mask.numel(), differ
    assert abs(a.loss - b.loss) <= 1e-6 * abs(a.loss)  # measured: 3.3e-8
