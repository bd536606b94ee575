"""optbrain.shrink: structured masks removed for real, outputs unchanged, smaller and cheaper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optbrain
from optbrain.pipeline.cost import count_macs, count_params
from optbrain.pipeline.state import compressed_state

pytest.importorskip("torch_pruning")


class ResCNN(nn.Module):
    """conv-BN-ReLU, a residual block (two convs tie their channels through the add), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.c4 = nn.Conv2d(24, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.b1(self.c1(x)))
        a = torch.relu(self.b2(self.c2(a))) + a
        b = torch.relu(self.b3(self.c3(a)))
        c = torch.relu(self.c4(b))
        return self.fc(c.mean((2, 3)))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _compress(model, calib, recipe):
    optbrain.compress(model.eval(), calib, recipe, quiet=True)
    with torch.no_grad():
        return model


def _check(model, x, out_of):
    with torch.no_grad():
        masked = out_of(model(**x) if isinstance(x, dict) else model(x))
    p0, m0 = count_params(model), count_macs(model, x)
    rep = optbrain.shrink(model, x)
    with torch.no_grad():
        shrunk = out_of(model(**x) if isinstance(x, dict) else model(x))
    assert shrunk.shape == masked.shape
    rel = float((shrunk - masked).norm() / masked.norm())
    assert rel < 1e-5, rel
    assert count_params(model) < p0 and rep.params_after == count_params(model)
    assert count_macs(model, x) < m0 and rep.macs_after < rep.macs_before
    return rep


def test_cnn_bn_residual():
    torch.manual_seed(0)
    model = ResCNN().eval()
    _randomize_bn(model)
    calib = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    rules = {"rules": [{"targets": ["c2", "c3", "c4"], "method": "obc", "pattern": "channels",
                        "sparsity": 0.5}]}  # fmt: skip
    recipe = rules
    _compress(model, calib, recipe)
    rep = _check(model, calib[0], lambda y: y)
    # c4 reads a tensor no other layer reads: c3's rows and b3 shrink with it
    assert model.c4.in_channels == model.c3.out_channels == model.b3.num_features == 12
    # c2's input is the residual stream, also read by c3 and added back: only the channels
    # both consumers dropped go (from c1, b1, c2's rows, b2 and c3's columns alike)
    both = rep.removed["c2"]
    assert 0 < both < 8 and "c3" in rep.skipped
    stream = {model.c1.out_channels, model.b1.num_features, model.c2.in_channels,
              model.c2.out_channels, model.b2.num_features, model.c3.in_channels}  # fmt: skip
    assert stream == {16 - both}


def test_mlp_and_save_load(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(),  # noqa: E731
                                 nn.Linear(24, 5))  # fmt: skip
    model = make().eval()
    dense = make()
    dense.load_state_dict(model.state_dict())
    calib = [torch.randn(16, 12) for _ in range(4)]
    rules = [{"targets": ["2", "4"], "pattern": "channels", "sparsity": 0.5}]
    _compress(model, calib, {"rules": rules})
    rep = _check(model, calib[0], lambda y: y)
    assert rep.removed == {"2": 16, "4": 12}
    assert (
        model[0].out_features == 16 and model[2].in_features == 16 and model[2].out_features == 12
    )
    assert not rep.skipped
    out = optbrain.save(model, tmp_path / "run")
    loaded = optbrain.load(dense, out)
    assert loaded[2].weight.shape == (12, 16) and loaded[0].weight.shape == (16, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib[1]), model(calib[1]), rtol=0, atol=0)


