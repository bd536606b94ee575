"""Independent-mode Hessians: equal to hand-built ones from unfolded inputs (per group), do
not depend on batching or on the batch form; hooks removed and errors named on failure."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optbrain.adapters import adapter_for, find_layers
from optbrain.pipeline import (
    CalibrationError,
    NonFiniteActivationError,
    collect_hessians,
    trace_input_shapes,
)

DT = torch.float64


def hess(X):
    X = X.reshape(-1, X.shape[-1]).double()
    return 2.0 * X.T @ X / X.shape[0]


class Net(nn.Module):
    """conv (stride 2) → grouped dilated conv → depthwise reflect Conv1d → linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 4, (3, 2), padding=(2, 1), dilation=(2, 1), groups=2)
        self.dw = nn.Conv1d(4, 4, 3, padding="same", padding_mode="reflect", groups=4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a1 = torch.relu(self.conv1(x))
        a2 = torch.relu(self.conv2(a1))
        s = a2.flatten(2)  # (N, 4, L)
        a3 = torch.tanh(self.dw(s))
        return self.fc(a3.transpose(1, 2))


def hand_hessians(net, x):
    """Per-group Hessians built directly from the definition of each layer's input."""
    with torch.no_grad():
        a1 = torch.relu(net.conv1(x))
        a2 = torch.relu(net.conv2(a1))
        s = a2.flatten(2)
        a3 = torch.tanh(net.dw(s))
    out = {}
    U = F.unfold(x, 3, stride=2, padding=1)  # (N, 27, L)
    out["conv1"] = [hess(U.transpose(1, 2))]
    hs = []
    for g in range(2):
        Ug = F.unfold(a1[:, 3 * g : 3 * g + 3], (3, 2), dilation=(2, 1), padding=(2, 1))
        hs.append(hess(Ug.transpose(1, 2)))
    out["conv2"] = hs
    padded = torch.cat([s[..., 1:2], s, s[..., -2:-1]], dim=-1)  # reflect by hand
    out["dw"] = [hess(padded[:, c].unfold(-1, 3, 1)) for c in range(4)]
    out["fc"] = [hess(a3.transpose(1, 2))]
    return out


@pytest.fixture
def net_x():
    torch.manual_seed(0)
    return Net().to(DT), torch.randn(7, 3, 10, 8, dtype=DT)


def _close(hs_got, hs_ref, tol=1e-12):
    assert set(hs_got) == set(hs_ref)
    for name in hs_ref:
        assert len(hs_got[name]) == len(hs_ref[name]), name
        for acc, H in zip(hs_got[name], hs_ref[name], strict=True):
            torch.testing.assert_close(acc.hessian(), H, rtol=tol, atol=tol, msg=name)


def test_hessians_equal_hand_built_per_group(net_x):
    net, x = net_x
    targets, skipped = find_layers(net)
    assert list(targets) == ["conv1", "conv2", "dw", "fc"] and not skipped
    got = collect_hessians(net, targets, [x])
    _close(got, hand_hessians(net, x))
    assert [len(got[n]) for n in targets] == [1, 2, 4, 1]
    assert got["conv1"][0].tokens == 7 * 5 * 4
    assert got["conv2"][1].tokens == got["fc"][0].tokens == 7 * 25


def test_hessians_do_not_depend_on_batch_splitting(net_x):
    net, x = net_x
    targets = find_layers(net)[0]
    whole = collect_hessians(net, targets, [x])
    split = collect_hessians(net, targets, [x[:3], x[3:4], x[4:]])
    _close(split, {n: [a.hessian() for a in accs] for n, accs in whole.items()})
    assert all(a.tokens == b.tokens for n in whole for a, b in zip(whole[n], split[n], strict=True))


class KwNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, shift=None):
        return self.fc(x if shift is None else x + shift)


def test_batch_forms_give_the_same_hessian():
    torch.manual_seed(1)
    net = KwNet().to(DT)
    x = torch.randn(6, 4, dtype=DT)
    y = torch.randint(0, 3, (6,))
    ref = hess(x)
    t = {"fc": net.fc}
    forms = {
        "list of tensors": dict(calibration=[x[:2], x[2:]]),
        "lone tensor = one batch": dict(calibration=x),
        "tuples": dict(calibration=[(x[:4],), (x[4:],)]),
        "dicts": dict(calibration=[{"x": x[:1]}, {"x": x[1:]}]),
        "labelled loader": dict(
            calibration=DataLoader(TensorDataset(x, y), batch_size=4), inputs="first"
        ),
        "forward fn": dict(
            calibration=DataLoader(TensorDataset(x, y), batch_size=5),
            forward=lambda m, b: m(b[0]),
        ),
        "generator": dict(calibration=(x[i : i + 3] for i in (0, 3))),
    }
    for label, kw in forms.items():
        got = collect_hessians(net, t, **kw)
        torch.testing.assert_close(got["fc"][0].hessian(), ref, msg=label)
    shift = torch.ones(4, dtype=DT)
    got = collect_hessians(net, t, [{"x": x, "shift": shift}])
    torch.testing.assert_close(got["fc"][0].hessian(), hess(x + shift))


