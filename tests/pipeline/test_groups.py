"""Tied channel groups (pipeline.groups, shrink_sites.tied_groups): found, compressed in all
consumers at once, shrunk for real with outputs equal to the masked model's."""

from __future__ import annotations

import pytest
import torch
from tiny_resnet import CALIB
from tiny_resnet import make_tiny_resnet as _model

import optbrain
from optbrain.pipeline.cost import count_params
from optbrain.pipeline.groups import compress_groups, group_problem
from optbrain.pipeline.hessians import collect_hessians
from optbrain.pipeline.shrink_sites import channel_sites, tied_groups

pytest.importorskip("torch_pruning")


def test_tied_groups_and_global_pool_site():
    m = _model()
    groups = tied_groups(m, CALIB[0][:1])
    assert [g.consumers for g in groups] == [["l1.conv1", "l2.conv1", "l2.short.0"]]
    assert groups[0].producers == ["stem.0", "l1.conv2"] and groups[0].channels == 8
    assert groups[0].reason is None
    # the last stream has one reader (fc, after the global mean): a site of its own
    assert sorted(channel_sites(m, CALIB[0][:1])["fc"]) == ["l2.conv2", "l2.short.0"]


@pytest.mark.parametrize("method", ["obc", "magnitude", "obd"])
def test_group_shrinks_exactly(method, tmp_path):
    m = _model()
    dense = _model()
    res = compress_groups(m, CALIB, 0.5, method)
    (name,) = res
    r = res[name]
    assert int((~r.keep).sum()) == 4
    x = CALIB[0]
    with torch.no_grad():
        masked = m(x)
    p0 = count_params(m)
    rep = optbrain.shrink(m, x)
    with torch.no_grad():
        shrunk = m(x)
    rel = float((shrunk - masked).norm() / masked.norm())
    assert rel < 1e-5, rel
    assert set(rep.removed) == {"l1.conv1", "l2.conv1", "l2.short.0"} and not rep.skipped
    assert m.stem[0].out_channels == m.stem[1].num_features == m.l1.conv2.out_channels == 4
    assert m.l1.conv1.in_channels == m.l2.conv1.in_channels == m.l2.short[0].in_channels == 4
    assert count_params(m) < p0
    loaded = optbrain.load(dense, optbrain.save(m, tmp_path / "run"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB[1]), m(CALIB[1]), rtol=0, atol=0)


def test_obc_group_beats_baselines_on_layer_loss():
    m = _model()
    (grp,) = tied_groups(m, CALIB[0][:1])
    targets = {n: optbrain.adapters.adapter_for(m.get_submodule(n)) for n in grp.consumers}
    accs = collect_hessians(m, targets, CALIB)
    Ws, Hs, gs = group_problem(m, grp, {n: accs[n][0].hessian() for n in grp.consumers})
    assert gs == [9, 9, 1]
    assert [tuple(w.shape) for w in Ws] == [(8, 72), (12, 72), (12, 8)]
    assert [tuple(h.shape) for h in Hs] == [(72, 72), (72, 72), (8, 8)]
    losses = {}
    for method in ("obc", "magnitude", "obd"):
        mm = _model()
        losses[method] = compress_groups(mm, CALIB, 0.5, method)[grp.name].loss
    assert losses["obc"] < losses["magnitude"] and losses["obc"] < losses["obd"]


def test_unknown_group_is_refused():
    with pytest.raises(ValueError, match="no tied group named"):
        compress_groups(_model(), CALIB, {"tied:nope": 0.5})


def test_groups_after_a_per_layer_channel_level():
    m = _model()
    rule = {"targets": ["fc"], "method": "obc", "pattern": "channels", "sparsity": 0.5}
    optbrain.compress(m, CALIB, {"rules": [rule]}, quiet=True)
    compress_groups(m, CALIB, 0.25)
    x = CALIB[0]
    with torch.no_grad():
        masked = m(x)
    rep = optbrain.shrink(m, x)
    with torch.no_grad():
        assert float((m(x) - masked).norm() / masked.norm()) < 1e-5
    assert rep.removed["fc"] == 6 and m.l2.conv2.out_channels == m.l2.short[0].out_channels == 6
    assert m.stem[0].out_channels == 6  # 2 of the 8 stream channels went
