"""budget.nonuniform: the DP's per-layer sparsities as recipe rules, at the overall budget."""

import pytest
import torch
from torch import nn

from optbrain import compress
from optbrain.budget import Level
from optbrain.budget.api import Allocation
from optbrain.budget.costs import parse_target
from optbrain.budget.nonuniform import (
    allocation_sparsities,
    dp_sparsities,
    sparsity_grid,
    with_sparsities,
)


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8)
    )
    g = torch.Generator().manual_seed(3)
    A = torch.randn(16, 16, generator=g)
    return model.eval(), [torch.randn(64, 16, generator=g) @ A for _ in range(2)]


def test_grid():
    assert sparsity_grid(0.5) == ["s0.3", "s0.4", "s0.5", "s0.6", "s0.7"]
    assert sparsity_grid(0.15) == ["s0.05", "s0.15", "s0.25", "s0.35"]
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
        sparsity_grid(1.0)


def test_dp_sparsities_meet_the_budget_and_run_as_a_recipe(tmp_path):
    model, data = _model_and_data()
    per = dp_sparsities(model, data, 0.5, db_dir=tmp_path / "db", model_level_samples=64)
    params = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(per) == set(params)
    assert all(Level(sparsity=s).id in sparsity_grid(0.5) for s in per.values())
    kept = sum(params[n] * (1 - s) for n, s in per.items())
    assert kept <= 0.5 * sum(params.values()) + 1  # the DP never exceeds the budget
    assert kept >= 0.45 * sum(params.values())  # and uses it
    recipe = with_sparsities(
        {"method": "sparsegpt", "sparsity": 0.5, "calibration": {"mode": "sequential"}}, per
    )
    report = compress(model, data, recipe, quiet=True)
    got = {r.name: r.sparsity for r in report.layers if r.status == "compressed"}
    for n, s in per.items():
        assert got[n] == pytest.approx(s, abs=1 / 48)
    assert report.recipe["calibration"]["mode"] == "sequential"


def test_allocation_sparsities_and_skips():
    alloc = Allocation(
        target=parse_target("params=0.5"),
        objective="relative",
        levels={"a": "s0.6", "b": "dense"},
        costs={},
        errors={},
        dense_cost=1,
        budget=1,
        cost=1,
        error=0.0,
    )
    assert allocation_sparsities(alloc) == {"a": 0.6, "b": 0.0}
    alloc.levels["c"] = "s0.5+b4"
    with pytest.raises(ValueError, match="layer c: level 's0.5\\+b4' is not an unstructured"):
        allocation_sparsities(alloc)
    r = with_sparsities({"sparsity": 0.5}, {"x.0": 0.3, "x.1": 0.0})
    assert r.rules[-2].to_dict()["sparsity"] == 0.3 and r.rules[-1].to_dict()["skip"] is True
