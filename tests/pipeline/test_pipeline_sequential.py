"""Sequential mode: block-2 Hessians come from block-1's compressed outputs (checked by hand),
inside a block earlier layers are compressed first, broken chains are re-captured, and a
no-op compress leaves the model unchanged."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optbrain.adapters import adapter_for, find_layers
from optbrain.pipeline import (
    CalibrationError,
    collect_hessians,
    find_blocks,
    sequential_compress,
)
from optbrain.pipeline.sequential import _layer_groups

DT = torch.float64


def hess(X):
    X = X.reshape(-1, X.shape[-1])
    return 2.0 * X.T @ X / X.shape[0]


def q(w):
    """The 'compression' used in these tests: round to a grid of 1/4 (changes every weight)."""
    return torch.round(w * 4) / 4


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, h, scale=None):
        r = self.fc2(torch.relu(self.fc1(h if scale is None else h * scale)))
        return h + r


class TinyNet(nn.Module):
    def __init__(self, d=4, gap=None):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 2)
        self.gap = gap

    def forward(self, x, scale=None):
        h = self.embed(x)
        h = self.blocks[0](h, scale=scale)
        if self.gap == "hidden":  # block 1's input is not block 0's output
            h = 2 * h + 1
        if self.gap == "kwarg":  # block 1 gets another keyword argument than block 0
            scale = scale * 3
        h = self.blocks[1](h, scale=scale)
        return self.head(h)


def make(gap=None):
    torch.manual_seed(0)
    net = TinyNet(gap=gap).to(DT)
    calib = [
        {"x": torch.randn(2, 5, 3, dtype=DT), "scale": torch.tensor(0.5, dtype=DT)}
        for _ in range(3)
    ]
    return net, calib


def rounding_compress(record):
    def fn(name, module, hessians):
        record[name] = [a.hessian() for a in hessians]
        a = adapter_for(module)
        a.set_weight(0, q(a.weight(0)))

    return fn


def hand(net, calib, order, gap=None):
    """Hessians computed by hand with functional ops and rounded weights."""
    P = {n: p.detach() for n, p in net.named_parameters()}

    def lin(name, h, compressed):
        w = P[name + ".weight"]
        return F.linear(h, q(w) if compressed else w, P[name + ".bias"])

    X = {k: [] for k in ("0.fc1", "0.fc2", "1.fc1", "1.fc2")}
    for b in calib:
        s = b["scale"]
        h = lin("embed", b["x"], False)
        for k in (0, 1):
            if k == 1 and gap == "hidden":
                h = 2 * h + 1
            if k == 1 and gap == "kwarg":
                s = s * 3
            X[f"{k}.fc1"].append(h * s)
            a = torch.relu(lin(f"blocks.{k}.fc1", h * s, order == "sequential"))
            X[f"{k}.fc2"].append(a)
            a = torch.relu(lin(f"blocks.{k}.fc1", h * s, True))  # the block as compressed
            h = h + lin(f"blocks.{k}.fc2", a, True)
    return {f"blocks.{k}": [hess(torch.cat(v))] for k, v in X.items()}


@pytest.mark.parametrize("order", ["sequential", "parallel"])
@pytest.mark.parametrize("gap", [None, "hidden", "kwarg"])
def test_block2_hessians_come_from_compressed_block1(order, gap, monkeypatch):
    import optbrain.pipeline.sequential as seq

    captured = []
    real = seq._capture
    monkeypatch.setattr(seq, "_capture", lambda *a: captured.append(a[2]) or real(*a))
    net, calib = make(gap)
    ref = hand(net, calib, order, gap)
    other = hand(net, calib, "parallel" if order == "sequential" else "sequential", gap)
    rec = {}
    done = sequential_compress(
        net, calib, find_blocks(net), None, rounding_compress(rec), order=order
    )
    assert done == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    for name, (H,) in ref.items():
        torch.testing.assert_close(rec[name][0], H, rtol=1e-12, atol=1e-12, msg=name)
    # block 1's inputs: chained from block 0's outputs, or re-captured when there is a gap
    assert captured == ["blocks.0"] * 3 + ["blocks.1"] * 3 * (gap is not None)
    # the sequential and parallel inner orders really differ
    assert not torch.allclose(rec["blocks.0.fc2"][0], other["blocks.0.fc2"][0])
    # embed / head (outside blocks) untouched, block weights rounded
    assert torch.equal(net.head.weight, make(gap)[0].head.weight)
    assert torch.equal(net.blocks[1].fc2.weight, q(make(gap)[0].blocks[1].fc2.weight))


def test_generator_calibration_with_recapture():
    net, calib = make(gap="hidden")
    ref = hand(net, calib, "sequential", gap="hidden")
    rec = {}
    sequential_compress(net, (b for b in calib), None, None, rounding_compress(rec))
    for name, (H,) in ref.items():
        torch.testing.assert_close(rec[name][0], H, rtol=1e-12, atol=1e-12)


def test_noop_compress_leaves_model_unchanged_and_equals_independent_mode():
    net, calib = make()
    net.train()
    net.config = SimpleNamespace(use_cache=True)
    before = copy.deepcopy(net.state_dict())
    out0 = [net(**b) for b in calib]
    indep = collect_hessians(net, find_layers(net)[0], calib)
    seen = {}

    def noop(name, module, hs):
        assert not net.training and net.config.use_cache is False
        seen[name] = hs

    sequential_compress(net, calib, None, lambda blk: {"fc2": blk.fc2, "fc1": blk.fc1}, noop)
    assert list(seen) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for b, o in zip(calib, out0, strict=True):
        assert torch.equal(net(**b), o)
    for name, hs in seen.items():
        torch.testing.assert_close(
            hs[0].hessian(), indep[name][0].hessian(), rtol=1e-12, atol=1e-12
        )
        assert hs[0].tokens == indep[name][0].tokens == 30
    assert net.training and net.config.use_cache is True
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_errors_restore_state_and_name_things():
    net, calib = make()
    net.config = SimpleNamespace(use_cache=True)

    def bad(name, module, hs):
        raise KeyError("compress failed")

    with pytest.raises(KeyError):
        sequential_compress(net, calib, None, None, bad)
    assert net.training and net.config.use_cache is True
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())

    with pytest.raises(ValueError, match="calibration is empty"):
        sequential_compress(net, [], None, None, bad)
    with pytest.raises(CalibrationError, match="calibration batch 1 failed in forward"):
        sequential_compress(net, [calib[0], {"x": torch.zeros(2, 7)}], None, None, bad)

    class Twice(TinyNet):
        def forward(self, x, scale=None):
            return self.blocks[1](self.blocks[0](self.blocks[0](self.embed(x))))

    torch.manual_seed(0)
    with pytest.raises(CalibrationError, match="'blocks.0' ran 2 times"):
        sequential_compress(Twice(), [torch.randn(2, 3)], None, None, bad)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_find_blocks():
    net, _ = make()
    assert [n for n, _ in find_blocks(net)] == ["blocks.0", "blocks.1"]
    assert [n for n, _ in find_blocks(net, r"blocks\.\d+")] == ["blocks.0", "blocks.1"]
    assert [n for n, _ in find_blocks(net, r"blocks(\.\d+)?")] == ["blocks"]  # outermost
    with pytest.raises(ValueError, match="no module name matches"):
        find_blocks(net, r"layers\.\d+")
    with pytest.raises(ValueError, match="no block list"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="inside block"):
        sequential_compress(
            net,
            [torch.zeros(1, 3)],
            find_blocks(net, r"blocks(\.0)?") + [("blocks.0", net.blocks[0])],
            None,
            lambda *a: None,
        )


# --------------------------------------------------------------------------- transformers ----
def _tiny_hf(kind):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = [torch.randint(0, 50, (2, 6)) for _ in range(2)]
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=2,
            vocab_size=50,
            n_positions=8,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(cfg)
        calib = [{"input_ids": i} for i in ids]
    else:
        cfg = transformers.BertConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            intermediate_size=24,
            vocab_size=50,
            max_position_embeddings=8,
        )
        model = transformers.BertModel(cfg)
        mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
        calib = [{"input_ids": i, "attention_mask": mask} for i in ids]
    return model.eval(), calib


def _out(model, b):
    o = model(**b)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hf_noop_sequential_equals_independent(kind):
    model, calib = _tiny_hf(kind)
    blocks = find_blocks(model)
    assert [n for n, _ in blocks] == (
        ["transformer.h.0", "transformer.h.1"]
        if kind == "gpt2"
        else ["encoder.layer.0", "encoder.layer.1"]
    )
    ref_out = [_out(model, b) for b in calib]
    indep = collect_hessians(model, find_layers(model)[0], calib)
    seen = {}
    sequential_compress(model, calib, blocks, None, lambda n, m, hs: seen.__setitem__(n, hs))
    assert len(seen) == (8 if kind == "gpt2" else 12)
    for name, hs in seen.items():
        assert torch.equal(hs[0].hessian(), indep[name][0].hessian()), name
    for b, o in zip(calib, ref_out, strict=True):
        assert torch.equal(_out(model, b), o)


def test_hf_layer_groups_share_inputs():
    model, calib = _tiny_hf("bert")
    block = model.encoder.layer[0]
    captured = []
    h = block.register_forward_pre_hook(
        lambda m, a, k: captured.append((a, dict(k))), with_kwargs=True
    )
    with torch.no_grad():
        model(**calib[0])
    h.remove()
    adapters = {n: adapter_for(m) for n, m in find_layers(block)[0].items()}
    groups, once = _layer_groups(
        block, "b", adapters, captured[0], torch.device("cpu"), "sequential"
    )
    assert once
    assert groups == [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"],
        ["intermediate.dense"],
        ["output.dense"],
    ]
