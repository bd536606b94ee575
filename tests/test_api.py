"""Whole-model tests of ``optbrain.compress``: no-op recipes, hooks and weights after failures,
OBC against the baselines on tiny MLP / CNN / transformer models, predicted vs measured layer
losses, per-group records, bad input and the progress line.

Every model here is tiny and runs single-threaded; margins against the baselines were measured
over seeds 0-9 (see the comments at each bound) and asserted with slack.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optbrain.api import compress
from optbrain.pipeline.data import CalibrationError, NonFiniteActivationError
from optbrain.recipe import RecipeError

NOTHING = "the recipe asks nothing of this layer"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (``tests/conftest.py``)."""


# ------------------------------------------------------------------------------ tiny models


def mlp(seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 8)
    ).eval()


def mlp_data(seed: int, n_calib: int = 256, n_test: int = 512, dim: int = 16):
    """Correlated inputs ``z @ A`` (one mixing matrix ``A`` per seed for calibration and test):
    batches of 64 for calibration and a held-out tensor from the same distribution."""
    g = torch.Generator().manual_seed(1000 + seed)
    A = torch.randn(dim, dim, generator=g)
    calib = torch.randn(n_calib, dim, generator=g) @ A
    test = torch.randn(n_test, dim, generator=g) @ A
    return [calib[i : i + 64] for i in range(0, n_calib, 64)], test