def test_shared_consumer_left_alone():
    """Two layers read the same tensor; only one is structured: nothing can go, and it says why."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) + self.c(h)

    torch.manual_seed(0)
    model = Two().eval()
    calib = [torch.randn(16, 8) for _ in range(2)]
    rules = [{"targets": ["b"], "pattern": "channels", "sparsity": 0.5}]
    _compress(model, calib, {"rules": rules})
    rep = optbrain.shrink(model, calib[0])
    assert "b" in rep.skipped and "still read" in rep.skipped["b"]
    assert model.a.out_features == 16 and rep.params_after == rep.params_before


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_tiny_llama_ffn_neurons_and_heads(tmp_path):
    model = _tiny_llama()
    calib = [{"input_ids": torch.randint(0, 64, (2, 12))} for _ in range(4)]
    rules = [
        {"targets": ["re:.*down_proj"], "pattern": "channels", "sparsity": 0.25},
        {"targets": ["re:.*o_proj"], "pattern": "heads", "sparsity": 0.5},
    ]
    _compress(model, calib, {"rules": rules})
    rep = _check(model, calib[0], lambda y: y.logits)
    mlp, att = model.model.layers[0].mlp, model.model.layers[0].self_attn
    assert mlp.up_proj.out_features == mlp.gate_proj.out_features == 36 == mlp.down_proj.in_features
    assert att.q_proj.out_features == att.k_proj.out_features == att.o_proj.in_features == 16
    assert len(rep.removed) == 4 and not rep.skipped
    loaded = optbrain.load(_tiny_llama(), optbrain.save(model, tmp_path / "run"))
    assert loaded.model.layers[1].self_attn.v_proj.out_features == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded(**calib[1]).logits, model(**calib[1]).logits)


def test_bert_heads():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    calib = [{"input_ids": torch.randint(0, 64, (2, 12))} for _ in range(4)]
    rules = [
        {"targets": ["re:.*attention\\.output\\.dense"], "pattern": "heads", "sparsity": 0.5},
        {"targets": ["re:.*output\\.dense"], "ignore": ["re:.*attention.*"],
         "pattern": "channels", "sparsity": 0.25},
    ]  # fmt: skip
    _compress(model, calib, {"rules": rules})
    rep = _check(model, calib[0], lambda y: y.last_hidden_state)
    sa = model.encoder.layer[0].attention.self
    assert sa.query.out_features == 16 and sa.num_attention_heads == 2 and sa.all_head_size == 16
    assert model.encoder.layer[0].intermediate.dense.out_features == 36
    assert sum(1 for n in rep.removed if "attention" in n) == 2


def test_a_failed_check_puts_the_model_back(monkeypatch):
    """The output check fails (a tolerance of -1 cannot be met) and a later op raises: both
    times every module is as it was, sizes, attributes and outputs, and nothing is recorded."""
    from optbrain.pipeline import shrink as shrink_mod

    torch.manual_seed(0)
    model = ResCNN()
    _randomize_bn(model)
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    _compress(model, calib, {"method": "obc", "pattern": "channels", "sparsity": 0.5})
    x = calib[0]
    with torch.no_grad():
        before = model(x)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    feats = (model.c3.in_channels, model.b2.num_features, model.fc.in_features)
    state = compressed_state(model)
    with pytest.raises(shrink_mod.ShrinkCheckError, match="put back as it was"):
        optbrain.shrink(model, x, tol=-1.0)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shrink_mod, "count_macs", boom)  # after the channels are removed
    with pytest.raises(KeyboardInterrupt):
        optbrain.shrink(model, x)
    monkeypatch.undo()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert (model.c3.in_channels, model.b2.num_features, model.fc.in_features) == feats
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert state.shrink is None
    assert all(g.mask is not None for ls in state.layers.values() for g in ls.groups)
    rep = optbrain.shrink(model, x)  # and it still shrinks afterwards
    assert rep.removed and count_params(model) < rep.params_before
    # the first convolution reads the image: its input channels cannot go
    assert "model's own input" in rep.skipped["c1"] and model.c1.in_channels == 3


def test_gpt2_conv1d_heads_and_ffn_neurons(tmp_path):
    """GPT-2 (transformers' Conv1D, traced by neither torch.fx nor torch-pruning): heads and FFN
    neurons removed by hand, outputs unchanged, save / load replays it on a fresh model."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100)

    def fresh():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    model = fresh()
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 100, (4, 16), generator=g)} for _ in range(2)]
    rules = [
        {"targets": ["re:.*attn.c_proj"], "method": "obc", "pattern": "heads", "sparsity": 0.5},
        {"targets": ["re:.*mlp.c_proj"], "method": "obc", "pattern": "channels", "sparsity": 0.25},
        {"targets": ["re:.*attn.c_attn"], "method": "obc", "pattern": "channels", "sparsity": 0.25},
    ]
    optbrain.compress(model, calib, {"rules": rules}, quiet=True)
    rep = _check(model, calib[0], lambda o: o.logits)
    for i in range(2):
        assert rep.removed[f"transformer.h.{i}.attn.c_proj"] == 2
        assert rep.removed[f"transformer.h.{i}.mlp.c_proj"] == 64
        assert (
            "dependency graph could not be traced" in rep.skipped[f"transformer.h.{i}.attn.c_attn"]
        )
    att = model.transformer.h[0].attn
    assert att.num_heads == 2 and att.c_attn.weight.shape == (64, 96)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (64, 192)
    optbrain.save(model, tmp_path / "run")
    again = optbrain.load(fresh(), tmp_path / "run")
    x = calib[1]
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, model(**x).logits, rtol=0, atol=0)
