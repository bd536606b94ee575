"""Channels through a depthwise convolution (EfficientNet / MobileNet MBConv blocks): the
project conv's input channels are sites, ``shrink`` removes the depthwise channels, its BN and
the expand conv's rows (through a TF "same" ``F.pad``), outputs unchanged."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_mbconv import make_mbconv, mbconv_calibration
from torch import nn

import optbrain
from optbrain.pipeline.cost import count_macs, count_params
from optbrain.pipeline.shrink_sites import channel_sites

pytest.importorskip("torch_pruning")

PROJECTS = ["b0.project", "b1.project", "b2.project"]


def test_project_convs_are_sites_through_the_depthwise_conv():
    sites = channel_sites(make_mbconv(), torch.randn(1, 3, 8, 8))
    assert sites["b0.project"] == ["b0.dw", "stem"]  # no expand conv: the stem's rows
    assert sites["b1.project"] == ["b1.dw", "b1.expand"]  # through the F.pad of a strided dw
    assert sites["b2.project"] == ["b2.dw", "b2.expand"]
    assert "grouped convolution" in sites["b1.dw"]
    assert "tied" in sites["b2.expand"]  # its input is also added back (the residual)
    assert "tied" in sites["head"]  # b2's output is the residual stream, also read by b2.expand


def test_a_depthwise_conv_on_the_model_input_and_a_pad_over_features_are_refused():
    class DwFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw, self.pw = nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.pw(self.dw(x))

    assert "model's input" in channel_sites(DwFirst(), torch.randn(1, 3, 5, 5))["pw"]

    class PadFeatures(nn.Module):  # F.pad on a Linear's features adds one: not per channel
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(7, 2)

        def forward(self, x):
            return self.b(F.pad(torch.relu(self.a(x)), (1, 0)))

    assert "ConstantPadNd" in channel_sites(PadFeatures(), torch.randn(2, 4))["b"]


@pytest.mark.parametrize("method", ["obc", "magnitude"])
def test_shrink_removes_the_depthwise_channels(method, tmp_path):
    model = make_mbconv()
    dense = copy.deepcopy(model)
    calib = mbconv_calibration()
    rules = [{"targets": PROJECTS, "method": method, "pattern": "channels", "sparsity": 0.5}]
    optbrain.compress(model, calib, {"rules": rules}, quiet=True)
    x = calib[0][:6]
    with torch.no_grad():
        masked = model(x)
    p0, m0 = count_params(model), count_macs(model, x[:1])
    rep = optbrain.shrink(model, x[:1])
    assert not rep.skipped and set(rep.removed) == set(PROJECTS)
    with torch.no_grad():
        out = model(x)
    assert float((out - masked).norm() / masked.norm()) < 1e-5
    assert count_params(model) < p0 and count_macs(model, x[:1]) < m0
    b1 = model.b1  # 24 hidden channels: at least half removed (also the inputs dead on calib)
    n = b1.project.in_channels
    assert n <= 12 and n == b1.dw.out_channels == b1.dw.in_channels == b1.dw.groups
    assert n == b1.bn1.num_features == b1.bn0.num_features == b1.expand.out_channels
    b0 = model.b0
    assert b0.project.in_channels <= 4
    assert (
        b0.project.in_channels == b0.dw.groups == model.stem.out_channels == model.bn.num_features
    )
    loaded = optbrain.load(dense, optbrain.save(model, tmp_path / "run"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)
