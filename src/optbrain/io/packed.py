"""Packed weights of a run directory (checkpoint version 3): integer codes and mask bits, no floats.

One weight group ``W (rows, cols)`` of a compressed layer (``optbrain.io.layers``) is stored
as the tensors below (keys ``{prefix}.{part}``), described by a manifest entry::

    mask     uint8, ``packing.pack_bits(mask)``: one bit per weight (only when pruned)
    values   the kept entries of W in row-major order (all of them when not pruned), as
               "int4"   unsigned codes, two per byte (``packing.pack_int4``), grids up to 4 bits
               "uint8"  unsigned codes, grids of 5 to 8 bits
               "int32"  unsigned codes, grids over 8 bits
               "float"  the weights themselves (layers only pruned), in the weight's dtype
    scale    the grid's scales ``(rows, groups)`` as they are (float)
    zero     the grid's zero points ``(rows, groups)``: uint8 (integers, up to 8 bits) or as
             they are

and read back with ``W = scale · (c − zero)`` per column (``packing.dequantize``), pruned
entries 0. The solvers compute every quantized weight as exactly that float32 product, so the
weights read back are **equal** to the compressed model's (``torch.equal``; the sign of a
pruned zero is not kept). A weight that is not on its grid (edited after compression, or a
bfloat16 model whose products were rounded) raises ``packing.NotOnGridError``; the checkpoint
then stores that layer's weight as it is (``layer_entry`` returns None).

Bytes per weight: 4-bit ``0.5``, 2:4 + 4-bit ``0.25 + 0.125`` (codes of the kept half + mask
bits), against 4 for float32; plus the scales.
"""

from __future__ import annotations

from typing import Any

import torch

from . import packing
from .layers import CompressedLayer

ENCODINGS = ("int4", "uint8", "int32", "float")


def _encoding(bits: int | None) -> str:
    if bits is None:
        return "float"
    return "int4" if bits <= 4 else "uint8" if bits <= 8 else "int32"


def pack_group(
    W: torch.Tensor,
    mask: torch.Tensor | None,
    grid: Any,
    prefix: str,
    tensors: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Put group ``W (rows, cols)``'s packed tensors into ``tensors`` and return its manifest
    entry. ``mask`` (bool, True = kept) or ``grid`` (``QuantGrid``) may be None, not both.

    Raises ``packing.NotOnGridError`` when W is not on ``grid`` or pruned entries are not 0.
    """
    if mask is None and grid is None:
        raise ValueError(f"{prefix}: a compressed group has a mask, a grid or both")
    rows, cols = W.shape
    info: dict[str, Any] = {"rows": int(rows), "cols": int(cols)}
    if mask is not None:
        mask = mask.bool()
        if tuple(mask.shape) != (rows, cols):
            raise ValueError(f"{prefix}: mask {tuple(mask.shape)} != weight {(rows, cols)}")
        if bool((W[~mask] != 0).any()):
            raise packing.NotOnGridError(f"{prefix}: pruned weights are not zero")
        tensors[f"{prefix}.mask"] = packing.pack_bits(mask)
        info["mask"] = f"{prefix}.mask"
    if grid is None:
        values = W if mask is None else W[mask]
        enc = "float"
    else:
        c = packing.codes(W, grid)
        values = c if mask is None else c[mask]
        enc = _encoding(grid.bits)
        info.update(bits=int(grid.bits), sym=bool(grid.sym), group_size=grid.group_size)
        tensors[f"{prefix}.scale"] = grid.scale.detach().cpu().contiguous()
        info["scale"] = f"{prefix}.scale"
        zero = grid.zero.detach().cpu()
        info["zero_dtype"] = str(zero.dtype).removeprefix("torch.")
        z = torch.round(zero)
        if grid.bits <= 8 and torch.equal(z, zero) and bool((z >= 0).all() and (z <= 255).all()):
            zero = z.to(torch.uint8)
        tensors[f"{prefix}.zero"] = zero.contiguous()
        info["zero"] = f"{prefix}.zero"
    values = values.reshape(-1)
    info["count"] = int(values.numel())
    if enc == "int4":
        values = packing.pack_int4(values)
    elif enc == "int32":
        values = values.to(torch.int32)
    tensors[f"{prefix}.values"] = values.detach().cpu().contiguous()
    info["values"] = f"{prefix}.values"
    info["encoding"] = enc
    return info


def unpack_group(
    info: dict[str, Any], tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(W (rows, cols) in dtype, mask or None, scale or None, zero or None)`` of an entry
    written by ``pack_group`` (zero back in its original dtype). Raises ValueError (with the
    key) when a tensor is missing or has the wrong size."""
    rows, cols = int(info["rows"]), int(info["cols"])
    enc = info["encoding"]
    if enc not in ENCODINGS:
        raise ValueError(f"{info['values']}: unknown encoding {enc!r}")

    def get(part: str) -> torch.Tensor:
        t = tensors.get(info[part])
        if t is None:
            raise ValueError(f"tensor {info[part]!r} is missing")
        return t

    mask = None
    if "mask" in info:
        bits = get("mask")
        if bits.numel() != (rows * cols + 7) // 8:
            raise ValueError(f"{info['mask']}: {bits.numel()} bytes for a {rows}x{cols} mask")
        mask = packing.unpack_bits(bits, (rows, cols))
    n = int(info["count"])
    if n != (rows * cols if mask is None else int(mask.sum())):
        raise ValueError(f"{info['values']}: {n} values do not fit the mask / shape")
    raw = get("values")
    vals = packing.unpack_int4(raw, n) if enc == "int4" else raw.reshape(-1)[:n]
    if vals.numel() != n:
        raise ValueError(f"{info['values']}: {vals.numel()} values, expected {n}")
    if enc == "float":
        W = torch.zeros(rows, cols, dtype=dtype)
        if mask is None:
            W = vals.to(dtype).reshape(rows, cols).clone()
        else:
            W[mask] = vals.to(dtype)
        return W, mask, None, None
    scale = get("scale")
    zero = get("zero").to(getattr(torch, info["zero_dtype"]))
    grid = packing.grid_of(scale, zero, info["bits"], info["sym"], info["group_size"])
    _, zcols = grid.columns(cols)
    c = torch.round(zcols).to(torch.int32)  # pruned entries: code = zero point → weight 0
    if mask is None:
        c = vals.to(torch.int32).reshape(rows, cols)
    else:
        c[mask] = vals.to(torch.int32)
    W = packing.dequantize(c, grid, dtype)
    if mask is not None:
        W = torch.where(mask, W, torch.zeros((), dtype=dtype))
    return W, mask, scale, zero


def layer_entry(
    layer: CompressedLayer, prefix: str, tensors: dict[str, torch.Tensor]
) -> list[dict[str, Any]] | None:
    """The packed manifest entries of every group of ``layer`` (tensors added to ``tensors``),
    or None (and nothing added) when a group cannot be packed exactly."""
    mine: dict[str, torch.Tensor] = {}
    try:
        groups = [
            pack_group(layer.adapter.weight(g), grp.mask, grp.grid, f"{prefix}.g{g}", mine)
            for g, grp in enumerate(layer.groups)
        ]
    except packing.NotOnGridError:
        return None
    tensors.update(mine)
    return groups
