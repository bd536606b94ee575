"""Cost models checked by hand on the tiny conv/linear model, and target parsing."""

from fractions import Fraction

import pytest

from optbrain.budget import Level, level_cost, normalize_levels, parse_target

# c1: Conv2d(3, 8, 3, pad 1) on 6×6; c2: Conv2d(8, 8, 3, stride 2, pad 1, groups 2) → 3×3;
# fc: Linear(72, 16); out: Linear(16, 4)
HAND = {
    # name: (params, dense FLOPs = 2·out·in/groups·kh·kw·H_out·W_out (Linear: 2·out·in))
    "c1": (8 * 3 * 3 * 3, 2 * 8 * 3 * 3 * 3 * 6 * 6),
    "c2": (8 * 4 * 3 * 3, 2 * 8 * (8 // 2) * 3 * 3 * 3 * 3),
    "fc": (16 * 72, 2 * 16 * 72),
    "out": (4 * 16, 2 * 4 * 16),
}


def test_database_layer_shapes_and_positions(tiny_db):
    _, _, db = tiny_db
    assert db.layers == ["c1", "c2", "fc", "out"]
    for name, (params, flops) in HAND.items():
        rec = db.record(name)
        assert rec["params"] == params
        dense = rec["levels"]["dense"]
        assert level_cost("flops", rec, dense) == flops
        assert level_cost("params", rec, dense) == params
        assert level_cost("bops", rec, dense) == 32 * flops
        assert level_cost("size", rec, dense) == params * 4  # 32-bit floats, bytes
    assert db.record("c1")["positions"] == 36 and db.record("c2")["positions"] == 9
    assert db.record("c2")["groups"] == 2 and db.record("c2")["cols"] == 36


def test_sparse_and_quantized_costs_by_hand(tiny_db):
    _, _, db = tiny_db
    c1, c2, fc = db.record("c1"), db.record("c2"), db.record("fc")
    # 2:4 needs 4 | cols: c1 has 27 columns, so it has no N:M levels
    assert "2:4" not in c1["levels"] and "2:4+b8" not in c1["levels"]
    assert "2:4" in fc["levels"]
    # s0.5 of the grouped conv: half of each group's 4·36 weights kept
    e = c2["levels"]["s0.5"]
    assert e["nnz"] == 144 and e["sparsity"] == 0.5
    assert level_cost("flops", c2, e) == 2 * 9 * 144
    # c1 at s0.75: 216 - round(0.75·216) = 54 kept
    e = c1["levels"]["s0.75"]
    assert e["nnz"] == 54
    assert level_cost("flops", c1, e) == Fraction(HAND["c1"][1], 4)
    # bops of a compound level: FLOPs × weight bits
    e = c1["levels"]["s0.5+b4"]
    assert level_cost("bops", c1, e) == 2 * 36 * 108 * 4
    # size, b4 (no pruning): 216·4 value bits + one fp16 scale per output channel (8 rows)
    e = c1["levels"]["b4"]
    assert e["scales"] == 8
    assert level_cost("size", c1, e) == Fraction(216 * 4 + 8 * 16, 8)
    # size, s0.5 unstructured fp32: values + min(bitmask 216, 108 indices · ⌈log2 27⌉ = 540)
    e = c1["levels"]["s0.5"]
    assert level_cost("size", c1, e) == Fraction(108 * 32 + 216, 8)
    # size, s0.75 of fc (1152 weights, 72 columns): 288 kept, indices 288·7 = 2016 > 1152
    e = fc["levels"]["s0.75"]
    assert level_cost("size", fc, e) == Fraction(288 * 32 + 1152, 8)
    # size, 2:4 + b8 on fc: 576 kept · (8 value bits + 2 position bits) + 16 fp16 scales
    e = fc["levels"]["2:4+b8"]
    assert e["nnz"] == 576
    assert level_cost("size", fc, e) == Fraction(576 * 8 + 576 * 2 + 16 * 16, 8)


def test_latency_needs_a_table_entry(tiny_db):
    _, _, db = tiny_db
    rec = db.record("fc")
    table = {"fc": {"dense": 2.0, "s0.5": 1.25}}
    assert level_cost("latency", rec, rec["levels"]["s0.5"], "s0.5", table) == Fraction(1.25)
    with pytest.raises(ValueError, match="no entry"):
        level_cost("latency", rec, rec["levels"]["b4"], "b4", table)
    with pytest.raises(ValueError, match="timing table"):
        level_cost("latency", rec, rec["levels"]["b4"], "b4", None)


@pytest.mark.parametrize(
    "text,value,relative",
    [
        ("flops=0.25", Fraction(1, 4), True),
        ("bops=1/12", Fraction(1, 12), True),
        ("size=30%", Fraction(3, 10), True),
        ("params=4x", Fraction(1, 4), True),
        ("flops=1.2e9", Fraction(1_200_000_000), False),
        (" FLOPS = 1 ", Fraction(1), True),
    ],
)
def test_parse_target(text, value, relative):
    t = parse_target(text)
    assert (t.value, t.relative) == (value, relative)
    assert t.budget(Fraction(1000)) == (value * 1000 if relative else value)


@pytest.mark.parametrize(
    "text", ["flops", "speed=0.5", "flops=0", "flops=-1", "flops=abc", "flops=0.5x", "bops=1/0"]
)
def test_parse_target_rejects(text):
    with pytest.raises(ValueError):
        parse_target(text)


def test_level_ids_round_trip():
    for lid in ["dense", "s0.5", "s0.95", "2:4", "4:8", "b3", "s0.75+b4", "2:4+b8"]:
        assert Level.parse(lid).id == lid
    assert Level(sparsity=0.5, bits=4) == Level.parse("s0.5+b4")
    with pytest.raises(ValueError):
        Level(sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError):
        Level.parse("q4")
    grid = normalize_levels(["b4", "s0.5", "b4"])
    assert [lv.id for lv in grid] == ["dense", "b4", "s0.5"]