def cnn(seed: int) -> nn.Module:
    """Dense conv, a grouped conv (2 groups) and a depthwise conv (8 groups), then a Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    ).eval()


def cnn_data(seed: int, n_calib: int = 128, n_test: int = 256):
    """Smooth random 3×6×6 images (neighbouring pixels correlated, as in real images)."""
    g = torch.Generator().manual_seed(2000 + seed)

    def draw(n):
        return F.avg_pool2d(torch.randn(n, 3, 8, 8, generator=g), 3, stride=1)

    calib = draw(n_calib)
    return [calib[i : i + 64] for i in range(0, n_calib, 64)], draw(n_test)


def gpt2(seed: int):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert(seed: int):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(cfg).eval()


def token_data(seed: int, as_dict: bool):
    """4 calibration batches of 4×16 token ids and 16 held-out sequences."""
    g = torch.Generator().manual_seed(3000 + seed)
    ids = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(4)]
    test = torch.randint(0, 64, (16, 16), generator=g)
    if as_dict:
        return [{"input_ids": i} for i in ids], {"input_ids": test}
    return ids, test


@torch.no_grad()
def outputs(model: nn.Module, x) -> torch.Tensor:
    o = model(**x) if isinstance(x, dict) else model(x)
    if hasattr(o, "logits"):
        return o.logits
    if hasattr(o, "last_hidden_state"):
        return o.last_hidden_state
    return o


def output_mse(dense: nn.Module, compressed: nn.Module, x) -> float:
    return float(((outputs(dense, x) - outputs(compressed, x)) ** 2).mean())


def compressed_mse(model, calib, test, recipe) -> float:
    c = copy.deepcopy(model)
    compress(c, calib, recipe, quiet=True)
    return output_mse(model, c, test)


class Bomb(nn.Module):
    """Identity that raises on its ``fuse``-th call (a forward failing mid-calibration)."""

    def __init__(self, fuse: int) -> None:
        super().__init__()
        self.fuse = fuse
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.fuse:
            raise RuntimeError("boom")
        return x


class Block(nn.Module):
    def __init__(self, d: int, fuse: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.bomb = Bomb(fuse) if fuse is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.bomb(torch.relu(self.fc1(x))))


class Blocks(nn.Module):
    """A hand-built two-block residual network (sequential mode finds ``blocks``)."""

    def __init__(self, d: int = 8, fuse: int | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList([Block(d), Block(d, fuse)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name!r}"
        assert not m._forward_hooks, f"forward hook left on {name!r}"
        assert not m._backward_hooks, f"backward hook left on {name!r}"


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def is_nm(W: torch.Tensor, n: int, m: int) -> bool:
    """Every run of ``m`` consecutive weights along a row has at least ``n`` zeros."""
    groups = W.reshape(W.shape[0], -1, m)
    return bool(((groups == 0).sum(-1) >= n).all())


# ------------------------------------------------------------------------------ no-op recipe


def test_noop_recipe_leaves_outputs_bit_identical_and_skips_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).eval()
    calib, test = cnn_data(0, 32, 16)
    dense = copy.deepcopy(model)
    ref = outputs(model, test)
    report = compress(model, calib, {"sparsity": 0.0, "bn_recalibration": True}, quiet=True)
    assert torch.equal(outputs(model, test), ref)
    assert_same_state(model, dense)
    by_name = {r.name: r for r in report.layers}
    # BatchNorm is reported too (not a matrix product); the two real layers asked nothing
    assert {"0", "4"} <= set(by_name)
    for name in ("0", "4"):
        assert by_name[name].status == "skipped"
        assert by_name[name].reason == NOTHING
    assert all(r.status == "skipped" and r.reason for r in report.layers)
    s = report.summary()
    assert s["compressed"] == 0 and s["sparsity"] == 0.0
    assert_no_hooks(model)


# ------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("mode", ["independent", "sequential"])
@pytest.mark.parametrize("fuse", [1, 2, 3])
def test_exception_mid_forward_removes_hooks_and_leaves_weights(mode, fuse):
    """A forward raising in batch ``fuse - 1`` (independent) or in block 1 after block 0 was
    compressed (sequential): the error names the batch, no hook is left anywhere, the weights,
    buffers and train/eval modes are as before and nothing is recorded on the model."""
    torch.manual_seed(fuse)
    net = Blocks(fuse=fuse).train()
    before = copy.deepcopy(net)
    calib = [torch.randn(6, 4) for _ in range(3)]
    recipe = {"sparsity": 0.5, "calibration": {"mode": mode}}
    with pytest.raises(CalibrationError, match=r"batch \d") as err:
        compress(net, calib, recipe, quiet=True)
    assert "boom" in str(err.value)
    assert err.value.batch is not None
    if mode == "independent":
        assert err.value.batch == fuse - 1
    assert_no_hooks(net)
    assert_same_state(net, before)
    assert all(m.training for m in net.modules())
    assert "_optbrain" not in net.__dict__
    # the model still works and the same call succeeds once the fault is gone
    net.blocks[1].bomb.fuse = 10**9
    report = compress(net.eval(), calib, recipe, quiet=True)
    assert report.summary()["compressed"] == 6
    assert_no_hooks(net)


def test_nothing_to_compress():
    with pytest.raises(ValueError, match="nothing to compress"):
        compress(nn.Sequential(nn.ReLU()), [torch.randn(2, 3)], {"sparsity": 0.5}, quiet=True)


def test_forward_failure_names_the_batch_and_leaves_model():
    model = mlp(0)
    before = copy.deepcopy(model)
    calib = [torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 15)]
    with pytest.raises(CalibrationError, match="calibration batch 2") as err:
        compress(model, calib, {"sparsity": 0.5}, quiet=True)
    assert err.value.batch == 2
    assert_same_state(model, before)
    assert_no_hooks(model)


def test_nan_activation_names_the_layer():
    model = mlp(0)
    before = copy.deepcopy(model)
    bad = torch.randn(8, 16)
    bad[3, 5] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="layer '0'") as err:
        compress(model, [torch.randn(8, 16), bad], {"sparsity": 0.5}, quiet=True)
    assert err.value.layer == "0" and err.value.batch == 1
    assert_same_state(model, before)
    assert_no_hooks(model)

    # an Inf produced inside the network is reported at the first layer that sees it
    model.eval()
    with torch.no_grad():
        model[2].bias[0] = float("inf")
    with pytest.raises(NonFiniteActivationError, match="layer '4'"):
        compress(model, [torch.randn(8, 16)], {"sparsity": 0.5}, quiet=True)


@pytest.mark.parametrize("empty", [[], iter(())])
def test_empty_calibration(empty):
    model = mlp(0)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="calibration is empty"):
        compress(model, empty, {"sparsity": 0.5}, quiet=True)
    assert_same_state(model, before)


def test_recipe_typos_name_the_key_or_pattern():
    model = mlp(0)
    calib, _ = mlp_data(0, 64)
    with pytest.raises(RecipeError, match="unknown key 'sparsty'.*did you mean 'sparsity'"):
        compress(model, calib, {"sparsty": 0.5}, quiet=True)
    with pytest.raises(RecipeError, match=r"calibration: unknown key 'sample'"):
        compress(model, calib, {"sparsity": 0.5, "calibration": {"sample": 8}}, quiet=True)
    recipe = {"rules": [{"targets": ["0", "encoder.*"], "sparsity": 0.5}]}
    with pytest.raises(ValueError, match=r"rules\[0\]\.targets 'encoder\.\*' matches no layer"):
        compress(model, calib, recipe, quiet=True)
    assert_same_state(model, mlp(0))


class Counted:
    """Calibration batches that count how often they are read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@pytest.mark.parametrize(
    "recipe,match",
    [
        ({"sparsity": 0.5, "options": {"guard": "x"}}, r"rules\[0\] on layer '0'.*guard"),
        ({"sparsity": 0.5, "method": "auto", "options": {"scope": "column"}}, "auto.*scope"),
        ({"bits": 4, "method": "obd"}, "obd.*cannot quantize"),
        ({"bits": 4, "group_size": 8, "method": "gptq", "options": {"clip_search": True}},
         "static_groups"),
        ({"bits": 1}, "bits=1 needs sym: false"),
        ({"pattern": "block2", "sparsity": 0, "bits": 4}, "needs a sparsity > 0"),
    ],
)  # fmt: skip
def test_bad_method_options_fail_before_any_calibration_pass(recipe, match):
    """A wrong option value (or a method that cannot take the settings) is an error naming the
    rule and the layer before the calibration data are read, and the model is unchanged."""
    model = mlp(0)
    calib, _ = mlp_data(0, 64)
    data = Counted(list(calib))
    with pytest.raises(ValueError, match=match):
        compress(model, data, recipe, quiet=True)
    assert data.reads == 0
    assert_same_state(model, mlp(0))
    compress(model, data, {"sparsity": 0.5}, quiet=True)  # the count sees a real run
    assert data.reads > 0


