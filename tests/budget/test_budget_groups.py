"""Tied-group units in the budget (budget/groups.py): built from one group trace, equal to the
direct group solve, their savings equal what shrink removes, chosen by the DP next to the
per-layer channel levels, written and shrunk end to end; latency rows are savings."""

from __future__ import annotations

import pytest
import torch
from latency_model import modelled_ms
from tiny_resnet import CALIB, make_tiny_resnet
from torch import nn

import optbrain
from optbrain.budget import (
    DbSettings,
    build_database,
    compress_to_budget,
    plan_allocation,
    structured_levels,
)
from optbrain.budget import latency as lat
from optbrain.budget.groups import group_cost, group_levels, group_records, group_weights
from optbrain.pipeline.groups import compress_groups

pytest.importorskip("torch_pruning")

GROUP = "tied:l1.conv1+l2.conv1+l2.short.0"
LEVELS = structured_levels((0.25, 0.5))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    torch.set_num_threads(1)
    return build_database(
        make_tiny_resnet(), CALIB, tmp_path_factory.mktemp("gdb"), LEVELS,
        settings=DbSettings(solver="obc", model_level=True),
    )  # fmt: skip


def _conv_linear_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


def test_group_levels_only_for_channel_grids():
    assert [lv.id for lv in group_levels(LEVELS)] == ["c0.25", "c0.5"]
    assert group_levels(structured_levels((0.5,), bits=(8,))) == []


def test_group_unit_equals_the_direct_group_solve(db):
    (rec,) = group_records(db)
    assert rec["name"] == GROUP and rec["producers"] == ["stem.0", "l1.conv2"]
    assert {k: e["removed_channels"] for k, e in rec["levels"].items()} == {
        "dense": 0, "c0.25": 2, "c0.5": 4,
    }  # fmt: skip
    for lid in ("c0.25", "c0.5"):
        m = make_tiny_resnet()
        res = compress_groups(m, CALIB, Level_fraction(lid), "obc")[GROUP]
        got = group_weights(db, rec, lid)
        for c in rec["consumers"]:
            w = m.get_submodule(c).weight.detach().reshape(got[c]["weight"].shape[0], -1)
            torch.testing.assert_close(got[c]["weight"], w, rtol=1e-5, atol=1e-6)
        entry = rec["levels"][lid]
        assert entry["predicted"] == pytest.approx(res.loss, rel=1e-6)
        assert entry["model_loss"] > 0 and entry["loss"] > 0


def Level_fraction(lid: str) -> float:  # noqa: N802 - reads as the level's fraction
    return float(lid[1:])


@pytest.mark.parametrize("lid", ["c0.25", "c0.5"])
def test_savings_are_what_shrink_removes(db, lid):
    (rec,) = group_records(db)
    m = make_tiny_resnet()
    compress_groups(m, CALIB, Level_fraction(lid))
    before = _conv_linear_weights(m)
    macs0 = optbrain.pipeline.cost.count_macs(m, CALIB[0][:1])
    optbrain.shrink(m, CALIB[0][:1])
    assert -group_cost("params", rec, lid) == before - _conv_linear_weights(m)
    saved_macs = macs0 - optbrain.pipeline.cost.count_macs(m, CALIB[0][:1])
    assert -group_cost("flops", rec, lid) == 2 * saved_macs
    assert group_cost("params", rec, "dense") == 0


def test_dp_takes_the_group_and_shrink_honours_it(db):
    alloc = plan_allocation(db, "params=0.3", "model")
    assert alloc.levels[GROUP] != "dense"
    m = make_tiny_resnet()
    rep = compress_to_budget(m, CALIB, "params=0.3", None, db.root, solver="obc", model_level=True)
    assert rep.metadata["allocation"]["levels"][GROUP] == alloc.levels[GROUP]
    kinds = {r.name: r.info.get("tied_group") for r in rep.layers}
    assert kinds["l2.short.0"] == f"{GROUP} {alloc.levels[GROUP]}"
    x = CALIB[0]
    with torch.no_grad():
        masked = m(x)
    before = _conv_linear_weights(m)
    srep = optbrain.shrink(m, x)
    with torch.no_grad():
        shrunk = m(x)
    assert float((shrunk - masked).norm() / masked.norm()) < 1e-5
    assert {"l1.conv1", "l2.conv1", "l2.short.0"} <= set(srep.removed)
    # the additive model counts a producer's rows at its dense width: it may only over-count
    # the savings (predicted <= achieved), by the overlap of the two removals at most
    after = _conv_linear_weights(m)
    assert float(alloc.cost) <= after < before


def test_latency_rows_are_monotone_savings(db, monkeypatch):
    # timing a tiny model's shapes on a shared machine is noise (a level can time slower than
    # dense); the table's assembly is what is tested, on modelled per-shape times
    monkeypatch.setattr(lat, "time_shape", modelled_ms)
    monkeypatch.setattr(lat, "time_module", lambda module, x, repeats: 1e-3)
    table = lat.latency_table(make_tiny_resnet(), db, repeats=2, cache=lat.LatencyCache(None))
    row = table[GROUP]
    assert row["dense"] == 0.0
    assert row["c0.5"] <= row["c0.25"] <= 0.0
    alloc = plan_allocation(db, "latency=0.9", timing=table)
    assert float(alloc.cost) <= float(alloc.budget)
