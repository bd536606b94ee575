"""``optbrain.export(model, path, format=...)``: one entry point for the deployable formats.

=====================  ========================================  ===============================
format                 writes                                    reads it
=====================  ========================================  ===============================
``"safetensors"``      a run directory with packed integer       ``optbrain.load`` onto the
                       codes, mask bits and scales (checkpoint   dense model (weights equal)
                       version 3, ``optbrain.io.packed``)
``"onnx"``             one ``.onnx`` file, INT4/INT8 weights +    ONNX Runtime (CPU provider)
                       DequantizeLinear (``io.onnx``) or
                       MatMulNBits (``io.onnx_nbits``)
``"compressed-tensors"``  a Hugging Face directory              ``transformers`` alone
                       (``export.hf``)                           (``from_pretrained``)
=====================  ========================================  ===============================

Every format reads what ``optbrain.compress`` did through ``optbrain.io.layers`` (the typed
state of ``optbrain.pipeline.state``) and returns an ``ExportResult`` with the files written,
their sizes and the bytes of the compressed layers against their float32 bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from .checkpoint import read_manifest, save
from .layers import ExportResult, compressed_layers

FORMATS = ("safetensors", "onnx", "compressed-tensors")
PARTS = ("mask", "values", "scale", "zero")  # the tensors of a packed group


def check_format(format: str) -> str:
    """``format`` if it is one of ``FORMATS``, else a ValueError naming them."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {list(FORMATS)}")
    return format


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "safetensors",
    *,
    example_inputs: Any = None,
    source: str | os.PathLike | None = None,
    activations: str | None = None,
    calibration: Any = None,
    dtype: str | None = None,
    matmul_nbits: bool | None = None,
    accuracy_level: int | None = None,
) -> ExportResult:
    """Write ``model`` (after ``optbrain.compress`` or ``optbrain.load``) to ``path`` in
    ``format`` (see the module docstring). ``example_inputs``: for ``"onnx"``, a tensor or
    tuple of positional inputs to trace with; ``activations``: for ``"onnx"``, ``"float"``
    (default, weight-only), ``"int8"`` (static int8 activations from ``calibration``, a list
    of input batches: ``optbrain.io.onnx_int8``) or ``"int8-dynamic"`` (int8 activations
    quantized at run time; ``calibration`` optional); ``source``: for ``"compressed-tensors"``, the
    directory with the tokenizer files; ``dtype``: for ``"compressed-tensors"``, the float
    type of the tensors left unquantized (``"float16"`` / ``"bfloat16"``; default: the
    model's); ``matmul_nbits``: for ``"onnx"`` with float activations, linear layers of up to
    4 bits as ONNX Runtime's ``MatMulNBits`` computing at ``accuracy_level`` (0, default:
    float32; 4: int8 activations inside the kernel; ``optbrain.io.onnx_nbits``). Bad input
    (an unknown format, an option the format does not take, a model the format cannot take,
    a missing example input) raises ValueError before anything is written."""
    act = check_options(
        format,
        activations=activations,
        calibration=calibration,
        dtype=dtype,
        source=source,
        matmul_nbits=matmul_nbits,
        accuracy_level=accuracy_level,
    )
    if format == "onnx":
        if act != "float":
            from .onnx_int8 import export_onnx_int8

            return export_onnx_int8(
                model,
                path,
                example_inputs=example_inputs,
                calibration=calibration,
                dynamic=act == "int8-dynamic",
            )
        from .onnx import export_onnx

        return export_onnx(
            model,
            path,
            example_inputs=example_inputs,
            matmul_nbits=bool(matmul_nbits),
            accuracy_level=0 if accuracy_level is None else accuracy_level,
        )
    if format == "compressed-tensors":
        from .hf import export_compressed_tensors

        return export_compressed_tensors(model, path, source=source, dtype=dtype)
    return export_safetensors(model, path)


#: the options of ``export`` that only one format takes
OPTION_FORMAT = {
    "activations": "onnx",
    "calibration": "onnx",
    "dtype": "compressed-tensors",
    "source": "compressed-tensors",
    "matmul_nbits": "onnx",
    "accuracy_level": "onnx",
}


def check_options(format: str, **options: Any) -> str:
    """Check ``format`` and the format-specific ``options`` of ``export`` (given = not None,
    False, 0 or ``activations="float"``, the defaults) before any work; returns the activations
    (one of ``onnx_int8.ACTIVATIONS``). A ValueError names the option and the format it
    belongs to."""
    from .hf import check_dtype
    from .onnx_int8 import check_activations

    check_format(format)
    act = check_activations(options.get("activations"))
    check_dtype(options.get("dtype"))
    for key, value in options.items():
        owner = OPTION_FORMAT[key]
        if value not in (None, False, "float") and format != owner:  # given, not a default
            raise ValueError(f"option {key}= applies to format={owner!r} only, not {format!r}")
    from .onnx_nbits import check_nbits

    nbits, _ = check_nbits(options.get("matmul_nbits"), options.get("accuracy_level"))
    if nbits and act != "float":
        raise ValueError(
            f"matmul_nbits=True is the weight-only graph's; activations={act!r} writes integer "
            "kernels of its own (use one or the other)"
        )
    return act


def export_safetensors(model: nn.Module, path: str | os.PathLike) -> ExportResult:
    """``save(model, path, packed=True)`` with the byte counts of its compressed layers."""
    layers = compressed_layers(model)
    out = save(model, path, packed=True)
    manifest = read_manifest(out)
    sizes: dict[str, int] = {}
    with safe_open(str(out / manifest["tensors"]), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            t = f.get_slice(key)
            n = 1
            for s in t.get_shape():
                n *= int(s)
            sizes[key] = n * _itemsize(t.get_dtype())
    layer_bytes = fp32 = 0
    dense: dict[str, str] = {}
    for name, info in manifest["layers"].items():
        fp32 += layers[name].module.weight.numel() * 4
        if info.get("packed"):
            layer_bytes += sum(
                sizes[g[part]] for g in info["groups"] for part in PARTS if part in g
            )
        else:
            layer_bytes += sizes[info["weight"]]
            dense[name] = "not exactly on its grid: stored as it is"
    return ExportResult(
        path=str(out),
        format="safetensors",
        files={p.name: p.stat().st_size for p in sorted(Path(out).iterdir()) if p.is_file()},
        layer_bytes=layer_bytes,
        layer_fp32_bytes=fp32,
        dense=dense,
        info={"version": manifest["version"]},
    )


_ITEMSIZE = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 8)
