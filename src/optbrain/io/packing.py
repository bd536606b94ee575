"""Integer codes of quantized weights and their packed layouts (int4 pairs, int8, mask bits).

Pure tensor functions, no I/O. Conventions (those of ``optbrain.core.grid``): a weight
``W (rows, cols)`` on a grid with per-(row, group) ``scale`` and ``zero`` ``(rows, groups)`` has
the unsigned codes ``c = clamp(round(W / scale) + zero, 0, 2**bits − 1)`` and is::

    W = scale · (c − zero)            (per column: scale[:, col // group_size])

The solvers compute every quantized weight as ``scale · k`` in float32 with the integer
``k = c − zero``, so ``dequantize(codes(W))`` reproduces ``W`` **bit for bit** (the subtraction
of two small integers and one multiplication are exact in the same dtype). ``codes`` checks
this and raises when a weight is not on its grid (a model edited after compression).

Signed codes, used by compressed-tensors and ONNX: ``q = c − 2**(bits−1)`` with the zero point
``zero − 2**(bits−1)`` (0 for symmetric grids), and ``W = scale · (q − zero_point)``.

Packing: ``pack_int4`` stores two 4-bit values per byte, the first (even index along the last
dimension) in the low nibble, as ONNX's INT4/UINT4 do; ``pack_bits`` stores a bool mask eight
per byte, the first in the lowest bit (numpy's ``bitorder="little"``).
"""

from __future__ import annotations

import torch

from ..core.grid import QuantGrid


class NotOnGridError(ValueError):
    """A weight that is not ``scale · (code − zero)`` on the grid it was quantized with."""


def grid_of(
    scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool, group_size: int | None
) -> QuantGrid:
    """The ``QuantGrid`` of stored ``scale``/``zero`` ``(rows, groups)``."""
    return QuantGrid(scale=scale, zero=zero, bits=int(bits), sym=bool(sym), group_size=group_size)


def dequantize(
    codes: torch.Tensor, grid: QuantGrid, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``scale · (codes − zero)`` per column, in ``dtype`` (the weight's dtype)."""
    scale, zero = grid.columns(codes.shape[1])
    return scale.to(dtype) * (codes.to(dtype) - zero.to(dtype))


def codes(W: torch.Tensor, grid: QuantGrid, rtol: float = 0.0) -> torch.Tensor:
    """Unsigned integer codes ``(rows, cols)`` in ``[0, 2**bits − 1]`` (uint8 up to 8 bits, else
    int32) of ``W`` on ``grid``; raises ``NotOnGridError`` unless they reproduce ``W`` exactly
    (``rtol=0``) or within ``rtol · |W|`` (for weights stored in a narrower dtype than the
    grid was computed in, e.g. bfloat16: ``rtol = finfo(bfloat16).eps``)."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (rows, cols), got shape {tuple(W.shape)}")
    rows, cols = W.shape
    groups = 1 if grid.group_size is None else cols // grid.group_size
    if tuple(grid.scale.shape) != (rows, groups) or tuple(grid.zero.shape) != (rows, groups):
        raise ValueError(
            f"grid scale/zero have shapes {tuple(grid.scale.shape)}/{tuple(grid.zero.shape)}, "
            f"expected ({rows}, {groups}) for a {rows}x{cols} weight"
        )
    c = grid.to(dtype=W.dtype).codes(W)
    back = dequantize(c, grid, W.dtype)
    off = back != W if rtol == 0 else (back - W).abs() > rtol * W.abs()
    if bool(off.any()):
        bad = int(off.sum())
        err = float((back - W).abs().max())
        raise NotOnGridError(
            f"{bad} of {W.numel()} weights are not on their quantization grid (max error "
            f"{err:.3g}); was the model changed after optbrain.compress?"
        )
    return c.to(torch.uint8 if grid.bits <= 8 else torch.int32)


def signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (or zero points) shifted to ``[−2**(bits−1), 2**(bits−1) − 1]``: int8 up to
    8 bits, int16 up to 16."""
    off = 1 << (int(bits) - 1)
    out = codes.to(torch.int32) - off
    return out.to(torch.int8 if bits <= 8 else torch.int16)


def signed_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The grid's (integer-valued, float) zero points as signed zero points (see ``signed``)."""
    z = torch.round(zero)
    if not torch.equal(z, zero):
        raise ValueError("zero points must be integers")
    return signed(z.to(torch.int32), bits)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along the last dimension (odd length padded with 0); the
    low nibble holds the even index. Accepts unsigned ``[0, 15]`` or signed ``[−8, 7]`` codes."""
    v = values.to(torch.int32)
    if v.numel() and (int(v.min()) < -8 or int(v.max()) > 15):
        raise ValueError("pack_int4 takes values in [-8, 15] (4-bit unsigned or signed)")
    v = v & 0xF
    if v.shape[-1] % 2:
        v = torch.nn.functional.pad(v, (0, 1))
    lo, hi = v[..., 0::2], v[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int, signed: bool = False) -> torch.Tensor:
    """Inverse of ``pack_int4``: the first ``n`` values along the last dimension, as uint8
    (``signed=False``) or int8 sign-extended from 4 bits."""
    p = packed.to(torch.int32)
    v = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).flatten(-2)[..., :n]
    if signed:
        return torch.where(v >= 8, v - 16, v).to(torch.int8)
    return v.to(torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, eight per byte along the flattened tensor (first = lowest bit)."""
    m = mask.reshape(-1).to(torch.int32)
    pad = (-m.numel()) % 8
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (m.view(-1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of ``pack_bits``: a bool tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    p = packed.to(torch.int32).reshape(-1, 1)
    bits = (p >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:n].bool().reshape(tuple(shape))


def sparse_values(W: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bitmask layout of a pruned weight: ``(pack_bits(mask), W[mask])`` (kept values in
    row-major order); ``dense_from_sparse`` inverts it."""
    if mask.shape != W.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(W.shape)}")
    return pack_bits(mask), W[mask.bool()]


def dense_from_sparse(
    bits: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...] | torch.Size
) -> torch.Tensor:
    """The dense weight of ``shape`` from ``sparse_values``' bitmask and kept values."""
    mask = unpack_bits(bits, shape)
    out = torch.zeros(tuple(shape), dtype=values.dtype)
    out[mask] = values
    return out


def packed_nbytes(rows: int, cols: int, bits: int) -> int:
    """Bytes of ``rows · cols`` codes stored at ``bits`` (4-bit pairs, else whole bytes)."""
    if bits <= 4:
        return rows * ((cols + 1) // 2)
    return rows * cols * (1 if bits <= 8 else 2)
