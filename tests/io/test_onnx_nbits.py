"""``export_onnx(..., matmul_nbits=True)``: linear layers on grids of up to 4 bits become ONNX
Runtime's fused ``com.microsoft.MatMulNBits`` (``optbrain.io.onnx_nbits``):

* the packed codes, scales and zero points decode (here, in numpy, independently of the
  exporter) to the torch compressed weights bit for bit;
* ONNX Runtime's outputs are within ``atol = rtol = 1e-5`` of torch's at ``accuracy_level=0``
  (float32 arithmetic), on 2-D and 3-D inputs, per channel and per group, symmetric or not,
  pruned + quantized; at level 4 (int8 activations) within 2% relative;
* a GPT-2 (Hugging Face ``Conv1D`` layers, weight ``(in, out)``) and a Llama export the same
  way (with their attention mask: without one, transformers' mask code is not traceable, and
  the error says to pass it);
* what MatMulNBits cannot take (8 bits, a convolution, a group size that is not a power of two)
  keeps the ``DequantizeLinear`` path, and ``info["dequantize_linear"]`` says why;
* bad options are a ValueError before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="format='onnx' needs the onnx package (extra 'deploy')")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (extra 'deploy')")

from onnx import numpy_helper  # noqa: E402
from ort_helpers import rel as _rel  # noqa: E402
from ort_helpers import session as _session  # noqa: E402

from optbrain.api import compress  # noqa: E402
from optbrain.io import export  # noqa: E402
from optbrain.io.onnx import export_onnx  # noqa: E402

ATOL = RTOL = 1e-5
INT8_REL = 0.02
RECIPES = {
    "gptq4": {"method": "gptq", "bits": 4},
    "gptq4-asym-g32": {"method": "gptq", "bits": 4, "sym": False, "group_size": 32},
    "rtn3": {"method": "rtn", "bits": 3},
    "obc-2:4-4bit": {"method": "obc", "pattern": "2:4", "bits": 4},
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16)
    ).eval()


def batches(shape: tuple[int, ...], n: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    return _session(path).run(None, {"input": x.numpy()})[0]


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("shape", [(8, 64), (2, 5, 64)], ids=["2d", "3d"])
def test_matmul_nbits_matches_the_compressed_model(
    tmp_path: Path, recipe: str, shape: tuple[int, ...]
) -> None:
    model = mlp()
    calib = batches(shape)
    compress(model, calib, RECIPES[recipe], quiet=True)
    res = export_onnx(model, tmp_path / "m.onnx", example_inputs=calib[0], matmul_nbits=True)
    assert res.info["matmul_nbits"] == ["0", "2", "4"] and res.info["dequantize_linear"] == {}
    ops = _ops(tmp_path / "m.onnx")
    assert ops.count("MatMulNBits") == 3 and "DequantizeLinear" not in ops
    x = batches((3, *shape[1:]), n=1, seed=9)[0]  # another batch: it is dynamic
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("features", "rule"),
    [(384, {"bits": 4}), (96, {"bits": 4, "sym": False, "group_size": 32})],
    ids=["per-channel-3-blocks", "g32-3-blocks"],
)
def test_odd_block_counts_and_repeated_channel_scales(tmp_path: Path, features, rule) -> None:
    """K = 384 per channel: one scale repeated over 3 blocks of 128; K = 96 in groups of 32:
    3 blocks, so the packed zero points of every row end in half a byte of padding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    calib = batches((16, features))
    rules = [{"targets": ["0"], "method": "gptq", **rule}]
    compress(model, calib, {"rules": rules}, quiet=True)
    export_onnx(model, tmp_path / "m.onnx", example_inputs=calib[0], matmul_nbits=True)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    (node,) = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["K"] // attrs["block_size"] == 3
    assert np.array_equal(_decode(graph, node), model[0].weight.detach().numpy())
    x = batches((5, features), n=1, seed=9)[0]
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), ref, atol=ATOL, rtol=RTOL)


