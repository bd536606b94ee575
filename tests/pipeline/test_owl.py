"""OWL allocation (pipeline.owl, recipe ``allocation: owl``): the equations on hand-made ratios,
the outlier block pruned less, the overall sparsity kept, bad settings refused before work."""

import pytest
import torch
from torch import nn

from optbrain import compress
from optbrain.pipeline.owl import (
    block_of,
    outlier_ratios,
    owl_offsets_from_ratios,
    owl_sparsities,
)
from optbrain.recipe import Recipe, RecipeError


def test_offsets_from_ratios_by_hand():
    # ρ = 2λ (D − min) / (max − min) = [0, 0.16, 0.08]; the weighted mean (1, 1, 2) is 0.08
    off = owl_offsets_from_ratios({"a": 0.01, "b": 0.03, "c": 0.02}, {"a": 1, "b": 1, "c": 2}, 0.08)
    assert off == pytest.approx({"a": 0.08, "b": -0.08, "c": 0.0})
    # unequal weights: the weighted mean of the offsets is exactly 0
    off = owl_offsets_from_ratios({"a": 0.0, "b": 0.1, "c": 0.04}, {"a": 5, "b": 1, "c": 3}, 0.1)
    assert sum(off[k] * w for k, w in {"a": 5, "b": 1, "c": 3}.items()) == pytest.approx(
        0, abs=1e-15
    )
    assert max(off.values()) - min(off.values()) == pytest.approx(0.2)
    # no spread of outliers: nothing moves
    assert owl_offsets_from_ratios({"a": 0.2, "b": 0.2}, {"a": 1, "b": 1}, 0.08) == {
        "a": 0.0,
        "b": 0.0,
    }


def test_outlier_ratios_and_blocks():
    scores = {"b0.x": torch.ones(10), "b0.y": torch.tensor([1.0] * 9 + [100.0]), "z": torch.ones(4)}
    groups = {"b0.x": "b0", "b0.y": "b0", "z": "z"}
    # block b0: mean (19 + 100) / 20 = 5.95, one score above 5 × mean? 100 > 29.75: 1 of 20
    assert outlier_ratios(scores, groups, 5.0) == pytest.approx({"b0": 0.05, "z": 0.0})
    assert block_of("blocks.1.fc1", ["blocks.1", "blocks.10", "blocks"]) == "blocks.1"
    assert block_of("head", ["blocks.1"]) == "head"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        with torch.no_grad():  # block 1: a few huge weights, i.e. outlier scores
            self.blocks[1].fc1.weight[:3, :2] *= 40

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 16, generator=g) for _ in range(2)]


def test_compress_with_owl_moves_blocks_and_keeps_the_overall_sparsity():
    model = Net().eval()
    recipe = {"method": "sparsegpt", "sparsity": 0.5, "allocation": "owl"}
    report = compress(model, _data(), recipe, quiet=True)
    sp = {r.name: r.sparsity for r in report.layers if r.status == "compressed"}
    assert set(sp) == {f"blocks.{i}.fc{j}" for i in range(3) for j in (1, 2)}
    for i in range(3):  # one sparsity per block (up to the rounding of pruned counts)
        assert sp[f"blocks.{i}.fc1"] == pytest.approx(sp[f"blocks.{i}.fc2"], abs=1 / 512)
    assert sp["blocks.1.fc1"] < sp["blocks.0.fc1"] - 0.05  # the outlier block is pruned less
    assert sp["blocks.1.fc1"] < sp["blocks.2.fc1"] - 0.05
    assert max(sp.values()) - min(sp.values()) <= 0.16 + 1e-3  # max δ − min δ = 2λ
    nnz = sum(float((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))
    assert nnz / (6 * 512) == pytest.approx(0.5, abs=2e-3)

    direct = owl_sparsities(Net().eval(), _data(), 0.5)
    assert direct["blocks.1.fc1"] == pytest.approx(sp["blocks.1.fc1"], abs=1 / 512)


def test_owl_refused_before_any_work():
    def never():
        raise AssertionError("calibration must not be read")
        yield

    with pytest.raises(ValueError, match=r"layer blocks.0.fc1: sparsity 0.05 with allocation owl"):
        compress(Net(), never(), {"sparsity": 0.05, "allocation": "owl"}, quiet=True)
    with pytest.raises(RecipeError, match="allocation.lam"):
        Recipe.from_dict({"sparsity": 0.5, "allocation": {"method": "owl", "lam": -1}})
    with pytest.raises(ValueError, match="OWL: sparsity 0.95"):
        owl_sparsities(Net(), _data(), 0.95)


def test_recipe_allocation_round_trip():
    r = Recipe.from_dict({"sparsity": 0.5, "allocation": {"method": "owl", "lam": 0.05}})
    assert r.to_dict()["allocation"] == {"method": "owl", "outlier_m": 5.0, "lam": 0.05}
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert "allocation" not in Recipe.from_dict({"sparsity": 0.5}).to_dict()
