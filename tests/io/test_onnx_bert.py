"""ONNX export of a BERT-style encoder (a tiny random ``transformers.BertModel``, FFN neurons and
attention heads removed by structured OBC and shrunk, as the zoo's minilm runs):

* ``format="onnx"`` traces a Hugging Face model (transformers 5 passes ``use_cache`` twice when
  the TorchScript exporter fills the forward's defaults: ``io.onnx._Traced``), names the inputs
  after the forward's parameters, and makes batch AND sequence symbolic, so one graph runs
  padded texts of any length: ONNX Runtime's outputs within ``atol = rtol = 1e-5`` of torch's.
* ``activations="int8-dynamic"`` (ONNX Runtime's ``quantize_dynamic``: int8 weights, activation
  scales at run time): integer MatMul kernels, outputs within 5% (relative, L2) of the torch
  compressed model on held-out padded inputs; no calibration needed.
* a graph with nothing ``int8-dynamic`` quantizes (a CNN) is an error, no file written.
* ``activations="int8"`` (static) exports a BERT graph at all (the symbolic shape inference of
  ``quant_pre_process`` needs ``auto_merge`` for it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="format='onnx' needs the onnx package (extra 'deploy')")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (extra 'deploy')")
transformers = pytest.importorskip("transformers")

from ort_helpers import rel as _rel  # noqa: E402
from ort_helpers import session as _session  # noqa: E402

from optbrain.api import compress, shrink  # noqa: E402
from optbrain.io import export  # noqa: E402

ATOL = RTOL = 1e-5
INT8_REL_ERROR = 0.05
NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, add_pooling_layer=False,
    )  # fmt: skip
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def tokens(batch: int, length: int, seed: int, pad: bool = False) -> dict[str, torch.Tensor]:
    """Random ids; ``pad``: row ``i`` ends with ``i`` padding tokens (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        for i in range(batch):
            mask[i, length - min(i, length - 1) :] = 0
        ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def args(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(x[n] for n in NAMES)


@pytest.fixture(scope="module")
def shrunk() -> torch.nn.Module:
    """Half of the FFN neurons and of the heads of every layer removed (structured OBC)."""
    model = tiny_bert()
    calib = [tokens(8, 16, seed=s) for s in range(4)]
    ffn = r"re:.*(?<!attention\.)output\.dense"
    heads = r"re:.*attention\.output\.dense"
    rules = [
        {"targets": [ffn], "ignore": [heads], "method": "obc", "pattern": "channels",
         "sparsity": 0.5},
        {"targets": [heads], "method": "obc", "pattern": "heads", "sparsity": 0.5},
    ]  # fmt: skip
    compress(model, calib, {"rules": rules}, quiet=True)
    shrink(model, calib[0])
    layer = model.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 32  # shrunk for real
    assert layer.attention.self.query.out_features == 16  # 2 of 4 heads of size 8
    return model


def _run(sess: ort.InferenceSession, x: dict[str, torch.Tensor]) -> np.ndarray:
    return sess.run(None, {n: x[n].numpy() for n in NAMES})[0]


def test_bert_exports_with_symbolic_batch_and_sequence(shrunk, tmp_path: Path) -> None:
    res = export(shrunk, tmp_path / "m.onnx", format="onnx", example_inputs=args(tokens(2, 16, 0)))
    assert res.info["inputs"] == NAMES and res.info["outputs"] == ["output"]
    sess = _session(tmp_path / "m.onnx")
    assert [i.shape for i in sess.get_inputs()] == [["batch", "sequence"]] * 3
    assert sess.get_outputs()[0].shape == ["batch", "sequence", 32]
    for batch, length in ((1, 5), (5, 23)):  # other sizes than traced, padded rows
        x = tokens(batch, length, seed=batch, pad=True)
        with torch.no_grad():
            ref = shrunk(**x).last_hidden_state.numpy()
        np.testing.assert_allclose(_run(sess, x), ref, atol=ATOL, rtol=RTOL)


def test_bert_int8_dynamic_runs_integer_kernels_close_to_torch(shrunk, tmp_path: Path) -> None:
    res = export(
        shrunk, tmp_path / "q.onnx", format="onnx", example_inputs=args(tokens(2, 16, 0)),
        activations="int8-dynamic",
    )  # fmt: skip
    assert res.info["activations"] == "int8-dynamic" and res.info["quantize_nodes"] > 0
    # 12 linear layers (4 per attention, 2 FFN) as int8 codes + a scale per output channel
    assert 0.25 <= res.ratio < 0.4
    sess = _session(tmp_path / "q.onnx", optimized=tmp_path / "opt.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}, ops
    x = tokens(6, 19, seed=7, pad=True)  # held out, padded
    with torch.no_grad():
        ref = shrunk(**x).last_hidden_state.numpy()
    assert 0 < _rel(_run(sess, x), ref) < INT8_REL_ERROR  # activations rounded, but close


def test_bert_static_int8_exports(shrunk, tmp_path: Path) -> None:
    calib = [args(tokens(4, 16, seed=s)) for s in range(2)]
    res = export(
        shrunk, tmp_path / "s.onnx", format="onnx", example_inputs=calib[0],
        activations="int8", calibration=calib,
    )  # fmt: skip
    assert res.info["activations"] == "int8" and res.info["quantize_nodes"] > 0
    out = _run(_session(tmp_path / "s.onnx"), tokens(3, 11, seed=3, pad=True))
    assert out.shape == (3, 11, 32) and np.isfinite(out).all()


def test_int8_dynamic_without_a_matmul_is_an_error(tmp_path: Path) -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    calib = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    compress(conv, calib, {"method": "gptq", "bits": 8}, quiet=True)
    with pytest.raises(ValueError, match="quantized no operator"):
        export(conv, tmp_path / "c.onnx", format="onnx", example_inputs=calib[0],
               activations="int8-dynamic")  # fmt: skip
    assert not (tmp_path / "c.onnx").exists()
