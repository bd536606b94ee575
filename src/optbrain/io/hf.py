"""``format="compressed-tensors"``: a Hugging Face directory that plain transformers loads.

``export_compressed_tensors(model, path)`` writes, for a transformers model compressed by
``optbrain.compress``::

    config.json          the model's config with a ``quantization_config`` (compressed-tensors,
                         format ``pack-quantized``: one config group per (bits, sym, group_size),
                         targeting the compressed layers by name)
    model.safetensors    (or its shards) every quantized Linear as ``weight_packed`` (int32
                         words holding 32 / bits codes each), ``weight_scale`` and, for
                         asymmetric grids, ``weight_zero_point``; every other tensor as it is
    tokenizer files      copied from the directory the model was loaded from (``source``)

The packing is done by the compressed-tensors library from optbrain's own scales and zero
points (signed codes ``q = c − 2**(bits−1)``, see ``optbrain.io.packing``), and checked
against optbrain's codes before anything is written. ``AutoModelForCausalLM.from_pretrained``
(any ``AutoModel*``) dequantizes on load to ``scale · (q − zero_point)``, which for float32
models is **bit-identical** to the compressed weights (outputs equal, tolerance 0). bfloat16 /
float16 models are accepted when each weight is within one rounding of that dtype of its grid
value, but their loaded outputs are not checked by the tests yet.

Asymmetric grids are written ``naive-quantized`` (one int8 per code, about 0.27x fp32 at 4
bits): transformers cannot load ``pack-quantized`` zero points (vllm-project/llm-compressor#1618,
still so with compressed-tensors 0.20 and transformers 5.24).

What compressed-tensors cannot hold is written as plain weights and listed in
``ExportResult.dense`` with the reason: layers only pruned (compressed-tensors >= 0.15 has no
sparse format any more; their zeros are stored as they are) and grids over 8 bits. Layers it
cannot take at all — transformers' ``Conv1D`` (GPT-2), convolutions — are an error before work.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import packing
from .layers import CompressedLayer, ExportResult, compressed_layers

FORMAT = "compressed-tensors"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
PACKED_PARTS = ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_shape")


def _require_library() -> Any:
    try:
        import compressed_tensors
    except ImportError:
        raise ImportError(
            f"format={FORMAT!r} needs the compressed-tensors package: "
            "pip install 'optbrain[deploy]' (or pip install compressed-tensors)"
        ) from None
    return compressed_tensors


#: ``dtype=`` of the export: the float type of the tensors compressed-tensors does not pack
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_dtype(dtype: str | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype (None: the model's own), else a ValueError naming DTYPES."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(
            f"dtype={dtype!r} for format={FORMAT!r}: choose one of {list(DTYPES)} (the float "
            "type of the tensors left unquantized: embeddings, norms, biases, dense layers)"
        )
    return DTYPES[dtype]


def _cast_rest(model: nn.Module, packed: dict[str, CompressedLayer], dtype: torch.dtype) -> int:
    """Cast every floating parameter and buffer outside the packed layers to ``dtype``, in
    place (tied parameters stay tied: ``.data`` is replaced); returns how many tensors."""
    n = 0
    seen: set[int] = set()
    for name, m in model.named_modules():
        if name in packed:
            continue
        tensors = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
        for _, t in tensors:
            if t.is_floating_point() and t.dtype != dtype and id(t) not in seen:
                seen.add(id(t))
                t.data = t.data.to(dtype)
                n += 1
    return n


def _compute_dtype(out: Path, dtype: torch.dtype) -> None:
    """Write the model's compute dtype into ``out/config.json`` (``dtype`` and the older
    ``torch_dtype`` key): transformers then loads the stored float16 / bfloat16 tensors into
    a model of that dtype, and the packed layers' float32 scales stay float32."""
    import json

    cfg = out / "config.json"
    data = json.loads(cfg.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in data or key == "dtype":
            data[key] = name
    cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _check_model(model: nn.Module) -> None:
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise ValueError(
            f"format={FORMAT!r} writes Hugging Face transformers models (a PreTrainedModel "
            f"with save_pretrained), got {type(model).__name__}; use format='onnx' or "
            "format='safetensors' for other models"
        )


def _weight_codes(layer: CompressedLayer) -> torch.Tensor:
    """Signed codes of the layer's weight (checked to reproduce it)."""
    grid = layer.groups[0].grid
    w = layer.module.weight
    exact = w.dtype in (torch.float32, torch.float64)
    rtol = 0.0 if exact else float(torch.finfo(w.dtype).eps)
    c = packing.codes(layer.adapter.weight(0), grid, rtol=rtol)
    return packing.signed(c, grid.bits)


def _plan(layers: dict[str, CompressedLayer]) -> tuple[dict[str, CompressedLayer], dict[str, str]]:
    """(layers to pack, layers kept dense with the reason); errors for layers it cannot take."""
    packed: dict[str, CompressedLayer] = {}
    dense: dict[str, str] = {}
    for name, layer in layers.items():
        if layer.kind == "hf_conv1d":
            raise ValueError(
                f"layer {name!r} is a transformers Conv1D (GPT-2 style, weight stored "
                f"transposed); {FORMAT} packs nn.Linear layers only. Export this model with "
                "format='onnx' or format='safetensors', or compress only its Linear layers"
            )
        if layer.kind != "linear":
            raise ValueError(
                f"layer {name!r} is a {type(layer.module).__name__}; {FORMAT} packs "
                "nn.Linear layers only (use format='onnx' for convolutions)"
            )
        if not layer.quantized:
            dense[name] = "pruned only: compressed-tensors has no sparse format; zeros kept dense"
        elif layer.groups[0].bits > 8:
            dense[name] = f"{layer.groups[0].bits}-bit grid: compressed-tensors packs 1 to 8 bits"
        else:
            packed[name] = layer
    return packed, dense


def _scheme_key(layer: CompressedLayer) -> tuple[int, bool, int | None]:
    g = layer.groups[0].grid
    return g.bits, g.sym, g.group_size


def _format(sym: bool) -> str:
    """pack-quantized (``32 / bits`` codes per int32) for symmetric grids; asymmetric ones are
    naive-quantized (one int8 per code): transformers cannot load pack-quantized zero points
    (vllm-project/llm-compressor#1618, still so with compressed-tensors 0.20 / transformers 5)."""
    return "pack-quantized" if sym else "naive-quantized"


def _target(name: str) -> str:
    return "re:^" + re.escape(name) + "$"


def _quantization_config(packed: dict[str, CompressedLayer]) -> Any:
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    by_key: dict[tuple[int, bool, int | None], list[str]] = {}
    for name, layer in packed.items():
        by_key.setdefault(_scheme_key(layer), []).append(name)
    groups = {}
    for i, ((bits, sym, gs), names) in enumerate(sorted(by_key.items(), key=str)):
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=sym,
            strategy="channel" if gs is None else "group",
            group_size=gs,
        )
        groups[f"group_{i}"] = QuantizationScheme(
            targets=[_target(n) for n in names], weights=args, format=_format(sym)
        )
    return QuantizationConfig(config_groups=groups, ignore=[])


