"""The typed compressed-layer state, the shared forward loop and the weight backup."""

import pytest
import torch
from torch import nn

from optbrain.pipeline.data import StopForward, forward_batch, forward_batches
from optbrain.pipeline.state import (
    GroupState,
    LayerState,
    ModelState,
    WeightBackup,
    compressed_state,
)


def test_group_state_round_trips_through_the_manifest_layout():
    mask = torch.tensor([[True, False], [False, True]])
    grp = GroupState(mask=mask, scale=torch.ones(2, 1), zero=torch.zeros(2, 1), bits=4, sym=True)
    tensors: dict[str, torch.Tensor] = {}
    info = grp.to_manifest("fc.g0", tensors)
    assert info == {
        "bits": 4,
        "sym": True,
        "group_size": None,
        "mask": "fc.g0.mask",
        "scale": "fc.g0.scale",
        "zero": "fc.g0.zero",
    }
    assert tensors["fc.g0.mask"].dtype == torch.uint8
    back = GroupState.from_manifest(info, tensors)
    assert back.mask.dtype == torch.bool and torch.equal(back.mask, mask)
    assert torch.equal(back.scale, grp.scale) and back.bits == 4 and back.group_size is None
    pruned_only = GroupState(mask=mask)
    info = pruned_only.to_manifest("x.g1", {})
    assert set(info) == {"bits", "sym", "group_size", "mask"}


def test_states_read_like_the_dicts_they_replace():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not compressed"):
        compressed_state(net)
    grp = GroupState(bits=3)
    state = ModelState(recipe={"seed": 0}, layers={"fc": LayerState(plan={}, groups=[grp])})
    state.attach(net)
    got = net.__dict__["_optbrain"]
    assert got is compressed_state(net)
    assert got["layers"]["fc"]["groups"][0]["bits"] == 3
    got["report"] = {"layers": []}
    assert state.report == {"layers": []} and "report" in got and "nope" not in got
    with pytest.raises(KeyError):
        got["nope"]


def test_forward_loop_counts_batches_and_names_the_failing_one():
    seen = []
    net = nn.Linear(3, 1)
    handle = net.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    assert forward_batches(net, [torch.randn(2, 3), torch.randn(5, 3)]) == 2
    handle.remove()
    assert seen == [2, 5]
    with pytest.raises(ValueError, match="calibration is empty"):
        forward_batches(net, [])
    with pytest.raises(Exception, match="calibration batch 1 failed"):
        forward_batches(net, [torch.randn(2, 3), torch.randn(2, 4)])

    def stop(m, a):
        raise StopForward

    net.register_forward_pre_hook(stop)
    assert forward_batch(net, 0, torch.randn(1, 3)) is False


def test_weight_backup_restores_on_failure():
    net = nn.Linear(3, 2)
    dense = net.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), WeightBackup().restoring() as backup:
        backup.keep(net.weight)
        with torch.no_grad():
            net.weight.zero_()
        raise RuntimeError("boom")
    assert torch.equal(net.weight, dense)
