"""Pruning patterns (optbrain.core.patterns): parsing, column checks, and the mask checkers."""

import pytest
import torch

from optbrain.core.patterns import Pattern, blocks_ok, nm_ok, parse_pattern


@pytest.mark.parametrize(
    "text,kind,n,m,block,sparsity",
    [
        ("unstructured", "unstructured", 0, 0, 1, None),
        ("2:4", "nm", 2, 4, 1, 0.5),
        (" 1 : 3 ", "nm", 1, 3, 1, 2 / 3),
        ("4:8", "nm", 4, 8, 1, 0.5),
        ("block4", "block", 0, 0, 4, None),
        ("BLOCK2", "block", 0, 0, 2, None),
    ],
)
def test_parse_pattern(text, kind, n, m, block, sparsity):
    p = parse_pattern(text)
    assert (p.kind, p.n, p.m, p.block) == (kind, n, m, block)
    assert p.fixed_sparsity == (None if sparsity is None else pytest.approx(sparsity))
    assert parse_pattern(str(p)) == p
    assert parse_pattern(p) is p


@pytest.mark.parametrize(
    "text",
    ["4:4", "5:4", "0:4", "2:0", "block0", "3of4", "2:4:8", "nm", "block", "-1:4", "structured"],
)
def test_parse_pattern_rejects(text):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(text)


def test_parse_pattern_rejects_non_strings():
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(24)


def test_check_cols():
    parse_pattern("2:4").check_cols(8)
    parse_pattern("block3").check_cols(9)
    parse_pattern("unstructured").check_cols(7)
    with pytest.raises(ValueError, match="M=4"):
        parse_pattern("2:4").check_cols(10)
    with pytest.raises(ValueError, match="block size 3"):
        parse_pattern("block3").check_cols(8)


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_nm_ok():
    good = _mask([[1, 1, 0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 0, 0, 0]])
    assert nm_ok(good, 2, 4)
    assert not nm_ok(_mask([[1, 1, 1, 0, 0, 0, 0, 1]]), 2, 4)  # 3 kept in the first group
    assert not nm_ok(_mask([[1, 1, 0, 0, 0, 1, 1, 1]]), 2, 4)  # 3 kept in the last group
    # groups are consecutive runs of m: 2 kept straddling a boundary is fine
    assert nm_ok(_mask([[0, 0, 1, 1, 1, 1, 0, 0]]), 2, 4)
    assert not nm_ok(_mask([[0, 1, 1, 0, 0, 0]]), 1, 3)
    assert nm_ok(_mask([[0, 0, 1, 1, 0, 0]]), 1, 3)


def test_blocks_ok():
    assert blocks_ok(_mask([[1, 1, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]]), 2)
    assert not blocks_ok(_mask([[1, 0, 0, 0, 1, 1]]), 2)
    assert not blocks_ok(_mask([[1, 1, 0, 0, 0, 1]]), 2)
    # constant on runs of 2 but not on runs of 3
    assert blocks_ok(_mask([[1, 1, 1, 0, 0, 0]]), 3)
    assert not blocks_ok(_mask([[1, 1, 0, 0, 1, 1]]), 3)


def test_pattern_str():
    assert str(Pattern("nm", n=2, m=4)) == "2:4"
    assert str(Pattern("block", block=4)) == "block4"
    assert str(Pattern("unstructured")) == "unstructured"
