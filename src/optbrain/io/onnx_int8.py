"""``format="onnx", activations="int8" | "int8-dynamic"``: int8 activations, integer ORT kernels.

Weight-only int4/int8 (``optbrain.io.onnx``) keeps ONNX Runtime on float kernels: the weights
are dequantized once at load. To run ``QLinearConv`` / ``QLinearMatMul`` (integer GEMMs), the
activations must be quantized too, with scales fixed before deployment from calibration data::

    x (float) ─ QuantizeLinear(s_x, z_x) ─ DequantizeLinear ─┐
    W codes (int8, per output channel) ─── DequantizeLinear ─┼─ Conv / Gemm ─ QuantizeLinear
                                     (ONNX Runtime fuses each such group into one integer kernel)

``export_onnx_int8`` traces the compressed model (a shrunk structured model exports its smaller
layers; batch norms are folded into the convolutions, constant folding on), and runs ONNX
Runtime's own static quantizer (``onnxruntime.quantization.quantize_static``, QDQ format) with a
``CalibrationDataReader`` over the given calibration batches: activations uint8 with min/max
ranges over the calibration set (``s_x = (max − min) / 255``), weights int8 symmetric per
output channel with ``reduce_range`` (7-bit codes, ``s_w = max |w| / 63``). The weights are
re-quantized from the compressed model's float weights (optbrain's own codes are not kept:
after batch-norm folding they are no longer on their grid); for weights already on a grid of
``b ≤ 7`` bits per channel the re-quantization error is at most half of a step
``2**(b−1) / 63`` times smaller than the grid's.

Why ``reduce_range``: on x86 CPUs without VNNI (AVX2 only, as this machine), ONNX Runtime's
u8×s8 kernels add pairs of products in int16 (``vpmaddubsw``), which saturates with full 8-bit
weights. Measured on fashion-cnn (``benchmarks/ort_static_int8.py [--reduce-range]``, 512
inputs): full-range int8 weights agree with the fp32 graph on 91.6% of the top-1 labels, 7-bit
ones on 99.6%.

``activations="int8-dynamic"`` (``dynamic=True``): ONNX Runtime's ``quantize_dynamic`` on the
same traced graph, for transformers: every ``MatMul`` with a constant weight gets int8 weights
(per output channel, ``reduce_range`` as above) and its activation is quantized at run time
(``DynamicQuantizeLinear``: uint8 with the min/max of that very tensor; ONNX Runtime fuses the
group into ``DynamicQuantizeMatMul``); everything else (attention scores, softmax, LayerNorm,
the residual adds, the embeddings) stays float. No calibration data is needed. Why not static
int8 for a BERT: static QDQ also quantizes the residual adds, the LayerNorms and the additive
attention mask with ranges fixed in advance; measured on minilm (structured 0.5, Lee-50 from
the ONNX Runtime outputs): static 0.171 (output relative error 0.84), dynamic 0.672 (float 0.675).
A graph with no MatMul (a CNN without Linear layers) is an error: nothing to quantize.

The int8 graph cannot equal the torch compressed model: its outputs differ by the activation
rounding. The top-1 agreement and the relative output error on the calibration batches are
measured at export and returned in ``ExportResult.info``. Pruned zeros are stored as int8 zeros.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._files import atomic_write
from .layers import ExportResult, compressed_layers
from .onnx import FORMAT, _as_args, _trace_eval

#: "float": weight-only export (``optbrain.io.onnx``); "int8": static int8 activations (scales
#: from calibration data); "int8-dynamic": int8 activations quantized at run time (below)
ACTIVATIONS = ("float", "int8", "int8-dynamic")
#: the operators ``activations="int8-dynamic"`` quantizes (MatMul -> DynamicQuantizeMatMul; a Gemm
#: becomes MatMul + Add in ``quant_pre_process``). Not Conv: ConvInteger is slow on CPU
DYNAMIC_OPS = ("MatMul",)


def check_activations(activations: str | None) -> str:
    """``activations`` as one of ``ACTIVATIONS`` (None = ``"float"``), else a ValueError."""
    value = "float" if activations is None else activations
    if value not in ACTIVATIONS:
        raise ValueError(
            f"unknown activations {activations!r} for format={FORMAT!r}; choose one of "
            f"{list(ACTIVATIONS)} ('int8': static int8 activations from calibration data, "
            "'int8-dynamic': quantized at run time)"
        )
    return value


def check_calibration(calibration: Any) -> list[tuple[Any, ...]]:
    """The calibration batches as tuples of the model's positional inputs; a ValueError when
    there are none or one is not a tensor / tuple / list of tensors."""
    if calibration is None or isinstance(calibration, torch.Tensor | dict):
        raise ValueError(
            "activations='int8' needs calibration= (a list of input batches: tensors, or tuples "
            "of the model's positional inputs) to fix the activation scales"
        )
    batches = [_as_args(b) for b in calibration]
    if not batches:
        raise ValueError("activations='int8': calibration= is empty (give at least one batch)")
    return batches


def _require_quantizer() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise ImportError(
            "activations='int8' needs onnxruntime (its quantization tool): "
            "pip install 'optbrain[deploy]' (or pip install onnxruntime)"
        ) from None
    return quantization


def _feeds(names: list[str], batches: list[tuple[Any, ...]]) -> list[dict[str, np.ndarray]]:
    out = []
    for args in batches:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        out.append({n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=False)})
    return out


def _weight_bytes(proto: Any) -> tuple[int, int]:
    """(bytes of the int8 weight initializers with their scales and zero points, their fp32
    bytes): the constant 8-bit inputs of the DequantizeLinear nodes (static; biases are int32)
    and the weights of MatMulInteger / ConvInteger (dynamic: ``W_quantized`` with its
    ``W_scale`` and ``W_zero_point``, the names ONNX Runtime's quantizer gives them)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}

    def weight(name: str) -> np.ndarray | None:
        q = numpy_helper.to_array(inits[name]) if name in inits else None
        ok = q is not None and q.dtype in (np.int8, np.uint8) and q.size > 1
        return q if ok else None  # not an int32 bias, a scalar zero point

    stored = fp32 = 0
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear":
            q, names = weight(node.input[0]), list(node.input)
        elif node.op_type in ("MatMulInteger", "ConvInteger") and len(node.input) > 1:
            q = weight(node.input[1])
            base = node.input[1].removesuffix("_quantized")
            names = [node.input[1], f"{base}_scale", f"{base}_zero_point"]
        else:
            continue
        if q is None:
            continue
        stored += sum(numpy_helper.to_array(inits[n]).nbytes for n in names if n in inits)
        fp32 += q.size * 4
    return stored, fp32


def _agreement(
    model: nn.Module, path: Path, names: list[str], batches: list[tuple[Any, ...]]
) -> dict[str, float]:
    """Top-1 agreement (%) and relative error of the int8 graph's first output against the
    torch model's on ``batches``."""
    import onnxruntime as ort

    from ..pipeline.shrink import first_tensor

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    agree = total = 0
    err = ref_norm = 0.0
    with torch.no_grad():
        for args, feed in zip(batches, _feeds(names, batches), strict=True):
            ref = first_tensor(model(*args)).float().numpy()
            got = sess.run(None, feed)[0]
            err += float(np.sum((got.astype(np.float64) - ref) ** 2))
            ref_norm += float(np.sum(ref.astype(np.float64) ** 2))
            if ref.ndim >= 2:
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                total += int(np.prod(ref.shape[:-1]))
    return {
        "calibration_agreement": 100.0 * agree / total if total else float("nan"),
        "calibration_rel_error": (err / max(ref_norm, 1e-30)) ** 0.5,
    }


def export_onnx_int8(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Any = None,
    calibration: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    dynamic: bool = False,
) -> ExportResult:
    """Write ``model`` (after ``optbrain.compress``, shrunk or not) as an ONNX file with int8
    activations and int8 weights (see the module docstring). ``example_inputs``: as
    ``export_onnx``; ``calibration``: the input batches whose activation ranges fix the scales
    (e.g. the calibration set of ``compress``); ``dynamic=True`` (``activations="int8-dynamic"``):
    activation scales computed at run time, ``calibration`` optional (only the agreement of
    ``ExportResult.info`` is measured on it, else on ``example_inputs``). Bad input raises
    before any work."""
    layers = compressed_layers(model)
    if dynamic and calibration is None:
        batches = [_as_args(example_inputs)] if example_inputs is not None else []
    else:
        batches = check_calibration(calibration)
    q = _require_quantizer()
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto, input_names, output_names = _trace_eval(
        model, example_inputs, input_names, output_names, dynamic_batch, fold=True
    )
    out = Path(path)
    with tempfile.TemporaryDirectory(prefix="optbrain_int8_") as tmp:
        fp32, pre, int8 = (Path(tmp) / f"{k}.onnx" for k in ("fp32", "pre", "int8"))
        onnx.save(proto, str(fp32))
        # auto_merge: the symbolic shape inference of a BERT graph (symbolic batch and sequence
        # through Reshape / Expand of the attention mask) is otherwise "incomplete" and raises
        quant_pre_process(str(fp32), str(pre), auto_merge=True)
        if dynamic:
            _quantize_dynamic(q, pre, int8)
        else:
            _quantize_static(q, pre, int8, _feeds(input_names, batches))
        qproto = onnx.load(str(int8))
        if dynamic and not any(n.op_type == "DynamicQuantizeLinear" for n in qproto.graph.node):
            raise ValueError(
                "activations='int8-dynamic' quantized no operator of this graph (it quantizes "
                f"{list(DYNAMIC_OPS)} only, the Linear layers): for convolutions use "
                "activations='int8' (static, from calibration data)"
            )
        onnx.checker.check_model(qproto)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, qproto.SerializeToString())
    stored, fp32_bytes = _weight_bytes(qproto)
    info: dict[str, Any] = {
        "opset": int(qproto.opset_import[0].version),
        "inputs": input_names,
        "outputs": output_names,
        "activations": "int8-dynamic" if dynamic else "int8",
        "calibration_batches": len(batches),
        "quantize_nodes": sum(
            1 for n in qproto.graph.node if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")
        ),
        "compressed_layers": len(layers),
    }
    info.update(_agreement(model, out, input_names, batches))
    return ExportResult(
        path=str(out),
        format=FORMAT,
        files={out.name: out.stat().st_size},
        layer_bytes=stored,
        layer_fp32_bytes=fp32_bytes,
        dense={},
        info=info,
    )


def _quantize_static(q: Any, src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    q.quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,  # 7-bit weights: no int16 saturation on AVX2 (module docstring)
        activation_type=q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        calibrate_method=q.CalibrationMethod.MinMax,
    )


def _quantize_dynamic(q: Any, src: Path, dst: Path) -> None:
    q.quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=list(DYNAMIC_OPS),
        per_channel=True,
        reduce_range=True,  # as static: 7-bit weights against the AVX2 int16 saturation
        weight_type=q.QuantType.QInt8,
    )
