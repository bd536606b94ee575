"""pipeline.cost: parameter and MAC counts, batches for timing, latency arguments."""

import statistics
import time

import pytest
import torch
from torch import nn

from optbrain.pipeline.cost import (
    batch_of,
    compare_costs,
    count_macs,
    count_params,
    latency_ms,
    model_costs,
    throughput_batch_for,
    time_pair,
)


def test_counts_are_exact():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))
    x = torch.randn(2, 3, 5, 5)
    assert count_params(model) == 3 * 4 * 9 + 4 + 100 * 6 + 6
    assert count_macs(model, x) == 2 * (25 * 4 * 27 + 100 * 6)


def test_batch_of_repeats_the_first_sample():
    b = batch_of({"input_ids": torch.arange(6).view(2, 3)}, 4)
    assert b["input_ids"].shape == (4, 3) and (b["input_ids"] == torch.arange(3)).all()
    assert batch_of((torch.ones(3, 2),), 5)[0].shape == (5, 2)


def test_throughput_batch_and_costs():
    assert throughput_batch_for(1e3) == 32 and throughput_batch_for(1e12) == 1
    assert throughput_batch_for(1e9) == 4
    model = nn.Linear(8, 8)
    c = model_costs(model, torch.randn(3, 8), repeats=3)
    assert c["params"] == 72 and c["macs"] == 64 and c["latency_b1_ms"] > 0
    assert "latency_b32_ms" in c
    with pytest.raises(ValueError, match="repeats"):
        latency_ms(model, torch.randn(1, 8), repeats=0)


def test_time_pair_measures_each_side():
    td, tc = time_pair(lambda: time.sleep(0.004), lambda: time.sleep(0.001), 5, 1)
    assert len(td) == len(tc) == 5
    speedup = statistics.median(td) / statistics.median(tc)
    assert 1.8 < speedup < 4.5


def test_compare_costs_times_both_alike():
    """A model doing 4× the work of another is timed slower, and the keys match model_costs."""
    small = nn.Sequential(nn.Linear(256, 256))
    big = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    x = torch.randn(8, 256)
    d, c = compare_costs(big, small, x, throughput_batch=4, repeats=9)
    assert set(d) == set(c) == set(model_costs(small, x, throughput_batch=4, repeats=3))
    assert d["macs"] == 4 * c["macs"] == 4 * 256 * 256
    assert d["latency_b4_ms"] > c["latency_b4_ms"]
    big.train()
    small.eval()
    compare_costs(big, small, x, repeats=1)
    assert big.training and not small.training
