"""``format="onnx"``: an ONNX graph for ONNX Runtime with the quantized weights stored as integers.

``export_onnx(model, path, example_inputs=...)`` traces the compressed model with
``torch.onnx.export`` (the TorchScript exporter, which keeps parameter names as initializer
names; without constant folding, so that a convolution followed by a batch norm keeps its own
weight and the batch norm stays a node), then replaces the float initializer of every
quantized layer by its integer codes and a ``DequantizeLinear`` node (opset 21)::

    codes (INT4, two per byte, up to 4 bits; INT8 up to 8) ─┐
    scale (float32)                                        ├─ DequantizeLinear ─> weight
    zero point (same type as the codes)                   ─┘   (then Reshape / Transpose)

Per-channel grids dequantize along axis 0 (one scale per output channel); per-group grids use
DequantizeLinear's block quantization along axis 1 with ``block_size = group_size`` — the
groups of optbrain's grids, over the layer's 2-D weight ``(out, in · kh · kw)`` (convolutions
are reshaped back to 4-D after the dequantization). Grouped convolutions stack their groups'
rows. ``DequantizeLinear`` computes ``(q − zero_point) · scale``, the same float32 product the
solvers wrote, so the dequantized weights are **bit-identical** to the compressed model's; the
outputs differ from torch's only by the runtimes' summation order (tests: ``atol = rtol =
1e-5``, observed ~1e-6 relative). Pruned-only layers and grids over 8 bits are left as float
initializers (listed in ``ExportResult.dense``).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._files import atomic_write
from . import packing
from .layers import CompressedLayer, ExportResult, compressed_layers

FORMAT = "onnx"
OPSET = 21  # DequantizeLinear with INT4 and block_size


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ImportError(
            f"format={FORMAT!r} needs the onnx package: pip install 'optbrain[deploy]' "
            "(or pip install onnx onnxruntime)"
        ) from None
    return onnx


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is None:
        raise ValueError(
            f"format={FORMAT!r} needs example_inputs= (a tensor or a tuple of the model's "
            "positional inputs, e.g. one calibration batch) to trace the model"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise ValueError(
        "example_inputs must be a tensor or a tuple/list of the model's positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


class _Traced(nn.Module):
    """``model`` called with exactly the positional inputs given, returning its main output
    tensor (``first_tensor``: a Hugging Face model's ``last_hidden_state`` / ``logits``).

    Traced instead of ``model`` itself because the TorchScript exporter fills every parameter
    of ``model.forward``'s signature after the given ones with its default, and transformers'
    config-default decorator then passes ``use_cache`` twice (transformers 5: "BertModel.forward()
    got multiple values for argument 'use_cache'"); a ``*args`` signature has nothing to fill."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> torch.Tensor:
        from ..pipeline.shrink import first_tensor

        return first_tensor(self.model(*args))


_PREFIX = "model."  # the parameter names of ``_Traced``: strip it from the initializers


def _strip_prefix(graph: Any) -> None:
    """Rename the initializers ``model.X`` of a traced ``_Traced`` back to ``X`` (the module's own
    parameter names, which ``_find_initializer`` looks up first)."""
    renamed = {}
    for init in graph.initializer:
        if init.name.startswith(_PREFIX):
            renamed[init.name] = init.name[len(_PREFIX) :]
            init.name = renamed[init.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for value in [*graph.input, *graph.value_info]:
        if value.name in renamed:
            value.name = renamed[value.name]


def _trace(
    model: nn.Module, args: tuple[Any, ...], names: dict[str, Any], fold: bool = True
) -> Any:
    """The ONNX ModelProto of ``model`` (its main output, ``_Traced``) traced on ``args``, at
    opset ``OPSET``. ``fold=False``: no constant folding, so a convolution's weight stays its own
    initializer instead of being merged with the batch norm after it."""
    onnx = _require_onnx()
    from onnx import version_converter

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(
                _Traced(model),
                args,
                buf,
                dynamo=False,
                opset_version=20,
                do_constant_folding=fold,
                **names,
            )
        except torch.onnx.errors.UnsupportedOperatorError as e:
            hint = ""
            if "aten::diff" in str(e):  # transformers' mask code when no mask is given
                hint = (
                    "; a Hugging Face causal LM traced without an attention mask builds one "
                    "with it: pass example_inputs=(input_ids, attention_mask)"
                )
            raise ValueError(f"the model cannot be traced to ONNX: {e}{hint}") from None
    proto = onnx.load_from_string(buf.getvalue())
    _strip_prefix(proto.graph)
    return version_converter.convert_version(proto, OPSET)


def _is_tokens(x: Any) -> bool:
    """Token ids (or their mask / segment ids): an integer tensor ``(batch, sequence)``."""
    return isinstance(x, torch.Tensor) and x.ndim == 2 and not x.is_floating_point()


def dynamic_axes(
    model: nn.Module, args: tuple[Any, ...], input_names: list[str], output_names: list[str]
) -> dict[str, dict[int, str]]:
    """The symbolic axes of a traced graph: axis 0 (``batch``) of every input and output, and
    for a model taking token ids (``_is_tokens``) axis 1 (``sequence``) of those inputs and of
    every output whose axis 1 has the example's sequence length (``(batch, sequence, hidden)``
    hidden states, per-token logits), so one graph runs texts of any length."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]}
    seq = {int(a.shape[1]) for a in tensors if _is_tokens(a)}
    if not seq:
        return axes
    for n, a in zip(input_names, tensors, strict=False):
        if _is_tokens(a):
            axes[n][1] = "sequence"
    with torch.no_grad():
        out = _Traced(model)(*args)
    if out.ndim >= 2 and int(out.shape[1]) in seq:
        axes[output_names[0]][1] = "sequence"
    return axes


def _codes_2d(layer: CompressedLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(signed codes, scale, signed zero point) of all groups stacked by rows, and the bits."""
    grids = [g.grid for g in layer.groups]
    bits = grids[0].bits
    q, s, z = [], [], []
    for g, grid in enumerate(grids):
        q.append(packing.signed(packing.codes(layer.adapter.weight(g), grid), bits))
        s.append(grid.scale.float())
        z.append(packing.signed_zero(grid.zero, bits))
    return torch.cat(q), torch.cat(s), torch.cat(z), bits


def _same_grids(layer: CompressedLayer) -> str | None:
    g0 = layer.groups[0].grid
    for g in layer.groups[1:]:
        if (g.grid.bits, g.grid.sym, g.grid.group_size) != (g0.bits, g0.sym, g0.group_size):
            return "its weight groups have different grids"
    return None


def _find_initializer(graph: Any, layer: CompressedLayer) -> tuple[Any, bool] | None:
    """The initializer holding the layer's weight, and whether it holds it transposed."""
    from onnx import numpy_helper

    w = layer.module.weight.detach().cpu().numpy()
    candidates = [(w, False)] + ([(w.T, True)] if w.ndim == 2 else [])
    by_name = {i.name: i for i in graph.initializer}
    first = by_name.get(f"{layer.name}.weight")
    ordered = ([first] if first is not None else []) + list(graph.initializer)
    for init in ordered:
        dims = tuple(init.dims)
        for arr, transposed in candidates:
            if dims == arr.shape and np.array_equal(numpy_helper.to_array(init), arr):
                return init, transposed
    return None


def _int_tensor(name: str, values: torch.Tensor, bits: int) -> Any:
    from onnx import TensorProto, helper

    if bits <= 4:
        flat = packing.pack_int4(values.reshape(-1)).numpy().tobytes()
        return helper.make_tensor(name, TensorProto.INT4, list(values.shape), flat, raw=True)
    return helper.make_tensor(
        name, TensorProto.INT8, list(values.shape), values.numpy().tobytes(), raw=True
    )


def _rewrite(proto: Any, layer: CompressedLayer, init: Any, transposed: bool) -> int:
    """Replace ``init`` by integer codes + DequantizeLinear; returns the bytes now stored."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    q, s, z, bits = _codes_2d(layer)
    gs = layer.groups[0].grid.group_size
    base = init.name.replace("/", "_")
    names = {k: f"{base}_{k}" for k in ("q", "scale", "zp", "w2d", "shape", "view")}
    if gs is None:
        s, z = s[:, 0].contiguous(), z[:, 0].contiguous()
        attrs = {"axis": 0}
    else:
        attrs = {"axis": 1, "block_size": int(gs)}
    new_inits = [
        _int_tensor(names["q"], q, bits),
        numpy_helper.from_array(s.numpy().astype(np.float32), names["scale"]),
        _int_tensor(names["zp"], z, bits),
    ]
    out = init.name
    shape = tuple(layer.module.weight.shape)
    transpose = transposed != (layer.kind == "hf_conv1d")
    nodes = []
    if len(shape) > 2:  # convolution: (out, in/G · kh · kw) -> module weight shape
        dq_out = names["w2d"]
        new_inits.append(numpy_helper.from_array(np.array(shape, np.int64), names["shape"]))
        nodes.append(helper.make_node("Reshape", [dq_out, names["shape"]], [out]))
    elif transpose:
        dq_out = names["w2d"]
        nodes.append(helper.make_node("Transpose", [dq_out], [out], perm=[1, 0]))
    else:
        dq_out = out
    dq = helper.make_node(
        "DequantizeLinear", [names["q"], names["scale"], names["zp"]], [dq_out], **attrs
    )
    graph.initializer.remove(init)
    graph.initializer.extend(new_inits)
    for i, node in enumerate([dq, *nodes]):
        graph.node.insert(i, node)
    return sum(len(t.raw_data) for t in new_inits[:3])


def _input_names(model: nn.Module, args: tuple[Any, ...]) -> list[str]:
    """The graph's input names: ``input`` for one tensor; for several, the names of the
    parameters of ``model.forward`` they are passed as (``input_ids``, ``attention_mask``, ...),
    else ``input_0``, ``input_1``, ..."""
    import inspect

    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if len(slots) == 1:
        return ["input"]
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        params = []
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(named) >= len(args):
        return [named[i] for i in slots]
    return [f"input_{i}" for i in range(len(slots))]


def _trace_eval(
    model: nn.Module,
    example_inputs: Any,
    input_names: list[str] | None,
    output_names: list[str] | None,
    dynamic_batch: bool,
    fold: bool = True,
) -> tuple[Any, list[str], list[str]]:
    """(ModelProto traced in eval mode, input names, output names)."""
    args = _as_args(example_inputs)
    _require_onnx()
    input_names = input_names or _input_names(model, args)
    output_names = output_names or ["output"]
    names: dict[str, Any] = {"input_names": input_names, "output_names": output_names}
    was_training = model.training
    model.eval()
    try:
        if dynamic_batch:
            names["dynamic_axes"] = dynamic_axes(model, args, input_names, output_names)
        proto = _trace(model, args, names, fold)
    finally:
        model.train(was_training)
    return proto, input_names, output_names


def export_dense_onnx(
    model: nn.Module, path: str | os.PathLike, *, example_inputs: Any = None
) -> Path:
    """The same graph as ``export_onnx`` with every weight a float initializer, for any
    model (the dense baseline of ``optbrain bench``). Returns the file's path."""
    import onnx

    proto, _, _ = _trace_eval(model, example_inputs, None, None, True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return out


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    matmul_nbits: bool = False,
    accuracy_level: int = 0,
) -> ExportResult:
    """Write ``model`` (after ``optbrain.compress``) as an ONNX file at ``path``; see the module
    docstring. ``example_inputs``: a tensor or tuple of positional inputs to trace with.
    ``dynamic_batch``: the first dimension of every input and output is symbolic, and the
    sequence axis of a model taking token ids (``dynamic_axes``). ``matmul_nbits``: linear
    layers on grids of up to 4 bits become ONNX Runtime's fused ``MatMulNBits`` (``onnx_nbits``;
    ``info["matmul_nbits"]`` lists them, ``info["dequantize_linear"]`` the rest, with why),
    computing at ``accuracy_level`` (0: float32; 4: int8 activations, faster, ~4e-2 relative
    error on smollm2's logits)."""
    from . import onnx_nbits

    matmul_nbits, accuracy_level = onnx_nbits.check_nbits(matmul_nbits, accuracy_level)
    layers = compressed_layers(model)
    proto, input_names, output_names = _trace_eval(
        model, example_inputs, input_names, output_names, dynamic_batch, fold=False
    )
    import onnx

    dense: dict[str, str] = {}
    nbits: list[str] = []
    dql: dict[str, str] = {}
    layer_bytes = fp32 = 0
    for name, layer in layers.items():
        if not layer.quantized:
            dense[name] = "pruned only: kept as a float initializer (zeros stored as they are)"
            continue
        if layer.groups[0].bits > 8:
            dense[name] = f"{layer.groups[0].bits}-bit grid: stored as float (INT4/INT8 only)"
            continue
        reason = _same_grids(layer)
        found = None if reason else _find_initializer(proto.graph, layer)
        if found is None:
            dense[name] = reason or "its weight is not an initializer of the traced graph"
            continue
        plan = onnx_nbits.nbits_plan(proto.graph, layer, *found) if matmul_nbits else None
        if isinstance(plan, dict):
            layer_bytes += onnx_nbits.rewrite(proto, layer, found[0], plan, accuracy_level)
            nbits.append(name)
        else:
            layer_bytes += _rewrite(proto, layer, *found)
            if plan is not None:
                dql[name] = plan
        fp32 += layer.module.weight.numel() * 4
    onnx.checker.check_model(proto)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, proto.SerializeToString())  # as onnx.save, through a temp file + rename
    return ExportResult(
        path=str(out),
        format=FORMAT,
        files={out.name: out.stat().st_size},
        layer_bytes=layer_bytes,
        layer_fp32_bytes=fp32,
        dense=dense,
        info={
            "opset": OPSET,
            "inputs": input_names,
            "outputs": output_names,
            **(
                {"matmul_nbits": nbits, "dequantize_linear": dql, "accuracy_level": accuracy_level}
                if matmul_nbits
                else {}
            ),
        },
    )
