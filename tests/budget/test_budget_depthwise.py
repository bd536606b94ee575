"""Channel levels of MBConv project convs (EfficientNet-Lite): the depthwise conv between the
project and expand convs is a producer — its filters count in the savings and it is timed at
fewer channels in the latency table; the DP's choice shrinks for real."""

import pytest
import torch
from latency_model import modelled_ms
from tiny_mbconv import make_mbconv, mbconv_calibration

import optbrain
from optbrain.budget import DbSettings, build_database, compress_to_budget, level_cost
from optbrain.budget import latency as lat

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def mb_db(tmp_path_factory):
    model, batches = make_mbconv(), mbconv_calibration()
    db = build_database(model, batches, tmp_path_factory.mktemp("mbdb"), ["c0.5"],
                        settings=DbSettings(solver="obc"))  # fmt: skip
    return model, db


def test_the_depthwise_filters_count_in_the_savings(mb_db):
    _, db = mb_db
    rec, dw, ex = db.record("b1.project"), db.record("b1.dw"), db.record("b1.expand")
    assert [p["name"] for p in rec["channel_producers"]] == ["b1.dw", "b1.expand"]
    e = rec["levels"]["c0.5"]
    k = e["removed_channels"]
    assert k == 12 and dw["cols"] == 9 and ex["cols"] == 6
    assert e["producer_params"] == k * (9 + 6)
    # the depthwise conv runs on the padded 9×9 input at stride 2: 4×4 positions
    assert e["producer_flops"] == 2 * k * (9 * dw["positions"] + 6 * ex["positions"])
    assert dw["positions"] == 16 and ex["positions"] == 64
    assert level_cost("params", rec, e) == e["nnz"] - k * 15


def test_latency_table_times_the_depthwise_conv_at_fewer_channels(mb_db, monkeypatch):
    model, db = mb_db
    monkeypatch.setattr(lat, "time_shape", modelled_ms)
    cache = lat.LatencyCache(None)
    table = lat.latency_table(model, db, cache=cache)
    dw_specs = [k for k in cache.times if '"groups"' in k]
    assert any('"cin": 12' in k for k in dw_specs) and any('"cin": 24' in k for k in dw_specs)
    shape = db.record("b1.project")["input_shape"]

    def conv(cin: int, cout: int, kernel: list[int], spatial: list[int], groups: int = 1):
        return modelled_ms({"op": "Conv2d", "cin": cin, "cout": cout, "kernel": kernel,
                            "x": [1, cin, *spatial], "groups": groups})  # fmt: skip

    dws = db.record("b1.dw")["input_shape"][2:]
    exs = db.record("b1.expand")["input_shape"][2:]
    want = (
        conv(12, 12, [1, 1], shape[2:])
        + conv(12, 12, [3, 3], dws, 12) - conv(24, 24, [3, 3], dws, 24)
        + conv(6, 12, [1, 1], exs) - conv(6, 24, [1, 1], exs)
    )  # fmt: skip
    assert table["b1.project"]["c0.5"] == pytest.approx(want)
    assert table["b1.dw"]["dense"] == pytest.approx(conv(24, 24, [3, 3], dws, 24))


def test_a_latency_target_shrinks_the_mbconv_model(tmp_path, monkeypatch):
    monkeypatch.setattr(lat, "time_shape", modelled_ms)
    model, batches = make_mbconv(), mbconv_calibration()
    rep = compress_to_budget(model, batches, "latency=0.7", None, quiet=True,
                             latency_cache=lat.LatencyCache(tmp_path / "t.json"))  # fmt: skip
    chosen = [n for n, i in rep.metadata["allocation"]["levels"].items() if i != "dense"]
    assert any(n.endswith("project") for n in chosen), chosen
    x = batches[0][:4]
    with torch.no_grad():
        masked = model(x)
    sh = optbrain.shrink(model, batches[0][:1])
    assert set(sh.removed) == set(chosen) and not sh.skipped
    with torch.no_grad():
        assert float((model(x) - masked).norm() / masked.norm()) < 1e-5
