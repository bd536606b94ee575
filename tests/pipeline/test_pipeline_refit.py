"""optbrain.refit / recipe ``refit: true``: every layer re-solved against the dense outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import optbrain
from optbrain.core import refit as core_refit
from optbrain.pipeline.refit import REFIT_PLAN, refit_to_dense
from optbrain.pipeline.state import compressed_state
from optbrain.recipe import Recipe, RecipeError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(),
                         nn.Linear(24, 5)).eval()  # fmt: skip


CHANNELS = {"rules": [{"targets": ["2"], "pattern": "channels", "sparsity": 0.5}]}


def _err(model, dense, xs) -> float:
    with torch.no_grad():
        return sum(float((model(x) - dense(x)).pow(2).sum()) for x in xs)


def test_linear_chain_is_compensated_exactly():
    """A → B without a nonlinearity; A quantized to 2 bits (left alone by the refit, its grid
    kept): B's refit is B A A'⁻¹ and restores the dense outputs on the calibration span."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 3, bias=False)).eval()
    dense = copy.deepcopy(model)
    calib = [torch.randn(64, 6, dtype=torch.float32) for _ in range(4)]
    optbrain.compress(model, calib, {"rules": [{"targets": ["0"], "method": "rtn", "bits": 2}]},
                      quiet=True)  # fmt: skip
    before = _err(model, dense, calib)
    q = model[0].weight.detach().clone()
    rep = refit_to_dense(model, dense, calib, damp=1e-9)
    assert rep.skipped["0"].startswith("quantized")
    assert [r.name for r in rep.layers] == ["1"]
    torch.testing.assert_close(model[0].weight, q, rtol=0, atol=0)  # the grid is untouched
    expected = dense[1].weight.double() @ dense[0].weight.double() @ torch.linalg.inv(q.double())
    torch.testing.assert_close(model[1].weight.double(), expected, rtol=1e-4, atol=1e-4)
    assert _err(model, dense, calib) < 1e-6 * before
    assert rep.layers[0].loss_after < 1e-6 * rep.layers[0].loss_before


def test_recipe_refit_keeps_zeros_lowers_error_and_shrinks_exactly(tmp_path):
    model, calib = _mlp(), [torch.randn(128, 12) for _ in range(8)]
    dense = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    optbrain.compress(plain, calib, CHANNELS, quiet=True)
    report = optbrain.compress(model, calib, {**CHANNELS, "refit": True}, quiet=True)
    gone = ~plain[2].weight.detach().ne(0).any(0)
    assert int(gone.sum()) == 16
    assert not model[2].weight.detach()[:, gone].any()  # the removed channels stay removed
    test = [torch.randn(128, 12) for _ in range(4)]
    # only layer 4 has upstream error to absorb here (layer 2's own OBS update is already the
    # least-squares fit): 0.96-0.99× on the calibration set over seeds 0-4, 0.97-1.02× held out
    assert _err(model, dense, calib) < _err(plain, dense, calib)
    assert _err(model, dense, test) < 1.05 * _err(plain, dense, test)
    meta = report.metadata["refit"]
    assert [r["name"] for r in meta["layers"]] == ["0", "2", "4"]
    for r in meta["layers"]:
        assert r["loss_after"] <= r["loss_before"] * (1 + 1e-9)
    assert {r["name"]: r["mask"] for r in meta["layers"]}["2"] == "columns"
    state = compressed_state(model)
    assert state.layers["0"].plan == REFIT_PLAN and state.layers["4"].plan == REFIT_PLAN
    assert state.recipe["refit"] is True
    # save / load: the refitted dense layers travel too (bit-identical outputs)
    out = optbrain.save(model, tmp_path / "run")
    loaded = optbrain.load(copy.deepcopy(dense), out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(test[0]), model(test[0]), rtol=0, atol=0)
    with torch.no_grad():
        masked = model(test[0])
    rep = optbrain.shrink(model, test[0])
    assert rep.removed == {"2": 16}
    with torch.no_grad():
        rel = float((model(test[0]) - masked).norm() / masked.norm())
    assert rel < 1e-5


def test_per_row_masks_stay_and_help():
    model, calib = _mlp(), [torch.randn(32, 12) for _ in range(4)]
    dense = copy.deepcopy(model)
    recipe = {"method": "sparsegpt", "sparsity": 0.6}
    optbrain.compress(model, calib, recipe, quiet=True)
    zeros = {n: m.weight.detach().eq(0) for n, m in model.named_children() if hasattr(m, "weight")}
    before = _err(model, dense, calib)
    rep = optbrain.refit(model, dense, calib)
    assert {r.mask for r in rep.layers} == {"rows"}
    for n, z in zeros.items():
        assert model.get_submodule(n).weight.detach()[z].eq(0).all()
    assert _err(model, dense, calib) < before