def _decode(graph: onnx.GraphProto, node: onnx.NodeProto) -> np.ndarray:
    """The float weight ``(N, K)`` a MatMulNBits node computes with, decoded from its
    initializers as the operator's specification reads them (low nibble first)."""
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    N, K, block = a["N"], a["K"], a["block_size"]
    nb = K // block
    b = init[node.input[1]].reshape(N, nb, block // 2)
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(N, nb, block).astype(np.float32)
    scales = init[node.input[2]].reshape(N, nb, 1)
    zp = init[node.input[3]]
    zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(N, -1)[:, :nb].reshape(N, nb, 1)
    return ((q - zp.astype(np.float32)) * scales).reshape(N, K)


@pytest.mark.parametrize("recipe", ["gptq4", "gptq4-asym-g32"])
def test_packed_weights_decode_to_the_torch_weights_exactly(tmp_path: Path, recipe: str) -> None:
    model = mlp()
    compress(model, batches((8, 64)), RECIPES[recipe], quiet=True)
    res = export_onnx(
        model, tmp_path / "m.onnx", example_inputs=torch.randn(1, 64), matmul_nbits=True
    )
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 3
    for node, i in zip(nodes, (0, 2, 4), strict=True):
        W = model[i].weight.detach().numpy()
        assert np.array_equal(_decode(graph, node), W), i
    # per channel: 4.25 bits a weight with blocks of 64..128, + bias left as float
    limit = 0.14 if recipe == "gptq4" else 0.17
    assert 0.125 < res.ratio <= limit, res.ratio


def test_int8_accuracy_level_is_close_and_recorded(tmp_path: Path) -> None:
    model = mlp()
    calib = batches((8, 64))
    compress(model, calib, RECIPES["gptq4"], quiet=True)
    res = export(
        model, tmp_path / "m.onnx", format="onnx", example_inputs=calib[0], matmul_nbits=True,
        accuracy_level=4,
    )  # fmt: skip
    assert res.info["accuracy_level"] == 4
    levels = [
        onnx.helper.get_attribute_value(a)
        for n in onnx.load(str(tmp_path / "m.onnx")).graph.node
        for a in n.attribute
        if a.name == "accuracy_level"
    ]
    assert levels == [4, 4, 4]
    x = batches((16, 64), n=1, seed=5)[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert 0 < _rel(_run(tmp_path / "m.onnx", x), ref) < INT8_REL


def _causal_lm(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":  # Conv1D layers: weight (in, out)
        cfg = transformers.GPT2Config(
            vocab_size=100, n_layer=2, n_embd=32, n_head=2, n_positions=64, use_cache=False
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lms_export_as_matmul_nbits(tmp_path: Path, kind: str) -> None:
    model = _causal_lm(kind)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 100, (4, 16), generator=g) for _ in range(4)]
    rule = {"targets": ["re:.*(layers|h)\\.\\d+\\..*"], "method": "gptq", "bits": 4}
    compress(model, calib, {"rules": [rule]}, quiet=True)
    ids = calib[0][:1]
    with pytest.raises(ValueError, match="pass example_inputs=\\(input_ids, attention_mask\\)"):
        export_onnx(model, tmp_path / "m.onnx", example_inputs=ids, matmul_nbits=True)
    mask = torch.ones_like(ids)
    example = (ids, mask) if kind == "llama" else (ids, None, mask)  # GPT-2: (ids, cache, mask)
    res = export_onnx(model, tmp_path / "m.onnx", example_inputs=example, matmul_nbits=True)
    assert len(res.info["matmul_nbits"]) == (8 if kind == "gpt2" else 14), res.info
    assert res.info["dequantize_linear"] == {}
    x = torch.randint(0, 100, (2, 11), generator=g)  # other batch and length than traced
    m = torch.ones_like(x)
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=m).logits.numpy()
    got = _session(tmp_path / "m.onnx").run(
        None, {"input_ids": x.numpy(), "attention_mask": m.numpy()}
    )
    np.testing.assert_allclose(got[0], ref, atol=ATOL, rtol=RTOL)


def test_what_matmul_nbits_cannot_take_keeps_dequantize_linear(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 16, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 10),
    ).eval()  # fmt: skip
    calib = batches((8, 3, 4, 4))
    rules = [
        {"targets": ["3"], "method": "gptq", "bits": 8},
        {"targets": ["5"], "method": "gptq", "bits": 4, "group_size": 24},
        {"targets": ["0", "7"], "method": "gptq", "bits": 4},
    ]
    compress(model, calib, {"rules": rules}, quiet=True)
    res = export_onnx(model, tmp_path / "m.onnx", example_inputs=calib[0], matmul_nbits=True)
    why = res.info["dequantize_linear"]
    assert set(why) == {"0", "3", "5", "7"} and res.info["matmul_nbits"] == []
    assert "conv" in why["0"] and "8-bit" in why["3"] and "group_size 24" in why["5"]
    assert "40 input features" in why["7"]
    assert _ops(tmp_path / "m.onnx").count("DequantizeLinear") == 4
    x = batches((5, 3, 4, 4), n=1, seed=9)[0]
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), ref, atol=ATOL, rtol=RTOL)


def test_bad_options_are_errors_before_work(tmp_path: Path) -> None:
    model = mlp()
    calib = batches((8, 64))
    compress(model, calib, RECIPES["gptq4"], quiet=True)
    x = calib[0]
    cases = [
        ({"format": "onnx", "matmul_nbits": "yes"}, "matmul_nbits must be True or False"),
        ({"format": "onnx", "matmul_nbits": True, "accuracy_level": 7}, "accuracy_level must be"),
        ({"format": "onnx", "accuracy_level": 4}, "pass matmul_nbits=True"),
        ({"format": "safetensors", "matmul_nbits": True}, "applies to format='onnx' only"),
        (
            {"format": "onnx", "matmul_nbits": True, "activations": "int8-dynamic"},
            "weight-only graph",
        ),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            export(model, tmp_path / "out", example_inputs=x, **kw)
    with pytest.raises(ValueError, match="accuracy_level must be"):
        export_onnx(
            model, tmp_path / "m.onnx", example_inputs=x, matmul_nbits=True, accuracy_level=True
        )
    assert not list(tmp_path.iterdir())
