"""Layer adapters: conv as a matrix product equals F.conv1d / F.conv2d per group, write-back,
cost numbers, HF Conv1D, and skip reasons."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optbrain.adapters import (
    Conv1DAdapter,
    ConvAdapter,
    LinearAdapter,
    adapter_for,
    find_layers,
    skip_reason,
)

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (``tests/conftest.py``)."""


def _group_outputs(adapter, module, x):
    """Reference conv output without bias, as ``(N·L, rows)`` per group: ``F.conv1d/2d``
    for zero padding, the module itself (bias removed) for other padding modes."""
    if module.padding_mode == "zeros":
        conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        y = conv(
            x, module.weight, None, module.stride, module.padding, module.dilation, module.groups
        )
    else:
        y = module(x) - module.bias.view(-1, *([1] * (x.dim() - 2)))
    if y.dim() == module.weight.dim() - 1:  # unbatched
        y = y.unsqueeze(0)
    out = []
    for g in range(adapter.groups):
        yg = y[:, g * adapter.rows : (g + 1) * adapter.rows]
        out.append(yg.movedim(1, -1).reshape(-1, adapter.rows))
    return y, out


def _check_conv(module, x):
    a = adapter_for(module)
    assert isinstance(a, ConvAdapter)
    y, ref = _group_outputs(a, module, x)
    rows = a.input_rows(x)
    assert len(rows) == module.groups
    for g in range(a.groups):
        assert rows[g].shape == (a.tokens(x), a.cols)
        got = rows[g] @ a.weight(g).T
        torch.testing.assert_close(got, ref[g], rtol=1e-12, atol=1e-12)
    assert a.output_shape(x) == tuple(y.shape[2:])
    assert a.tokens(x) == y.shape[0] * math.prod(y.shape[2:])
    assert a.positions(x) == math.prod(y.shape[2:])
    assert a.macs(x) == y[0].numel() * y.shape[0] * (module.in_channels // module.groups) * (
        math.prod(module.kernel_size)
    )


CONV2D_GRID = list(
    itertools.product(
        [(1, 1), (3, 3), (2, 3)],  # kernel
        [1, (2, 1), 3],  # stride
        [0, (1, 2), "same", "valid"],  # padding
        [1, (2, 1)],  # dilation
        [1, 2, 4],  # groups (4 = depthwise, multiplier 2)
    )
)


def test_conv2d_as_matmul_equals_conv2d():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 7, dtype=DT)
    n = 0
    for kernel, stride, padding, dilation, groups in CONV2D_GRID:
        if padding == "same" and stride != 1:
            continue  # PyTorch forbids padding='same' with stride > 1
        m = nn.Conv2d(
            4, 8, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups
        ).to(DT)
        try:
            _check_conv(m, x)
        except AssertionError as e:
            raise AssertionError(f"{m}: {e}") from e
        n += 1
    assert n == 180


CONV1D_GRID = list(itertools.product([1, 3, 4], [1, 2], [0, 2, "same", "valid"], [1, 3], [1, 3, 6]))


def test_conv1d_as_matmul_equals_conv1d():
    torch.manual_seed(1)
    x = torch.randn(3, 6, 17, dtype=DT)
    n = 0
    for kernel, stride, padding, dilation, groups in CONV1D_GRID:
        if padding == "same" and stride != 1:
            continue
        m = nn.Conv1d(
            6, 12, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups
        ).to(DT)
        try:
            _check_conv(m, x)
        except AssertionError as e:
            raise AssertionError(f"{m}: {e}") from e
        n += 1
    assert n == 126


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"])
def test_conv2d_padding_modes(mode, padding):
    torch.manual_seed(2)
    m = nn.Conv2d(
        4,
        6,
        (3, 4),
        padding=padding,
        padding_mode=mode,
        groups=2,
        dilation=(1, 2) if padding == "same" else 1,
    ).to(DT)
    _check_conv(m, torch.randn(2, 4, 8, 9, dtype=DT))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv1d_padding_modes(mode):
    torch.manual_seed(3)
    m = nn.Conv1d(3, 3, 3, padding=2, padding_mode=mode, groups=3).to(DT)
    _check_conv(m, torch.randn(2, 3, 10, dtype=DT))


def test_conv_unbatched_input_and_shape_only_queries():
    torch.manual_seed(4)
    m2 = nn.Conv2d(2, 4, 3, stride=2, padding=1).to(DT)
    _check_conv(m2, torch.randn(2, 10, 6, dtype=DT))
    a = adapter_for(m2)
    assert a.output_shape((5, 2, 10, 6)) == (5, 3)
    assert a.tokens(torch.Size([5, 2, 10, 6])) == 5 * 15
    m1 = nn.Conv1d(2, 4, 3).to(DT)
    _check_conv(m1, torch.randn(2, 11, dtype=DT))


