"""core.ticks: nested parts compose, the engines tick monotonically to 1, results unchanged."""

import pytest
import torch

from optbrain.core import ticks
from optbrain.core.layer import compress_layer


def test_parts_nest_and_rescale():
    seen = []
    with ticks.listen(seen.append):
        ticks.tick(0.5)
        with ticks.part(0.5, 1.0):
            with ticks.part(0.0, 0.5):
                ticks.tick(0.5)
            ticks.tick(2.0)  # clamped
    assert seen[0] == 0.5
    assert seen[1] == pytest.approx(0.625)
    assert seen[2] == pytest.approx(0.75)  # the end of the inner part is ticked
    assert seen[-1] == 1.0


def test_no_listener_is_silent_and_chunks_enumerate():
    ticks.tick(0.3)  # nothing installed: no error, nothing to see
    seen = []
    with ticks.listen(seen.append):
        got = [i for i, _ in ticks.chunks(["a", "b", "c", "d"])]
    assert got == [0, 1, 2, 3]
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cubic_done():
    assert ticks.cubic_done(0, 10, 10) == 0.0
    assert ticks.cubic_done(10, 10, 10) == 1.0
    # the first half of a full trace is 7/8 of its work
    assert ticks.cubic_done(5, 10, 10) == pytest.approx(7 / 8)
    assert ticks.cubic_done(3, 5, 10) == pytest.approx((1000 - 343) / (1000 - 125))


@pytest.mark.parametrize(
    "kw",
    [
        dict(sparsity=0.5),
        dict(sparsity=0.5, pattern="block4"),
        dict(pattern="2:4"),
        dict(bits=4),
        dict(sparsity=0.5, bits=4),
    ],
    ids=["unstructured", "block", "nm", "obq", "compound"],
)
def test_engines_tick_monotone_to_one_and_results_unchanged(kw):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 32, generator=g, dtype=torch.float64)
    X = torch.randn(32, 64, generator=g, dtype=torch.float64)
    H = 2 * X @ X.T / 64
    opts = dict(lazy=4, memory=12 * 32 * 32 * 8)  # several folds, two row chunks
    plain = compress_layer(W, H, method="obc", **opts, **kw)
    seen: list[float] = []
    with ticks.listen(seen.append):
        ticked = compress_layer(W, H, method="obc", **opts, **kw)
    assert torch.equal(plain.weight, ticked.weight)
    assert len(seen) >= 4
    assert all(b >= a - 1e-12 for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1] == pytest.approx(1.0)
    assert 0.0 <= seen[0] < 1.0