def test_labelled_tuples_without_inputs_option_get_a_hint():
    net = nn.Sequential(nn.Linear(4, 2))
    loader = DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4)), batch_size=2)
    with pytest.raises(CalibrationError, match=r"calibration batch 0 failed.*inputs='first'"):
        collect_hessians(net, {"0": net[0]}, loader)


class Flaky(nn.Module):
    """Raises in forward on the third call."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.fc1(x)
        if self.calls == 3:
            raise RuntimeError("boom")
        return self.fc2(self.drop(h))


def _no_hooks(model):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_hooks_removed_and_batch_named_when_forward_raises():
    torch.manual_seed(2)
    net = Flaky()
    net.train()
    net.drop.eval()
    calib = [torch.randn(2, 4) for _ in range(5)]
    with pytest.raises(
        CalibrationError, match="calibration batch 2 failed in forward: RuntimeError: boom"
    ) as info:
        collect_hessians(net, find_layers(net)[0], calib)
    assert info.value.batch == 2
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _no_hooks(net)
    assert net.training and net.fc1.training and not net.drop.training
    # and it works afterwards; dropout was off during calibration (H is deterministic)
    net.calls = 10
    h1 = collect_hessians(net, {"fc2": net.fc2}, calib)["fc2"][0].hessian()
    h2 = collect_hessians(net, {"fc2": net.fc2}, calib)["fc2"][0].hessian()
    assert torch.equal(h1, h2)
    assert _no_hooks(net) and net.training


def test_nan_activation_names_the_layer_and_batch():
    net = nn.Sequential()
    net.add_module("first", nn.Linear(3, 3))
    net.add_module("log", nn.Identity())
    net.add_module("second", nn.Linear(3, 2))
    with torch.no_grad():
        net.first.weight.copy_(torch.eye(3))
        net.first.bias.zero_()

    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x)

    net.log = Log()
    good, bad = torch.rand(2, 3) + 0.5, -torch.rand(2, 3) - 0.5
    with pytest.raises(NonFiniteActivationError, match="calibration batch 1: layer 'second'"):
        collect_hessians(net, find_layers(net)[0], [good, bad])
    with pytest.raises(ValueError, match="'second'"):  # it is a ValueError too
        collect_hessians(net, find_layers(net)[0], [bad])
    assert _no_hooks(net)


def test_empty_calibration_and_bad_targets_are_clear_errors():
    net = nn.Sequential(nn.Linear(3, 3), nn.Embedding(4, 3), nn.Linear(3, 1))
    t = {"0": net[0]}
    with pytest.raises(ValueError, match="calibration is empty"):
        collect_hessians(net, t, [])
    with pytest.raises(ValueError, match="calibration is empty"):
        collect_hessians(net, t, iter(()))
    with pytest.raises(ValueError, match="'1' cannot be compressed: embedding"):
        collect_hessians(net, {"1": net[1]}, [torch.zeros(1, 3)])
    with pytest.raises(ValueError, match="no target"):
        collect_hessians(net, {}, [torch.zeros(1, 3)])
    with pytest.raises(CalibrationError, match=r"\['other'\] received no inputs"):
        collect_hessians(net[0], {"0": net[0], "other": nn.Linear(3, 3)}, [torch.ones(2, 3)])
    assert _no_hooks(net)


def test_trace_input_shapes_gives_cost_numbers(net_x):
    net, x = net_x
    targets = find_layers(net)[0]
    shapes = trace_input_shapes(net, targets, x[:2])
    assert shapes == {
        "conv1": (2, 3, 10, 8),
        "conv2": (2, 6, 5, 4),
        "dw": (2, 4, 25),
        "fc": (2, 25, 4),
    }
    a = adapter_for(net.conv2)
    assert a.output_shape(shapes["conv2"]) == (5, 5)
    assert a.macs(shapes["conv2"]) == 2 * 25 * 4 * (3 * 3 * 2)
    assert _no_hooks(net)


def test_hessian_predicts_the_output_change_of_the_real_layer(net_x):
    """½ Σ_g Σ_r δ_gr H_g δ_grᵀ == ||conv(x; W + δ) - conv(x; W)||² / N for every layer."""
    from optbrain.core.hessian import layer_loss

    net, x = net_x
    targets = find_layers(net)[0]
    hs = collect_hessians(net, targets, [x[:4], x[4:]])
    acts = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: acts.__setitem__(n, a[0]))
        for n, m in targets.items()
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    torch.manual_seed(3)
    for name, module in targets.items():
        a = adapter_for(module)
        with torch.no_grad():
            before = module(acts[name])
            predicted = 0.0
            for g in range(a.groups):
                W = a.weight(g)
                W_new = W + 0.1 * torch.randn_like(W)
                predicted += layer_loss(W, W_new, hs[name][g].hessian())
                a.set_weight(g, W_new)
            measured = ((module(acts[name]) - before) ** 2).sum() / hs[name][0].tokens
        assert abs(predicted - measured.item()) <= 1e-10 * measured.item(), name