def _source_dir(model: nn.Module, source: str | os.PathLike | None) -> Path | None:
    if source is not None:
        d = Path(source)
        if not d.is_dir():
            raise ValueError(f"source {d} is not a directory (the model's Hugging Face folder)")
        return d
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    return Path(name) if name and Path(name).is_dir() else None


def _copy_tokenizer(src: Path | None, out: Path) -> list[str]:
    copied = []
    if src is None or src.resolve() == out.resolve():
        return copied
    for f in TOKENIZER_FILES:
        if (src / f).is_file() and not (out / f).exists():
            shutil.copy2(src / f, out / f)
            copied.append(f)
    return copied


def _tensor_bytes(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    sizes = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            n = 1
            for s in sl.get_shape():
                n *= int(s)
            sizes[k] = n * _DTYPE_BYTES[sl.get_dtype()]
    return sizes


_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def export_compressed_tensors(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    dtype: str | None = None,
) -> ExportResult:
    """Write ``model`` (a transformers model after ``optbrain.compress``) to directory ``path``
    in the compressed-tensors format; see the module docstring. ``source``: the directory the
    model came from, for its tokenizer files (default: the model's ``name_or_path`` when that
    is a directory). ``dtype`` (``"float16"``, ``"bfloat16"``, ``"float32"``; default: as the
    model has them): the float type of every tensor compressed-tensors does not pack (the
    embedding — tied to the LM head in small LMs, the largest tensor left —, norms, biases,
    pruned-only layers); the packed layers' scales keep the model's dtype, and config.json
    keeps the model's compute dtype, so transformers loads a model of that dtype whose packed
    layers dequantize exactly as without ``dtype``. The model itself is not changed.

    Atomic: the directory is written under a temporary name beside ``path`` and renamed into
    place when complete, so ``path`` is either absent or a whole export. ``path`` must not be a
    non-empty directory (checked before any work: transformers writes a directory, which cannot
    replace another one atomically)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{out} exists and is not an empty directory; choose a new output path or remove it "
            "(a compressed-tensors export is written whole into a fresh directory)"
        )
    _check_model(model)
    cast = check_dtype(dtype)
    layers = compressed_layers(model)
    packed, dense = _plan(layers)
    src = _source_dir(model, source)
    _require_library()
    codes = {name: _weight_codes(layer) for name, layer in packed.items()}

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import apply_quantization_config

    work = copy.deepcopy(model)
    compute = work.dtype if hasattr(work, "dtype") else torch.float32
    cast_tensors = _cast_rest(work, packed, cast) if cast is not None else 0
    new = dict(work.named_modules())
    if packed:
        apply_quantization_config(work, _quantization_config(packed))
        with torch.no_grad():
            for name, layer in packed.items():
                m, grid = new[name], layer.groups[0].grid
                m.weight_scale.copy_(grid.scale.to(m.weight_scale.dtype))
                m.weight_zero_point.copy_(packing.signed_zero(grid.zero, grid.bits))
        compressor = ModelCompressor.from_pretrained_model(work)
        compressor.compress_model(work)
        for name, layer in packed.items():  # the library packed exactly optbrain's codes
            m, grid = new[name], layer.groups[0].grid
            if grid.sym:
                got = unpack_from_int32(m.weight_packed, grid.bits, torch.Size(codes[name].shape))
            else:
                got = m.weight
            if not torch.equal(got.to(torch.int8), codes[name]):
                raise RuntimeError(
                    f"compressed-tensors packed other codes than optbrain's for {name!r}; "
                    "please report this (compressed-tensors version mismatch?)"
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        work.save_pretrained(str(tmp))
        if packed:
            compressor.update_config(str(tmp))
        if cast is not None:
            _compute_dtype(tmp, compute)
        copied = _copy_tokenizer(src, tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sizes: dict[str, int] = {}
    for f in sorted(out.glob("*.safetensors")):  # one file, or shards of a large model
        sizes.update(_tensor_bytes(f))
    layer_bytes = sum(sizes.get(f"{n}.{p}", 0) for n in packed for p in PACKED_PARTS)
    fp32 = sum(layer.module.weight.numel() * 4 for layer in packed.values())
    return ExportResult(
        path=str(out),
        format=FORMAT,
        files={f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()},
        layer_bytes=layer_bytes,
        layer_fp32_bytes=fp32,
        dense=dense,
        info={
            "packed_layers": list(packed),
            "tokenizer_files": copied,
            "dtype": None if cast is None else str(cast).removeprefix("torch."),
            "cast_tensors": cast_tensors,
        },
    )