def test_layers_option_and_hand_zeroed_columns():
    model, calib = _mlp(), [torch.randn(32, 12) for _ in range(2)]
    dense = copy.deepcopy(model)
    with torch.no_grad():
        model[2].weight[:, :5] = 0  # removed by hand: no recorded mask
    rep = refit_to_dense(model, dense, calib, layers=["2", "re:4"])
    assert rep.skipped["0"] == "not in the refit's layers"
    assert [r.name for r in rep.layers] == ["2", "4"]
    assert not model[2].weight[:, :5].any()  # kept zero: shrink must still find them


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.__setitem__(2, nn.Linear(32, 23)), "in the dense model"),
        (lambda d: d.__delitem__(4), "no layer '4'"),
        (lambda d: d.double(), "float64 on cpu in the dense model"),
    ],
)
def test_a_foreign_dense_model_is_refused_before_any_work(change, match, monkeypatch):
    import optbrain.pipeline.refit as pr

    model, calib = _mlp(), [torch.randn(8, 12)]
    dense = copy.deepcopy(model)
    change(dense)

    def no_calibration(*a, **k):
        raise AssertionError("calibration started before the dense model was checked")

    monkeypatch.setattr(pr, "visit_sequential", no_calibration)
    with pytest.raises(ValueError, match=match):
        refit_to_dense(model, dense, calib)
    with pytest.raises(ValueError, match="the model itself"):
        refit_to_dense(model, model, calib)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.fc(x))


