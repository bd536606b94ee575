"""``optbrain.io.packing``: the integer codes of every solver's quantized weights reproduce
them bit for bit; int4 / bitmask packing round-trips and has the documented byte layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optbrain.core.grid import fit_grid
from optbrain.core.layer import compress_layer
from optbrain.io import packing


def _problem(rows: int = 12, cols: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g)
    return W, 2 * X.T @ X / X.shape[0]


CASES = [
    ("gptq", {"bits": 4}),
    ("gptq", {"bits": 4, "group_size": 8}),
    ("gptq", {"bits": 3, "sym": False, "group_size": 16}),
    ("gptq", {"bits": 8}),
    ("gptq", {"bits": 4, "group_size": 8, "act_order": True}),
    ("rtn", {"bits": 4, "sym": False}),
    ("obc", {"bits": 4}),
    ("obc", {"bits": 4, "pattern": "2:4"}),
    ("sparsegpt", {"bits": 4, "sparsity": 0.5}),
]


@pytest.mark.parametrize(("method", "kw"), CASES)
def test_codes_reproduce_the_weight_bit_for_bit(method: str, kw: dict) -> None:
    W, H = _problem()
    res = compress_layer(W, H, method=method, **kw)
    c = packing.codes(res.weight, res.grid)
    assert c.dtype == torch.uint8
    assert int(c.min()) >= 0 and int(c.max()) <= 2**res.grid.bits - 1
    assert torch.equal(packing.dequantize(c, res.grid), res.weight)
    q = packing.signed(c, res.grid.bits)
    zp = packing.signed_zero(res.grid.zero, res.grid.bits)
    half = 2 ** (res.grid.bits - 1)
    assert int(q.min()) >= -half and int(q.max()) <= half - 1
    if res.grid.sym:
        assert not zp.any()  # symmetric grids: zero point 0 in the signed convention
    # the signed form is the same weight: scale · (q − zero_point)
    s, z = res.grid.columns(W.shape[1])
    zcols = zp.float()[:, torch.arange(W.shape[1]) // (res.grid.group_size or W.shape[1])]
    assert torch.equal(s * (q.float() - zcols), res.weight)
    if res.mask is not None:  # pruned weights are exactly the zero point
        assert torch.equal(c[~res.mask].int(), res.grid.columns(W.shape[1])[1][~res.mask].int())


def test_codes_refuse_a_weight_off_its_grid() -> None:
    W, H = _problem()
    res = compress_layer(W, H, method="gptq", bits=4)
    bad = res.weight.clone()
    bad[3, 5] += 1e-3
    with pytest.raises(packing.NotOnGridError, match="1 of 384 weights are not on their"):
        packing.codes(bad, res.grid)
    with pytest.raises(ValueError, match="expected \\(16, 1\\) for a 16x12"):
        packing.codes(res.weight[:, :16].T.contiguous(), res.grid)


def test_codes_within_rtol_for_a_narrower_weight_dtype() -> None:
    W, H = _problem()
    res = compress_layer(W, H, method="gptq", bits=4, group_size=8)
    w16 = res.weight.to(torch.bfloat16).float()  # what a bfloat16 module holds
    eps = float(torch.finfo(torch.bfloat16).eps)
    c = packing.codes(w16, res.grid, rtol=eps)
    assert torch.equal(c, packing.codes(res.weight, res.grid))


def test_grid_of_matches_fit_grid() -> None:
    W, _ = _problem()
    g = fit_grid(W, 4, group_size=8)
    g2 = packing.grid_of(g.scale, g.zero, 4, True, 8)
    assert torch.equal(g2.quantize(W), g.quantize(W))


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_int4_round_trip_and_layout(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    u = torch.randint(0, 16, (3, n), generator=g, dtype=torch.uint8)
    p = packing.pack_int4(u)
    assert p.dtype == torch.uint8 and p.shape == (3, (n + 1) // 2)
    assert torch.equal(packing.unpack_int4(p, n), u)
    s = u.to(torch.int32) - 8
    assert torch.equal(packing.unpack_int4(packing.pack_int4(s), n, signed=True), s.to(torch.int8))
    assert packing.packed_nbytes(3, n, 4) == p.numel()


def test_int4_layout_is_low_nibble_first() -> None:
    p = packing.pack_int4(torch.tensor([1, 2, -1, 3]))
    assert p.tolist() == [0x21, 0x3F]
    with pytest.raises(ValueError, match="in \\[-8, 15\\]"):
        packing.pack_int4(torch.tensor([16]))


@pytest.mark.parametrize("shape", [(5,), (3, 7), (4, 8), (2, 3, 3, 3)])
def test_bitmask_round_trip_matches_numpy(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape))
    mask = torch.rand(shape, generator=g) > 0.5
    p = packing.pack_bits(mask)
    assert p.numel() == -(-mask.numel() // 8)
    ref = np.packbits(mask.numpy().reshape(-1), bitorder="little")
    assert p.numpy().tolist() == ref.tolist()
    assert torch.equal(packing.unpack_bits(p, shape), mask)


def test_sparse_values_round_trip() -> None:
    W, H = _problem()
    res = compress_layer(W, H, method="sparsegpt", sparsity=0.5)
    bits, values = packing.sparse_values(res.weight, res.mask)
    assert values.numel() == int(res.mask.sum())
    assert torch.equal(packing.dense_from_sparse(bits, values, W.shape), res.weight)
    nbytes = bits.numel() + values.numel() * 4
    assert nbytes < 0.6 * W.numel() * 4  # 50 % kept: half the values plus 1/32 for the mask
