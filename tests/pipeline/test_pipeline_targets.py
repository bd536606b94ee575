"""Sequential mode with dense targets: on a two-layer linear toy the second layer is the
closed-form refit to the dense outputs on its mask; in a block model every layer's measured
loss is its error against the dense model's outputs; recipe validation."""

import copy

import pytest
import torch
from torch import nn

import optbrain
from optbrain.recipe import Recipe, RecipeError

F64 = torch.float64


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12, bias=False), nn.Linear(12, 8, bias=False)).double()
    with torch.no_grad():
        for m in model:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=F64))
    X0 = torch.randn(512, 16, generator=g, dtype=F64) @ torch.randn(16, 16, generator=g, dtype=F64)
    return model, X0


def _run(targets, seed=0, **rule):
    model, X0 = _toy(seed)
    dense = copy.deepcopy(model)
    recipe = {
        "calibration": {"mode": "sequential", "targets": targets, "samples": 512},
        "rules": [{"targets": ["*"], "method": "obc", "dtype": "float64", **rule}],
    }
    report = optbrain.compress(model, X0.split(128), recipe, quiet=True)
    return model, dense, X0, report


def test_two_layer_toy_second_layer_is_the_closed_form_refit():
    model, dense, X0, report = _run("dense", sparsity=0.5)
    W1, W2 = dense[0].weight.detach(), dense[1].weight.detach()
    Q1, Q2 = model[0].weight.detach(), model[1].weight.detach()
    Xd, Xc = X0 @ W1.T, X0 @ Q1.T  # layer-2 inputs: dense and compressed upstream
    N = X0.shape[0]
    Ht, C = 2 * Xc.T @ Xc / N, 2 * Xc.T @ Xd / N
    lam = 0.01 * float(torch.diagonal(Ht).mean())
    eye = torch.eye(12, dtype=F64)
    for r in range(8):  # ŵ_S = ((H̃+λI)_SS)⁻¹ ((C+λI) w)_S on the returned mask
        S = (Q2[r] != 0).nonzero().squeeze(1)
        want = torch.linalg.solve((Ht + lam * eye)[S][:, S], ((C + lam * eye) @ W2[r])[S])
        assert torch.allclose(Q2[r, S], want, rtol=1e-7, atol=1e-9)
    rec = {r.name: r for r in report.layers}
    err2 = float(((Xc @ Q2.T - Xd @ W2.T) ** 2).sum() / N)  # error against the dense outputs
    assert rec["1"].measured_loss == pytest.approx(err2, rel=1e-8)
    # layer 1 sees dense inputs: the plain problem, no residual
    assert rec["0"].measured_loss == pytest.approx(
        float(((X0 @ Q1.T - X0 @ W1.T) ** 2).sum() / N), rel=1e-8
    )


def test_dense_targets_beat_compressed_targets_on_the_model_output():
    def out_err(model, dense, X0):
        with torch.no_grad():
            return float(((model(X0) - dense(X0)) ** 2).mean())

    for kw in ({"sparsity": 0.5}, {"bits": 3}):
        d = out_err(*_run("dense", 1, **kw)[:3])
        c = out_err(*_run("compressed", 1, **kw)[:3])
        assert d < 0.9 * c, (kw, d, c)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, d=8, n=3):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def _inputs(model, name, x):
    got = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: got.append(a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return torch.cat(got).reshape(-1, got[0].shape[-1])


def test_block_model_measures_every_layer_against_the_dense_outputs():
    torch.manual_seed(0)
    model = Net().double()
    dense = copy.deepcopy(model)
    x = torch.randn(256, 8, dtype=F64)
    recipe = {
        "calibration": {"mode": "sequential", "targets": "dense", "samples": 256},
        "rules": [{"targets": ["*"], "method": "gptq", "bits": 2, "dtype": "float64"}],
    }
    report = optbrain.compress(model, x.split(64), recipe, quiet=True)
    for rec in report.layers:
        name = rec.name
        Xc, Xd = _inputs(model, name, x), _inputs(dense, name, x)
        Wq = model.get_submodule(name).weight.detach()
        W = dense.get_submodule(name).weight.detach()
        err = float(((Xc @ Wq.T - Xd @ W.T) ** 2).sum() / Xc.shape[0])
        assert rec.measured_loss == pytest.approx(err, rel=1e-7), name
    assert {r.name for r in report.layers} == {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def test_recipe_validates_targets():
    r = Recipe.coerce(
        {"calibration": {"mode": "sequential", "targets": "dense"}, "method": "gptq", "bits": 4}
    )
    assert r.calibration.targets == "dense"
    assert Recipe.from_dict(r.to_dict()).calibration.targets == "dense"
    assert (
        "targets" not in Recipe.coerce({"method": "obc", "sparsity": 0.5}).to_dict()["calibration"]
    )
    with pytest.raises(RecipeError, match="calibration.targets.*sequential"):
        Recipe.coerce({"calibration": {"targets": "dense"}, "method": "obc", "sparsity": 0.5})
    with pytest.raises(RecipeError, match="calibration.targets must be one of"):
        Recipe.coerce({"calibration": {"mode": "sequential", "targets": "teacher"}, "bits": 4})
    with pytest.raises(RecipeError, match="rules\\[0\\].method.*'wanda'.*refit"):
        Recipe.coerce(
            {
                "calibration": {"mode": "sequential", "targets": "dense"},
                "method": "wanda",
                "sparsity": 0.5,
            }
        )
