"""Structured patterns through the one validator and the registry: channels / heads."""

from __future__ import annotations

import pytest
import torch

from optbrain.core.layer import compress_layer
from optbrain.core.patterns import parse_pattern
from optbrain.core.spec import make_spec


def _problem(rows: int = 6, cols: int = 12, n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64)
    X[:, 1] += 0.9 * X[:, 0]  # correlated inputs: compensation matters
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W, 2 * X.T @ X / n


def test_parse_channels_and_heads():
    assert parse_pattern("channels").structured
    assert str(parse_pattern("heads", head_dim=4)) == "heads4"
    assert parse_pattern("heads:8").head_dim == 8
    with pytest.raises(ValueError, match="head_dim applies"):
        parse_pattern("2:4", head_dim=4)


def test_spec_group_sizes():
    assert make_spec(12, 0.5, "channels").channel_size == 1
    assert make_spec(12, 0.5, "channels", kernel_positions=3).channel_size == 3
    assert make_spec(12, 0.5, "heads", head_dim=4).channel_size == 4


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"pattern": "heads", "head_dim": 5}, "does not divide"),
        ({"pattern": "heads"}, "needs the head size"),
        ({"pattern": "channels", "sparsity": 0.99}, "removes all 12 channels"),
        ({"pattern": "channels", "layer_groups": 4}, "grouped convolution"),
        ({"pattern": "heads", "head_dim": 4, "kernel_positions": 3}, "not to a convolution"),
        ({"pattern": "channels", "bits": 4}, "prunes only"),
    ],
)
def test_spec_errors(kw, match):
    kw = {"sparsity": 0.5, **kw}
    with pytest.raises(ValueError, match=match):
        make_spec(12, **kw)


def test_channels_needs_sparsity():
    with pytest.raises(ValueError, match="needs a sparsity"):
        make_spec(12, None, "channels")


@pytest.mark.parametrize("method", ["obc", "magnitude", "obd"])
def test_registry_removes_whole_columns(method):
    W, H = _problem()
    res = compress_layer(W, H, 0.5, "channels", method=method, kernel_positions=2)
    kept_cols = res.mask.all(0)
    assert torch.equal(res.mask, kept_cols.expand_as(res.mask))  # whole columns
    assert int((~kept_cols).sum()) == 6  # 3 of 6 channels of 2 columns
    assert torch.equal(kept_cols.view(6, 2)[:, 0], kept_cols.view(6, 2)[:, 1])
    assert (res.weight[:, ~kept_cols] == 0).all()
    assert res.sparsity == pytest.approx(0.5)


def test_obc_beats_baselines_on_heads():
    W, H = _problem(cols=16)
    losses = {
        m: compress_layer(W, H, 0.5, "heads", method=m, head_dim=4).info["measured_loss"]
        for m in ("obc", "magnitude", "obd")
    }
    assert losses["obc"] < losses["magnitude"] and losses["obc"] < losses["obd"]


@pytest.mark.parametrize("method", ["gptq", "sparsegpt", "rtn"])
def test_other_methods_reject_structured(method):
    W, H = _problem()
    with pytest.raises(ValueError, match="whole channels"):
        compress_layer(W, H, 0.5, "channels", method=method)


def test_auto_runs_structured_obs():
    W, H = _problem()
    auto = compress_layer(W, H, 0.5, "channels", method="auto")
    obc = compress_layer(W, H, 0.5, "channels", method="obc")
    assert auto.info["auto"]["solver"] == "obc"
    torch.testing.assert_close(auto.weight, obc.weight, rtol=0, atol=0)