class _Stacked(nn.Module):
    """stem → blocks (a ModuleList: ``find_blocks``) → head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_a_stem_before_the_blocks_is_refitted_first():
    """Forward order also outside the block list: the stem's refit changes what the blocks
    see, so it must come before them (else the blocks are fitted to stale inputs)."""
    torch.manual_seed(0)
    model = _Stacked().eval()
    dense = copy.deepcopy(model)
    calib = [torch.randn(64, 8) for _ in range(4)]
    optbrain.compress(model, calib, {"method": "magnitude", "sparsity": 0.6}, quiet=True)
    before = _err(model, dense, calib)
    rep = refit_to_dense(model, dense, calib)
    assert [r.name for r in rep.layers] == ["stem", "blocks.0.fc", "blocks.1.fc", "head"]
    assert _err(model, dense, calib) < 0.8 * before


def test_recipe_ignore_is_never_refitted():
    model, calib = _mlp(), [torch.randn(64, 12) for _ in range(4)]
    rec = {**CHANNELS, "refit": True, "ignore": ["4"]}
    w4 = model[4].weight.detach().clone()
    report = optbrain.compress(model, calib, rec, quiet=True)
    meta = report.metadata["refit"]
    assert meta["skipped"]["4"].startswith("ignored")
    assert [r["name"] for r in meta["layers"]] == ["0", "2"]
    torch.testing.assert_close(model[4].weight, w4, rtol=0, atol=0)
    assert "4" not in compressed_state(model).layers


def test_hand_pruned_single_weights_stay_zero_without_a_state():
    model, calib = _mlp(), [torch.randn(64, 12) for _ in range(4)]
    dense = copy.deepcopy(model)
    torch.manual_seed(1)
    zeros = torch.rand_like(model[2].weight) < 0.3  # pruned by another tool: no ModelState
    with torch.no_grad():
        model[2].weight[zeros] = 0
    rep = optbrain.refit(model, dense, calib)
    assert {r.name: r.mask for r in rep.layers}["2"] == "rows"
    assert model[2].weight.detach()[zeros].eq(0).all()
    assert model[2].weight.detach()[~zeros].ne(0).all()


def test_bad_options():
    model, calib = _mlp(), [torch.randn(8, 12)]
    with pytest.raises(ValueError, match="match no compressible layer"):
        refit_to_dense(model, copy.deepcopy(model), calib, layers=["nope*"])
    with pytest.raises(ValueError, match="damp"):
        refit_to_dense(model, copy.deepcopy(model), calib, damp=-1)
    with pytest.raises(RecipeError, match="refit"):
        Recipe.from_dict({"method": "obc", "sparsity": 0.5, "refit": "yes"})
    assert Recipe.from_dict({"method": "obc", "sparsity": 0.5, "refit": True}).to_dict()["refit"]
    assert "refit" not in Recipe.from_dict({"method": "obc", "sparsity": 0.5}).to_dict()


def test_a_failure_mid_refit_leaves_the_model_as_it_was(monkeypatch):
    import optbrain.pipeline.refit as pr

    model, calib = _mlp(), [torch.randn(16, 12) for _ in range(2)]
    dense = copy.deepcopy(model)
    optbrain.compress(model, calib, CHANNELS, quiet=True)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return core_refit.masked_refit(*a, **k)

    monkeypatch.setattr(pr, "masked_refit", failing)
    with pytest.raises(RuntimeError, match="boom"):
        refit_to_dense(model, dense, calib)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, kept[k], rtol=0, atol=0)
    # inside compress: back to the dense weights
    model2 = copy.deepcopy(dense)
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        optbrain.compress(model2, calib, {**CHANNELS, "refit": True}, quiet=True)
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, dense.state_dict()[k], rtol=0, atol=0)


def test_a_failure_after_the_refit_puts_back_the_refitted_dense_layers(monkeypatch):
    """The refit changes layers the recipe left dense; a later step failing (batch-norm
    re-estimation here) must restore them too, not only the compressed ones."""
    import optbrain.pipeline.compress as pc

    model, calib = _mlp(), [torch.randn(16, 12) for _ in range(2)]
    dense = copy.deepcopy(model)

    def failing(*a, **k):
        raise RuntimeError("bn failed")

    monkeypatch.setattr(pc, "recalibrate_batchnorm", failing)
    rec = {**CHANNELS, "refit": True, "bn_recalibration": True}
    with pytest.raises(RuntimeError, match="bn failed"):
        optbrain.compress(model, calib, rec, quiet=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, dense.state_dict()[k], rtol=0, atol=0)


def test_dense_targets_and_refit_share_one_dense_copy(monkeypatch):
    import optbrain.pipeline.compress as pc

    copies = []
    real = pc.dense_copy
    monkeypatch.setattr(pc, "dense_copy", lambda m: copies.append(1) or real(m))
    model, calib = _mlp(), [torch.randn(32, 12) for _ in range(2)]
    rec = {**CHANNELS, "refit": True, "calibration": {"mode": "sequential", "targets": "dense"}}
    optbrain.compress(model, calib, rec, quiet=True)
    assert len(copies) == 1


def test_offload_refuses_refit(tmp_path):
    from optbrain.pipeline.offload import compress_offloaded

    rec = {"method": "gptq", "bits": 4, "refit": True, "calibration": {"mode": "sequential"}}
    with pytest.raises(ValueError, match="refit"):
        compress_offloaded(tmp_path / "src", [torch.zeros(1, 4, dtype=torch.long)], rec,
                           tmp_path / "off")  # fmt: skip


def test_budget_refit_on_a_tiny_resnet():
    from optbrain.budget import compress_to_budget
    from tests.tiny_resnet import TinyResNet

    torch.manual_seed(0)
    model = TinyResNet().eval()
    dense = copy.deepcopy(model)
    calib = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    kw = dict(target="flops=0.6", levels=["c0.25", "c0.5", "c0.75"], quiet=True)
    plain = copy.deepcopy(model)
    compress_to_budget(plain, calib, **kw)
    report = compress_to_budget(model, calib, refit=True, **kw)
    assert (
        report.metadata["allocation"]["levels"]
        == compress_to_budget(copy.deepcopy(dense), calib, **kw).metadata["allocation"]["levels"]
    )
    refit = report.metadata["refit"]
    assert refit["layers"] and all(
        r["loss_after"] <= r["loss_before"] + 1e-12 for r in refit["layers"]
    )
    for n, m in plain.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            w0 = m.weight.detach()
            cols = w0.transpose(0, 1).reshape(w0.shape[1], -1).ne(0).any(1)
            w1 = model.get_submodule(n).weight.detach()
            assert not w1.transpose(0, 1).reshape(w1.shape[1], -1)[~cols].any(), n
    assert _err(model, dense, calib) < _err(plain, dense, calib)


def test_budget_failure_after_the_stitch_leaves_the_model_dense(monkeypatch):
    import optbrain.budget.api as ba
    from optbrain.budget import compress_to_budget
    from tests.tiny_resnet import TinyResNet

    torch.manual_seed(0)
    model = TinyResNet().eval()
    dense = copy.deepcopy(model)
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]

    def failing(*a, **k):
        raise RuntimeError("bn failed")

    monkeypatch.setattr(ba, "recalibrate_batchnorm", failing)
    with pytest.raises(RuntimeError, match="bn failed"):
        compress_to_budget(model, calib, target="flops=0.6", levels=["c0.5"], refit=True,
                           bn_recalibration=True, quiet=True)  # fmt: skip
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, dense.state_dict()[k], rtol=0, atol=0)
