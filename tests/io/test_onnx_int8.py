"""ONNX export of structured and int8-activation models (``optbrain.io.onnx_int8``).

* A CNN with batch norms pruned by ``channels`` and shrunk (``optbrain.shrink``) exports its
  smaller convolutions; ONNX Runtime's outputs are within ``atol = rtol = 1e-5`` of torch's.
* ``activations="int8"``: the graph has static int8 activations, ONNX Runtime fuses it into
  integer kernels (QLinearConv / QGemm), and its outputs stay within 5% (relative, L2) of the
  torch compressed model on held-out inputs (measured ~1-2% here).
* Bad input (an unknown activations value, no calibration, an option of another format, a
  model not compressed) is a ValueError before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx", reason="format='onnx' needs the onnx package (extra 'deploy')")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (extra 'deploy')")

from ort_helpers import rel as _rel  # noqa: E402
from ort_helpers import session as _session  # noqa: E402

from optbrain.api import compress, shrink  # noqa: E402
from optbrain.io import export  # noqa: E402
from optbrain.io.onnx import export_onnx  # noqa: E402
from optbrain.io.onnx_int8 import export_onnx_int8  # noqa: E402

ATOL = RTOL = 1e-5
INT8_REL_ERROR = 0.05


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1, bias=False),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.Conv2d(24, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def _batches(n: int = 8, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


def _structured(calib: list[torch.Tensor]) -> nn.Module:
    """``cnn()`` with half the input channels of its 2nd and 3rd convolutions removed."""
    model = cnn()
    rule = {"targets": ["3", "6"], "method": "obc", "pattern": "channels", "sparsity": 0.5}
    compress(model, calib, {"rules": [rule]}, quiet=True)
    rep = shrink(model, calib[0])
    assert rep.removed == {"3": 8, "6": 12}
    return model


def test_shrunk_model_exports_smaller_layers_that_match_torch(tmp_path: Path) -> None:
    calib = _batches()
    model = _structured(calib)
    export_onnx(model, tmp_path / "m.onnx", example_inputs=calib[0])
    x = _batches(n=1, batch=5, seed=9)[0]
    with torch.no_grad():
        ref = model(x).numpy()
    got = _session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)
    shapes = {tuple(i.dims) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert {(8, 3, 3, 3), (12, 8, 3, 3), (16, 12, 3, 3)} <= shapes  # the shrunk convolutions
    assert not {(16, 3, 3, 3), (24, 16, 3, 3), (16, 24, 3, 3)} & shapes


@pytest.mark.parametrize("kind", ["gptq8", "structured"])
def test_int8_activations_run_integer_kernels_close_to_torch(tmp_path: Path, kind: str) -> None:
    calib = _batches()
    if kind == "structured":
        model = _structured(calib)
    else:
        model = cnn()
        compress(model, calib, {"method": "gptq", "bits": 8}, quiet=True)
    res = export(
        model, tmp_path / "q.onnx", format="onnx", example_inputs=calib[0],
        activations="int8", calibration=calib,
    )  # fmt: skip
    assert res.info["activations"] == "int8" and res.info["calibration_batches"] == len(calib)
    assert res.info["calibration_rel_error"] < INT8_REL_ERROR
    assert 0.25 <= res.ratio < 0.3  # int8 codes + one float scale and zero point per channel
    sess = _session(tmp_path / "q.onnx", optimized=tmp_path / "opt.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops, ops
    x = torch.cat(_batches(n=4, batch=16, seed=7))  # held out, another batch size
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    assert 0 < _rel(got, ref) < INT8_REL_ERROR  # not equal (activations rounded), but close


def test_bad_input_is_an_error_before_work(tmp_path: Path) -> None:
    calib = _batches(n=2)
    model = cnn()
    out = tmp_path / "x.onnx"
    with pytest.raises(ValueError, match="not compressed"):
        export_onnx_int8(model, out, example_inputs=calib[0], calibration=calib)
    compress(model, calib, {"method": "gptq", "bits": 8}, quiet=True)
    kw = {"format": "onnx", "example_inputs": calib[0]}
    with pytest.raises(ValueError, match="unknown activations 'int4'"):
        export(model, out, activations="int4", calibration=calib, **kw)
    with pytest.raises(ValueError, match="needs calibration="):
        export(model, out, activations="int8", **kw)
    with pytest.raises(ValueError, match="calibration= is empty"):
        export(model, out, activations="int8", calibration=[], **kw)
    with pytest.raises(ValueError, match="needs example_inputs="):
        export(model, out, format="onnx", activations="int8", calibration=calib)
    with pytest.raises(ValueError, match="activations= applies to format='onnx' only"):
        export(model, tmp_path / "p", format="safetensors", activations="int8")
    with pytest.raises(ValueError, match="dtype= applies to format='compressed-tensors' only"):
        export(model, out, dtype="float16", **kw)
    with pytest.raises(ValueError, match="dtype='half'"):
        export(model, tmp_path / "p", format="compressed-tensors", dtype="half")
    assert not out.exists() and not (tmp_path / "p").exists()