def test_recipe_not_fitting_a_layer_is_skipped_with_reason_others_compressed():
    """2:4 on a Linear with 9 input columns cannot be done: that layer stays dense and says why,
    the next layer (16 columns) gets an exact 2:4 pattern."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    dense = copy.deepcopy(model)
    report = compress(model, [torch.randn(64, 9)], {"pattern": "2:4"}, quiet=True)
    r0, r2 = (next(r for r in report.layers if r.name == n) for n in ("0", "2"))
    assert r0.status == "skipped"
    assert "does not fit" in r0.reason and "9 columns" in r0.reason and "2:4" in r0.reason
    assert torch.equal(model[0].weight, dense[0].weight)
    assert r2.status == "compressed" and r2.pattern == "2:4" and r2.sparsity == 0.5
    assert is_nm(model[2].weight, 2, 4)
    assert float((model[2].weight == 0).float().mean()) == 0.5


def test_samples_limit_the_calibration():
    """``calibration.samples: 20`` over batches of 8 uses 8 + 8 + 4 samples: the model sees
    exactly those, and the report says 20 tokens per Linear (20·36 per conv position)."""
    model = mlp(0)
    seen: list[int] = []
    h = model[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    calib = [torch.randn(8, 16) for _ in range(5)]
    try:
        report = compress(
            model, calib, {"sparsity": 0.5, "calibration": {"samples": 20}}, quiet=True
        )
    finally:
        h.remove()
    assert seen == [8, 8, 4]
    assert [r.tokens for r in report.layers] == [20, 20, 20]
    assert report.metadata["calibration_batches"] == 3

    conv = cnn(0)
    calib, _ = cnn_data(0, 64)
    report = compress(
        conv, calib, {"bits": 4, "calibration": {"samples": 10}, "targets": ["0"]}, quiet=True
    )
    rec = next(r for r in report.layers if r.name == "0")
    assert rec.tokens == 10 * 6 * 6

    # dict batches (transformers): every tensor of the last batch is cut, 4 + 2 sequences of 16
    model = gpt2(0)
    calib, _ = token_data(0, as_dict=True)
    for b in calib:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
    recipe = {
        "sparsity": 0.5,
        "targets": ["transformer.h.0.attn.c_attn"],
        "calibration": {"samples": 6},
    }
    report = compress(model, calib, recipe, quiet=True)
    rec = next(r for r in report.layers if r.name == "transformer.h.0.attn.c_attn")
    assert rec.tokens == 6 * 16 and report.metadata["calibration_batches"] == 2


# ------------------------------------------------------------------------------ progress


def test_progress_quiet_and_lines(capsys):
    model = mlp(0)
    calib, _ = mlp_data(0, 64)
    compress(copy.deepcopy(model), calib, {"sparsity": 0.5}, quiet=True)
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out == ""

    compress(copy.deepcopy(model), calib, {"sparsity": 0.5})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    for i, (line, name) in enumerate(zip(lines, ["0", "2", "4"], strict=True), 1):
        assert line.startswith(f"[compress] {i}/3 {name} "), line
        assert "elapsed" in line


def test_progress_within_layer_and_cost_model_eta(capsys, monkeypatch):
    from optbrain.pipeline import compress as compress_mod
    from optbrain.pipeline import progress

    monkeypatch.setattr(progress, "WITHIN_AFTER", 0.0)  # show steps however short
    monkeypatch.setattr(compress_mod, "NOTE_SOLVING_OVER", 0.0)
    model = mlp(0)
    calib, _ = mlp_data(0, 64)
    recipe = {"method": "obc", "sparsity": 0.5, "options": {"lazy": 2}}  # a tick every 2 steps
    compress(copy.deepcopy(model), calib, recipe)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[compress] exact solving of 3 layer(s) predicted ~"), lines[0]
    inner = [ln for ln in lines if "of the step" in ln]
    assert inner and all(ln.startswith("[compress] ") for ln in inner)
    assert all("(predicted ~" in ln for ln in inner)
    done = [ln for ln in lines if "/3 " in ln]
    assert [ln.split()[1] for ln in done] == ["1/3", "2/3", "3/3"]
    assert "solving left ~" in done[0] and "solving left" not in done[-1]

    # the fast solvers have no cost model: no note, no ETA, no lines inside a layer
    compress(copy.deepcopy(model), calib, {"method": "sparsegpt", "sparsity": 0.5})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and not any("predicted" in ln or "left" in ln for ln in lines)


# ------------------------------------------------------------------------------ OBC vs baselines

BUDGETS = {
    "50%": ({"sparsity": 0.5}, "magnitude"),
    "4-bit": ({"bits": 4}, "rtn"),
    "2:4": ({"pattern": "2:4"}, "magnitude"),
}


# Measured ratio mse(obc) / mse(baseline) on held-out inputs, seeds 0-9:
#   MLP    50% 0.16-0.29, 4-bit 0.33-0.56, 2:4 0.23-0.39
#   CNN    50% 0.01-0.40 (seed 5: 0.40, the rest < 0.13), 4-bit 0.01-0.09, 2:4 < 0.01
#   GPT-2  50% 0.25-0.33, 4-bit 0.33-0.45, 2:4 0.32-0.44
MLP_BOUND = {"50%": 0.45, "4-bit": 0.8, "2:4": 0.6}
CNN_BOUND = {"50%": 0.6, "4-bit": 0.3, "2:4": 0.1}
GPT2_BOUND = {"50%": 0.5, "4-bit": 0.65, "2:4": 0.6}


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_obc_beats_baselines_on_mlp(budget):
    spec, baseline = BUDGETS[budget]
    for seed in range(3):
        model = mlp(seed)
        calib, test = mlp_data(seed)
        obc = compressed_mse(model, calib, test, {"method": "obc", **spec})
        base = compressed_mse(model, calib, test, {"method": baseline, **spec})
        assert 0 < obc < MLP_BOUND[budget] * base, (seed, obc, base)


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_obc_beats_baselines_on_cnn_with_grouped_and_depthwise_convs(budget):
    spec, baseline = BUDGETS[budget]
    for seed in range(2):
        model = cnn(seed)
        calib, test = cnn_data(seed)
        obc = compressed_mse(model, calib, test, {"method": "obc", **spec})
        base = compressed_mse(model, calib, test, {"method": baseline, **spec})
        assert 0 < obc < CNN_BOUND[budget] * base, (seed, obc, base)


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_obc_beats_baselines_on_gpt2(budget):
    spec, baseline = BUDGETS[budget]
    for seed in range(2):
        model = gpt2(seed)
        calib, test = token_data(seed, as_dict=True)
        obc = compressed_mse(model, calib, test, {"method": "obc", **spec})
        base = compressed_mse(model, calib, test, {"method": baseline, **spec})
        assert 0 < obc < GPT2_BOUND[budget] * base, (seed, obc, base)


# Measured mse(sequential) / mse(independent), seeds 0-9, GPT-2 and BERT, 50% / 4-bit / 2:4:
# 0.87-1.15 (not reliably better on random-init models: bound 1.3); mse(sequential) /
# mse(magnitude or RTN): 0.10-0.46 (50% alone: at most 0.33; bound 0.5).
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_sequential_mode_on_transformer(kind):
    """Sequential mode: the first layers of block 0 see the same inputs in both modes (same
    weights, bit for bit); block 1 is calibrated on the compressed block 0 (other weights);
    the result is about as good as independent mode and far better than magnitude."""
    build = gpt2 if kind == "gpt2" else bert
    model = build(0)
    # GPT-2 from dicts of keyword arguments, BERT from plain input_ids tensors
    calib, test = token_data(0, as_dict=kind == "gpt2")
    spec = {"method": "obc", "sparsity": 0.5}
    indep, seq = copy.deepcopy(model), copy.deepcopy(model)
    compress(indep, calib, spec, quiet=True)
    report = compress(seq, calib, {**spec, "calibration": {"mode": "sequential"}}, quiet=True)
    assert report.metadata["calibration_mode"] == "sequential"
    blocks = "transformer.h" if kind == "gpt2" else "encoder.layer"
    first = f"{blocks}.0.attn.c_attn" if kind == "gpt2" else f"{blocks}.0.attention.self.query"
    si, ss = dict(indep.named_modules()), dict(seq.named_modules())
    assert torch.equal(si[first].weight, ss[first].weight)
    in_block1 = [n for n in ss if n.startswith(f"{blocks}.1.") and hasattr(ss[n], "weight")]
    assert any(not torch.equal(si[n].weight, ss[n].weight) for n in in_block1)
    comp = [r for r in report.layers if r.status == "compressed"]
    assert len(comp) == (8 if kind == "gpt2" else 13)
    assert all(abs(r.sparsity - 0.5) < 1e-9 for r in comp)
    mse_i, mse_s = output_mse(model, indep, test), output_mse(model, seq, test)
    mse_m = compressed_mse(model, calib, test, {"method": "magnitude", "sparsity": 0.5})
    assert 0 < mse_s < 1.3 * mse_i, (mse_s, mse_i)
    assert mse_s < 0.5 * mse_m, (mse_s, mse_m)


def test_sequential_mode_without_blocks_goes_layer_by_layer():
    """An MLP has no block list: sequential mode compresses layer by layer, each layer's
    Hessian from the inputs of the model with the layers before it already compressed. The
    first layer is then the same as in independent mode, and each later layer's measured loss
    is re-derived from the inputs it gets in the compressed model (not the dense one)."""
    model = mlp(2, act=nn.Tanh)
    calib, _ = mlp_data(2, n_calib=128)
    spec = {"method": "obc", "sparsity": 0.5}
    indep, seq = copy.deepcopy(model), copy.deepcopy(model)
    compress(indep, calib, spec, quiet=True)
    report = compress(seq, calib, {**spec, "calibration": {"mode": "sequential"}}, quiet=True)
    assert report.metadata["calibration_mode"] == "sequential"
    assert torch.equal(indep[0].weight, seq[0].weight)
    assert not torch.equal(indep[2].weight, seq[2].weight)
    X = torch.cat(calib)
    seen = _layer_inputs(seq, ["2", "4"], X)  # inputs in the compressed model
    dense_seen = _layer_inputs(model, ["2", "4"], X)
    for r in report.layers[1:]:
        D = (model.get_submodule(r.name).weight - seq.get_submodule(r.name).weight).detach()
        D = D.double()
        for inputs, same in ((seen, True), (dense_seen, False)):
            x = inputs[r.name].double()
            mine = float(((x @ D.T) ** 2).sum()) / len(x)
            assert (mine == pytest.approx(r.measured_loss, rel=1e-6)) is same, r.name


# ------------------------------------------------------------------------------ report records


def _layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    hs = [
        mods[n].register_forward_pre_hook(lambda m, a, n=n: got.__setitem__(n, a[0])) for n in names
    ]
    try:
        outputs(model, x)
    finally:
        for h in hs:
            h.remove()
    return got


@pytest.mark.parametrize(
    "spec",
    [
        {"sparsity": 0.5},
        {"bits": 4},
        {"pattern": "2:4"},
        {"pattern": "2:4", "bits": 4},
        {"sparsity": 0.5, "bits": 3, "damp": 1e-4},
    ],
    ids=["50%", "4bit", "2:4", "2:4+4bit", "50%+3bit"],
)
def test_predicted_vs_measured_layer_losses(spec):
    """Per record: ``measured_loss = ||(W - Ŵ) Xᵀ||² / N`` re-derived here in float64 from the
    dense inputs (rel 1e-6), and the solver's prediction under the damped Hessian obeys
    ``predicted = measured + ½ λ ||W - Ŵ||²`` (rel 1e-4), so ``measured ≤ predicted``."""
    model = mlp(1, act=nn.Tanh)  # tanh: no dead inputs, H has a full live diagonal
    calib, _ = mlp_data(1, n_calib=128)
    dense = copy.deepcopy(model)
    report = compress(model, calib, {"method": "obc", **spec}, quiet=True)
    X = torch.cat(calib)
    inputs = _layer_inputs(dense, ["0", "2", "4"], X)
    assert len(report.layers) == 3
    for r in report.layers:
        assert r.status == "compressed" and r.tokens == 128
        w, w_hat = (m.get_submodule(r.name).weight.detach() for m in (dense, model))
        D = w.double() - w_hat.double()
        x = inputs[r.name].double()
        mine = float(((x @ D.T) ** 2).sum()) / len(x)
        assert r.measured_loss == pytest.approx(mine, rel=1e-6), r.name
        expect = r.measured_loss + 0.5 * r.damping * float((D**2).sum())
        assert r.predicted_loss == pytest.approx(expect, rel=1e-4), r.name
        assert r.measured_loss <= r.predicted_loss * (1 + 1e-6)
        assert r.damping > 0
    s = report.summary()
    assert s["measured_loss"] == pytest.approx(sum(r.measured_loss for r in report.layers))


def test_cnn_per_group_records():
    """Grouped conv (2 groups) and depthwise conv (8 groups) get one record per group, with the
    group's slice shape, its sparsity as counted in the weight, and a predicted loss that
    matches that slice's change: ``predicted - measured = ½ λ_g ||ΔW_g||²``."""
    model = cnn(0)
    dense = copy.deepcopy(model)
    calib, _ = cnn_data(0)
    report = compress(model, calib, {"method": "obc", "sparsity": 0.5}, quiet=True)
    recs: dict[str, list] = {}
    for r in report.layers:
        recs.setdefault(r.name, []).append(r)
    assert [len(recs[n]) for n in ("0", "2", "4", "7")] == [1, 2, 8, 1]
    assert recs["0"][0].group is None and recs["7"][0].group is None
    for name, rows, cols in (("2", 4, 36), ("4", 1, 9)):
        w = model.get_submodule(name).weight.detach()
        dw = dense.get_submodule(name).weight.detach() - w
        assert sum(r.numel for r in recs[name]) == w.numel()
        for g, r in enumerate(recs[name]):
            assert r.group == g and r.shape == (rows, cols) and r.label == f"{name}[g{g}]"
            assert r.tokens == 128 * 36
            wg = w[g * rows : (g + 1) * rows].reshape(rows, -1)
            zeros = float((wg == 0).double().mean())
            assert r.sparsity == pytest.approx(zeros)
            assert abs(zeros - 0.5) <= 0.5 / cols + 1e-9
            dg = dw[g * rows : (g + 1) * rows].double()
            gap = 0.5 * r.damping * float((dg**2).sum())
            assert r.predicted_loss == pytest.approx(r.measured_loss + gap, rel=1e-4)
    assert report.summary()["sparsity"] == pytest.approx(
        sum((m.weight == 0).sum().item() for m in model.modules() if hasattr(m, "weight"))
        / sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight")),
        abs=1e-9,
    )
