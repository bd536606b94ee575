"""Channel levels in the budget: ids and validation, where they apply, the database's solve
equals the direct structured solve, costs with producer savings, the DP choosing them, the
measured latency table and its cache, and compress_to_budget → shrink end to end."""

import copy
import json

import pytest
import torch
from latency_model import modelled_ms
from torch import nn

import optbrain
from optbrain.adapters import adapter_for
from optbrain.budget import (
    DbSettings,
    Level,
    build_database,
    compress_to_budget,
    default_levels,
    level_cost,
    plan_allocation,
    structured_levels,
)
from optbrain.budget import latency as lat
from optbrain.core.hessian import row_losses
from optbrain.core.structured import solve_structured
from optbrain.pipeline import collect_hessians
from optbrain.pipeline.shrink_sites import channel_sites


class CNN(nn.Module):
    """conv 3→16 → BN → relu → conv 16→16 → relu → mean over space → Linear 16→24 → relu →
    Linear 24→4. Channel sites: c2 (producer c1), fc (producer c2: the global mean acts per
    channel) and out (producer fc)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 24)
        self.out = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.out(torch.relu(self.fc(x.mean((2, 3)))))


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = CNN()
    with torch.no_grad():  # non-trivial batch-norm statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 3, 8, 8, generator=g) for _ in range(3)]


CH_LEVELS = ["c0.25", "c0.5", "c0.75", "c0.5+b8", "s0.5"]


@pytest.fixture(scope="module")
def cnn_db(tmp_path_factory):
    torch.set_num_threads(1)
    model, batches = make_cnn(), calib()
    db = build_database(
        model, batches, tmp_path_factory.mktemp("chdb"), CH_LEVELS,
        settings=DbSettings(solver="obc"),
    )  # fmt: skip
    return model, batches, db


def test_level_ids_parse_and_validation():
    assert Level(channels=0.25).id == "c0.25"
    assert Level(channels=0.25, bits=8).id == "c0.25+b8"
    assert Level.parse("c0.25+b8") == Level(channels=0.25, bits=8)
    assert Level.parse("C0.5") == Level(channels=0.5)
    lv = Level(channels=0.25)
    assert lv.prunes and lv.structured and lv.kind == "pruned" and lv.nominal_density == 0.75
    assert Level(channels=0.5, bits=4).kind == "both"
    for bad in (dict(channels=1.0), dict(channels=-0.1), dict(channels=True)):
        with pytest.raises(ValueError, match="channels"):
            Level(**bad)
    with pytest.raises(ValueError, match="not both"):
        Level(channels=0.25, sparsity=0.5)
    with pytest.raises(ValueError, match="not both"):
        Level.parse("c0.5+2:4")
    with pytest.raises(ValueError, match="cC e.g. c0.25"):
        Level.parse("x0.5")
    # fits: 4 channels of 9 columns: c0.9 removes round(3.6) = 4 → none left
    assert Level(channels=0.5).fits(36, 9) and not Level(channels=0.9).fits(36, 9)
    grid = [lv.id for lv in structured_levels((0.25, 0.5), bits=(8,))]
    assert grid == ["dense", "b8", "c0.25", "c0.25+b8", "c0.5", "c0.5+b8"]
    assert not any(lv.channels for lv in default_levels())  # the default grid is unchanged


def test_channel_sites_follow_what_shrink_honours(tiny):
    sites = channel_sites(tiny[0](), torch.randn(1, 3, 6, 6))
    assert "model's input" in sites["c1"]
    assert "grouped convolution" in sites["c2"]
    assert "one to one" in sites["fc"]  # a flatten between the conv and the Linear
    assert sites["out"] == ["fc"]
    cnn = channel_sites(make_cnn(), torch.randn(1, 3, 8, 8))
    assert cnn["c2"] == ["c1"] and cnn["out"] == ["fc"]
    assert cnn["fc"] == ["c2"]  # the global spatial mean acts per channel


def test_a_mean_over_channels_is_refused():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c1(x)
            return self.c2(y - y.mean(1, keepdim=True))  # normalises over channels

    sites = channel_sites(M().eval(), torch.randn(1, 3, 6, 6))
    assert "Mean" in sites["c2"]


def test_database_channel_levels_equal_the_direct_solve(cnn_db):
    model, batches, db = cnn_db
    H = collect_hessians(model, {"c2": model.c2, "out": model.out}, batches)
    for name, g in (("c2", 9), ("out", 1)):
        rec = db.record(name)
        assert [p["name"] for p in rec["channel_producers"]] == [{"c2": "c1", "out": "fc"}[name]]
        W, Hg = adapter_for(model.get_submodule(name)).weight(0), H[name][0].hessian()
        for lid in ("c0.25", "c0.5", "c0.75"):
            ref = solve_structured(W, Hg, g, Level.parse(lid).channels, "obc")
            got = db.level_weights(name, lid)[0]
            assert torch.equal(got["mask"].bool()[0], ref.keep_columns), (name, lid)
            torch.testing.assert_close(got["weight"], ref.weight, rtol=1e-5, atol=1e-6)
            entry = rec["levels"][lid]
            assert entry["removed_channels"] == int((~ref.keep).sum())
            undamped = float(row_losses(W, ref.weight, Hg).sum())  # the database's error
            assert entry["loss"] == pytest.approx(undamped, rel=1e-4, abs=1e-9)
        q = db.level_weights(name, "c0.5+b8")[0]
        removed = ~db.level_weights(name, "c0.5")[0]["mask"].bool()
        assert not q["weight"][removed].any() and q["scale"] is not None
    for name in ("c1",):  # not a channel site: no channel level, the reason recorded
        rec = db.record(name)
        assert not any(Level.parse(i).channels for i in rec["levels"]) and rec["channel_reason"]
        assert "s0.5" in rec["levels"]


def test_costs_count_the_producer_rows(cnn_db):
    _, _, db = cnn_db
    rec, c1 = db.record("c2"), db.record("c1")
    e = rec["levels"]["c0.5"]
    k = e["removed_channels"]
    assert k == 8
    assert e["producer_params"] == k * c1["cols"] == 8 * 27
    assert e["producer_flops"] == 2 * k * 27 * 64
    assert level_cost("flops", rec, e) == 2 * 64 * e["nnz"] - 2 * 8 * 27 * 64
    assert level_cost("params", rec, e) == e["nnz"] - 8 * 27
    assert level_cost("size", rec, e) == e["nnz"] * 4  # the consumer only


def test_dp_picks_channel_levels_under_a_flops_target(cnn_db):
    _, _, db = cnn_db
    alloc = plan_allocation(db, "flops=0.6")
    assert alloc.cost <= alloc.budget
    chosen = set(alloc.levels.values())
    assert any(Level.parse(i).channels for i in chosen), alloc.levels
    # the channel levels are cheaper than s0.5 here only because of the producer rows
    rec = db.record("c2")
    assert level_cost("flops", rec, rec["levels"]["c0.5"]) < level_cost(
        "flops", rec, rec["levels"]["s0.5"]
    )


def test_latency_table_cache_written_reused_and_rebuilt(cnn_db, tmp_path, monkeypatch):
    model, _, db = cnn_db
    path = tmp_path / "machine.json"
    table = lat.latency_table(model, db, repeats=1, cache=lat.LatencyCache(path))
    assert set(table) == set(db.layers)
    for name in db.layers:
        assert set(table[name]) == set(db.record(name)["levels"])
        assert table[name]["s0.5"] == table[name]["dense"] > 0  # zeros do not run faster
    for name in ("c2", "out"):  # fewer channels never cost more (timing noise is clipped)
        row = table[name]
        assert row["c0.75"] <= row["c0.5"] <= row["c0.25"] <= row["dense"]
        assert row["c0.5+b8"] == row["c0.5"]
    saved = json.loads(path.read_text())["times"]
    assert len(saved) >= 8  # 5 dense shapes, c2 and out at 3 widths, their producers

    def no_timing(*a, **k):
        raise AssertionError("re-timed a cached shape")

    monkeypatch.setattr(lat, "time_shape", no_timing)
    again = lat.latency_table(model, db, repeats=1, cache=lat.LatencyCache(path))
    assert again == table
    monkeypatch.undo()
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        cache = lat.LatencyCache(path)
    lat.latency_table(model, db, repeats=1, cache=cache)
    assert len(json.loads(path.read_text())["times"]) == len(saved)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lat.LatencyCache.default().path.parent == tmp_path / "xdg" / "optbrain" / "latency"
    with pytest.raises(ValueError, match="batch"):
        lat.latency_table(model, db, batch=0, cache=lat.LatencyCache(None))


@pytest.mark.parametrize("target", ["latency=0.7", "flops=0.6"])
def test_compress_to_budget_channels_then_shrink(target, tmp_path, monkeypatch):
    monkeypatch.setattr(lat, "time_shape", modelled_ms)
    model, batches = make_cnn(), calib()
    dense = copy.deepcopy(model)
    levels = None if target.startswith("latency") else structured_levels()
    rep = compress_to_budget(
        model, batches, target, levels, latency_cache=lat.LatencyCache(tmp_path / "t.json"),
        quiet=True,
    )  # fmt: skip
    alloc = rep.metadata["allocation"]
    assert all(Level.parse(i).channels or i == "dense" for i in alloc["levels"].values())
    chosen = [n for n, i in alloc["levels"].items() if i != "dense"]
    assert chosen and alloc["predicted_cost"] <= alloc["budget"]
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = model(x)
    sh = optbrain.shrink(model, batches[0][:1])
    assert set(sh.removed) == set(chosen) and not sh.skipped
    with torch.no_grad():
        out = model(x)
    assert float((out - masked).norm() / masked.norm()) < 1e-5
    assert sh.params_after < sh.params_before and sh.macs_after < sh.macs_before
    with torch.no_grad():
        assert float((out - dense(x)).norm() / dense(x).norm()) > 0  # it did compress
    optbrain.save(model, tmp_path / "run")
    again = optbrain.load(copy.deepcopy(dense), tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(again(x), out)


def test_channel_compound_with_bits_shrinks_saves_and_rejects_groups(tmp_path):
    model, batches = make_cnn(), calib()
    dense = copy.deepcopy(model)
    with pytest.raises(ValueError, match="per-row grids"):
        build_database(model, batches, tmp_path / "g", ["c0.5+b8"],
                       settings=DbSettings(group_size=8))  # fmt: skip
    assert not (tmp_path / "g" / "layers").exists() or not any((tmp_path / "g").rglob("*.json"))
    rep = compress_to_budget(model, batches, "bops=0.5", ["c0.5+b8"], quiet=True)
    levels = rep.metadata["allocation"]["levels"]
    assert levels["c2"] == "c0.5+b8" or levels["out"] == "c0.5+b8", levels
    x = batches[0][:4]
    with torch.no_grad():
        masked = model(x)
    optbrain.shrink(model, batches[0][:1])
    optbrain.save(model, tmp_path / "run")
    again = optbrain.load(copy.deepcopy(dense), tmp_path / "run")
    with torch.no_grad():
        assert float((model(x) - masked).norm() / masked.norm()) < 1e-5
        torch.testing.assert_close(again(x), model(x))