def test_conv_weight_layout_and_set_weight_round_trip():
    torch.manual_seed(5)
    m = nn.Conv2d(4, 6, (2, 3), groups=2)
    a = adapter_for(m)
    assert (a.kind, a.groups, a.rows, a.cols) == ("conv2d", 2, 3, 2 * 2 * 3)
    w0, b0 = m.weight.detach().clone(), m.bias.detach().clone()
    W1 = a.weight(1)
    # group 1 = output channels 3..5, columns in (in_channel, kh, kw) order
    torch.testing.assert_close(W1[2, 7], w0[5, 1, 0, 1])
    W1.add_(1.0)  # a copy: the module is untouched
    torch.testing.assert_close(m.weight, w0, rtol=0, atol=0)
    new = torch.randn(3, 12)
    a.set_weight(1, new)
    assert torch.equal(m.weight[:3], w0[:3])
    torch.testing.assert_close(a.weight(1), new, rtol=0, atol=0)
    torch.testing.assert_close(m.weight[3:].reshape(3, 12), new, rtol=0, atol=0)
    assert torch.equal(m.bias, b0)
    with pytest.raises(ValueError, match="shape"):
        a.set_weight(0, torch.zeros(3, 11))
    with pytest.raises(ValueError, match="NaN"):
        a.set_weight(0, torch.full((3, 12), float("nan")))
    with pytest.raises(IndexError):
        a.weight(2)


def test_linear_adapter_rows_and_round_trip_keeps_dtype():
    torch.manual_seed(6)
    m = nn.Linear(5, 3).to(torch.bfloat16)
    a = adapter_for(m)
    assert isinstance(a, LinearAdapter) and (a.rows, a.cols, a.groups) == (3, 5, 1)
    assert a.weight(0).dtype == torch.float32
    x = torch.randn(2, 4, 5)
    (X,) = a.input_rows(x)
    assert torch.equal(X, x.reshape(8, 5))
    assert a.tokens(x) == 8 and a.positions(x) == 4 and a.output_shape(x) == ()
    assert a.macs(x) == 8 * 15 and a.params == 15
    new = torch.randn(3, 5)
    b0 = m.bias.clone()
    a.set_weight(0, new)
    assert m.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m.weight.float(), new.to(torch.bfloat16).float())
    assert torch.equal(m.bias, b0)


def test_hf_conv1d_adapter():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(7)
    m = Conv1D(6, 4).to(DT)  # nf=6 outputs, nx=4 inputs, weight (4, 6)
    a = adapter_for(m)
    assert isinstance(a, Conv1DAdapter) and (a.rows, a.cols) == (6, 4)
    x = torch.randn(2, 3, 4, dtype=DT)
    (X,) = a.input_rows(x)
    torch.testing.assert_close(X @ a.weight(0).T + m.bias, m(x).reshape(-1, 6))
    new = torch.randn(6, 4, dtype=DT)
    a.set_weight(0, new)
    torch.testing.assert_close(m.weight, new.T, rtol=0, atol=0)
    torch.testing.assert_close(m(x).reshape(-1, 6), X @ new.T + m.bias)


def test_skip_reasons_and_find_layers():
    model = nn.Sequential(
        nn.Embedding(10, 4),
        nn.LayerNorm(4),
        nn.Linear(4, 4),
        nn.Conv3d(1, 1, 1),
        nn.ConvTranspose2d(1, 1, 1),
        nn.MultiheadAttention(4, 2),
        nn.ReLU(),
        nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)),
    )
    targets, skipped = find_layers(model)
    assert list(targets) == ["2"]
    assert "lookup" in skipped["0"]
    assert "normalisation" in skipped["1"]
    assert "3-D" in skipped["3"]
    assert "transposed" in skipped["4"]
    assert "MultiheadAttention" in skipped["5"] and "MultiheadAttention" in skipped["5.out_proj"]
    assert "parametrized" in skipped["7"]
    assert "6" not in skipped
    assert skip_reason(nn.ReLU()) is None and skip_reason(nn.Linear(2, 2)) is None
    assert adapter_for(nn.Embedding(3, 2)) is None and adapter_for(nn.ReLU()) is None
    lazy = nn.LazyLinear(3)
    assert "lazy" in skip_reason(lazy) and adapter_for(lazy) is None
    only_linear, _ = find_layers(model, include=lambda n, m: n != "2")
    assert only_linear == {}


def test_find_layers_skips_tied_weights_but_not_aliases():
    emb, head, lin = nn.Embedding(6, 4), nn.Linear(4, 6, bias=False), nn.Linear(4, 4)
    head.weight = emb.weight  # tied, as GPT-2's lm_head
    model = nn.ModuleDict({"emb": emb, "head": head, "lin": lin, "alias": lin})
    targets, skipped = find_layers(model)
    assert list(targets) == ["lin"]
    assert "tied to ['emb']" in skipped["head"]
