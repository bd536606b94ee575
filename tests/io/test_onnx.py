"""``format="onnx"``: an MLP and a CNN (grouped convolution included) compressed by optbrain
are exported with their quantized weights as INT4 / INT8 ``DequantizeLinear`` initializers; ONNX
Runtime's CPU provider runs them with outputs within ``atol = rtol = 1e-5`` of the torch
compressed model (the dequantized weights are bit-identical), and the 4-bit layers take
≤ 0.14× their fp32 bytes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="format='onnx' needs the onnx package (extra 'deploy')")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (extra 'deploy')")

from onnx import TensorProto, numpy_helper  # noqa: E402

from optbrain.api import compress  # noqa: E402
from optbrain.io.layers import compressed_layers  # noqa: E402
from optbrain.io.onnx import export_onnx  # noqa: E402

ATOL = RTOL = 1e-5


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    ).eval()


SHAPES = {"mlp": (64,), "cnn": (3, 8, 8)}
BUILD = {"mlp": mlp, "cnn": cnn}
RECIPES = {
    "gptq4": {"method": "gptq", "bits": 4},
    "gptq8": {"method": "gptq", "bits": 8},
    "gptq4-asym-g16": {"method": "gptq", "bits": 4, "sym": False, "group_size": 16},
    "obc-2:4-4bit": {"method": "obc", "pattern": "2:4", "bits": 4},
    "rtn3": {"method": "rtn", "bits": 3},
    "sparsegpt50": {"method": "sparsegpt", "sparsity": 0.5},
}


def _batches(kind: str, n: int = 8, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *SHAPES[kind], generator=g) for _ in range(n)]


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("kind", list(BUILD))
def test_onnxruntime_matches_the_compressed_model(tmp_path: Path, kind: str, recipe: str) -> None:
    model = BUILD[kind]()
    calib = _batches(kind)
    compress(model, calib, RECIPES[recipe], quiet=True)
    res = export_onnx(model, tmp_path / "m.onnx", example_inputs=calib[0])
    x = _batches(kind, n=1, batch=5, seed=9)[0]  # another batch size: the batch is dynamic
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), ref, atol=ATOL, rtol=RTOL)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    if recipe == "sparsegpt50":
        assert not dq and res.layer_bytes == 0 and len(res.dense) > 0
        return
    types = {i.name: i.data_type for i in graph.initializer}
    want = TensorProto.INT8 if recipe == "gptq8" else TensorProto.INT4
    assert dq and all(types[n.input[0]] == want for n in dq)
    assert len(dq) + len(res.dense) == len(compressed_layers(model))


def test_dequantized_weights_are_bit_identical(tmp_path: Path) -> None:
    """Running only the DequantizeLinear part of the graph gives the torch weights exactly."""
    model = cnn()
    compress(model, _batches("cnn"), {"method": "gptq", "bits": 4, "group_size": 16}, quiet=True)
    export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(1, 3, 8, 8))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    wanted = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    wanted = [w for w in wanted if w not in {i.name for i in proto.graph.initializer}]
    assert wanted  # the grouped-size conv layers were rewritten (the 27-column one was skipped)
    del proto.graph.output[:]
    for w in wanted:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(w))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(wanted, {"input": np.zeros((1, 3, 8, 8), np.float32)})
    params = dict(model.named_parameters())
    for name, arr in zip(wanted, got, strict=True):
        assert np.array_equal(arr, params[name].detach().numpy()), name


def test_four_bit_per_channel_is_at_most_0_14_of_fp32(tmp_path: Path) -> None:
    model = mlp()
    compress(model, _batches("mlp"), RECIPES["gptq4"], quiet=True)
    res = export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(1, 64))
    assert res.dense == {}
    assert 0.125 < res.ratio <= 0.14, res.ratio
    dense = tmp_path / "dense.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(mlp(), (torch.randn(1, 64),), str(dense), dynamo=False)
    assert res.files["m.onnx"] < 0.2 * dense.stat().st_size
    init = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    }
    assert "0.weight" not in init and "0.bias" in init


def test_bad_input_is_an_error_before_work(tmp_path: Path) -> None:
    model = mlp()
    with pytest.raises(ValueError, match="not compressed by optbrain.compress"):
        export_onnx(model, tmp_path / "a.onnx", example_inputs=torch.randn(1, 64))
    compress(model, _batches("mlp"), RECIPES["gptq4"], quiet=True)
    with pytest.raises(ValueError, match="needs example_inputs="):
        export_onnx(model, tmp_path / "b.onnx")
    with pytest.raises(ValueError, match="example_inputs must be a tensor or a tuple"):
        export_onnx(model, tmp_path / "c.onnx", example_inputs={"x": torch.randn(1, 64)})
    assert not list(tmp_path.iterdir())


def test_convolutions_followed_by_batch_norm_keep_their_integer_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )
    model.train()
    with torch.no_grad():  # non-trivial running statistics, as after training
        for b in _batches("cnn", n=4, seed=3):
            model(b * 2 + 1)
    model.eval()
    calib = _batches("cnn")
    compress(model, calib, {"method": "gptq", "bits": 4}, quiet=True)
    res = export_onnx(model, tmp_path / "m.onnx", example_inputs=calib[0])
    assert res.dense == {}  # the convolutions were not folded into their batch norms
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == 3
    x = _batches("cnn", n=1, batch=5, seed=9)[0]
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), ref, atol=ATOL, rtol=RTOL)
