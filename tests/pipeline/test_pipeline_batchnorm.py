"""Batch-norm re-calibration: running statistics equal the per-batch averages computed by
hand (also for a batch norm downstream of another), modes / momenta restored, failures leave
the statistics untouched."""

import pytest
import torch
from torch import nn

from optbrain.pipeline import CalibrationError, recalibrate_batchnorm

DT = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.drop = nn.Dropout(0.5)
        self.bn2 = nn.BatchNorm1d(5, momentum=0.3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv(x)))
        return self.bn2(self.drop(self.fc(h.flatten(1))))


def by_hand(net, calib):
    """Average over batches of per-batch mean and unbiased variance, with each BN normalising
    by its batch statistics (biased variance) during the pass; dropout off."""
    stats = {"bn1": ([], []), "bn2": ([], [])}
    with torch.no_grad():
        for x in calib:
            z1 = net.conv(x)
            m1, v1 = z1.mean((0, 2, 3)), z1.var((0, 2, 3), unbiased=True)
            vb = z1.var((0, 2, 3), unbiased=False)
            n1 = (z1 - m1[:, None, None]) / torch.sqrt(vb[:, None, None] + net.bn1.eps)
            a1 = torch.relu(n1 * net.bn1.weight[:, None, None] + net.bn1.bias[:, None, None])
            z2 = net.fc(a1.flatten(1))
            stats["bn1"][0].append(m1)
            stats["bn1"][1].append(v1)
            stats["bn2"][0].append(z2.mean(0))
            stats["bn2"][1].append(z2.var(0, unbiased=True))
    return {k: (torch.stack(m).mean(0), torch.stack(v).mean(0)) for k, (m, v) in stats.items()}


def make():
    torch.manual_seed(0)
    net = Net().to(DT)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.fill_(3.0)
            bn.running_var.fill_(7.0)
    calib = [torch.randn(n, 2, 4, 4, dtype=DT) * 2 + 1 for n in (4, 3, 6)]
    return net, calib


@pytest.mark.parametrize("train_before", [False, True])
def test_running_stats_match_hand_computation(train_before):
    net, calib = make()
    net.train(train_before)
    ref = by_hand(net, calib)
    assert recalibrate_batchnorm(net, calib) == 2
    for name, (mean, var) in ref.items():
        bn = getattr(net, name)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == 3
    assert net.bn1.momentum == 0.1 and net.bn2.momentum == 0.3
    assert all(m.training == train_before for m in net.modules())


def test_failure_and_empty_calibration_leave_statistics_untouched():
    net, calib = make()
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="empty"):
        recalibrate_batchnorm(net, [])
    with pytest.raises(CalibrationError, match="calibration batch 1 failed in forward"):
        recalibrate_batchnorm(net, [calib[0], torch.zeros(2, 5, 4, 4, dtype=DT)])
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.training for m in net.modules())
    assert net.bn1.momentum == 0.1
    assert recalibrate_batchnorm(nn.Linear(2, 2), [torch.zeros(1, 2)]) == 0


def test_labelled_loader_convention():
    net, calib = make()
    ref = by_hand(net, calib)
    recalibrate_batchnorm(net, [(x, torch.zeros(len(x))) for x in calib], inputs="first")
    torch.testing.assert_close(net.bn2.running_var, ref["bn2"][1], rtol=1e-12, atol=1e-12)
