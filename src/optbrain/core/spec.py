"""CompressSpec, what to do to one layer, and its one validator (make_spec); every failure is a
ValueError naming the argument."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .patterns import Pattern, parse_pattern


def check_weight_hessian(W: torch.Tensor, H: torch.Tensor) -> None:
    """Validate a layer problem: ``W (rows, cols)`` and ``H (cols, cols)``, finite, floating."""
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if not isinstance(H, torch.Tensor):
        raise ValueError(f"H must be a torch.Tensor, got {type(H).__name__}")
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (rows, cols), got shape {tuple(W.shape)}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square (cols, cols), got shape {tuple(H.shape)}")
    if H.shape[0] != W.shape[1]:
        raise ValueError(
            f"H has shape {tuple(H.shape)} but W has {W.shape[1]} columns; H must be (cols, cols)"
        )
    if W.numel() == 0:
        raise ValueError(f"W is empty (shape {tuple(W.shape)})")
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got dtype {W.dtype}")
    if not H.is_floating_point():
        raise ValueError(f"H must be a floating-point tensor, got dtype {H.dtype}")
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).nonzero()[0].tolist()
        raise ValueError(f"W contains NaN or Inf (first at row {bad[0]}, col {bad[1]})")
    if not torch.isfinite(H).all():
        bad = (~torch.isfinite(H)).nonzero()[0].tolist()
        raise ValueError(f"H contains NaN or Inf (first at [{bad[0]}, {bad[1]}])")
    if W.device != H.device:
        raise ValueError(f"W is on {W.device} but H is on {H.device}; put both on one device")
    Hd = H.double()
    scale = Hd.abs().max().clamp_min(1e-30)
    if (Hd - Hd.T).abs().max() > 1e-4 * scale:
        raise ValueError("H must be symmetric (H = 2 X X^T / N); got an asymmetric matrix")
    if (torch.diagonal(Hd) < -1e-6 * scale).any():
        raise ValueError("H has negative diagonal entries; it is not a valid Hessian 2 X X^T / N")


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Sparsity is the pruned fraction, in [0, 1)."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return s


def check_bits(bits: int) -> int:
    """Bit width: an integer >= 1 (at most 16)."""
    if isinstance(bits, bool) or not isinstance(bits, int | float) or int(bits) != bits:
        raise ValueError(f"bits must be an integer >= 1, got {bits!r}")
    if not (1 <= int(bits) <= 16):
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    return int(bits)


def check_damp(damp: float) -> float:
    """Relative damping: a finite number >= 0."""
    try:
        d = float(damp)
    except (TypeError, ValueError):
        raise ValueError(f"damp must be a number >= 0, got {damp!r}") from None
    if not (d >= 0.0) or d != d or d == float("inf"):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    return d


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype: float32 (default) or float64."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def check_options(method: str, options: dict, allowed: Iterable[str]) -> None:
    """Unknown option names are a ValueError naming the method (catches typos early)."""
    allowed = sorted(allowed)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(
            f"method {method!r} does not take option(s) {bad}; its options are {allowed}"
        )


@dataclass(frozen=True)
class CompressSpec:
    """What to do to one layer. Built and validated by ``make_spec``.

    sparsity: pruned fraction in [0, 1) or None (no pruning; for N:M it is fixed by the pattern).
    pattern: parsed pruning pattern. bits: None for no quantization. sym / group_size: grid.
    damp: relative damping (λ = damp · mean diag H). dtype: compute dtype (float32 / float64).
    on_singular: policy when H cannot be inverted ("raise" | "damp" | "eig").
    options: method-specific knobs (e.g. ``block_size`` for GPTQ, ``act_order``).
    """

    sparsity: float | None = None
    pattern: Pattern = field(default_factory=lambda: Pattern("unstructured"))
    bits: int | None = None
    sym: bool = True
    group_size: int | None = None
    damp: float = 0.01
    dtype: torch.dtype = torch.float32
    on_singular: str = "damp"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def prunes(self) -> bool:
        return self.pattern.kind == "nm" or (self.sparsity is not None and self.sparsity > 0)

    @property
    def quantizes(self) -> bool:
        return self.bits is not None


def make_spec(
    cols: int,
    sparsity: float | None = None,
    pattern: str | Pattern = "unstructured",
    bits: int | None = None,
    sym: bool = True,
    group_size: int | None = None,
    damp: float = 0.01,
    dtype: torch.dtype = torch.float32,
    on_singular: str = "damp",
    **options: object,
) -> CompressSpec:
    """Validate arguments into a ``CompressSpec`` for a layer with ``cols`` input columns."""
    pat = parse_pattern(pattern)
    pat.check_cols(cols)
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    if pat.kind == "nm":
        fixed = pat.fixed_sparsity
        if sparsity is not None and sparsity > 0 and abs(sparsity - fixed) > 1e-9:
            raise ValueError(
                f"sparsity={sparsity} contradicts pattern {pat} (which fixes sparsity {fixed:g}); "
                "leave sparsity unset for N:M"
            )
        sparsity = fixed
    elif pat.kind == "block" and sparsity is None:
        raise ValueError(f"pattern {pat} needs a sparsity (fraction of blocks to remove)")
    if bits is not None:
        bits = check_bits(bits)
    if not isinstance(sym, bool):
        raise ValueError(f"sym must be True or False, got {sym!r}")
    if group_size is not None:
        if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1:
            raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
        if cols % int(group_size) != 0:
            raise ValueError(f"group_size={group_size} does not divide the {cols} columns of W")
        group_size = int(group_size)
    return CompressSpec(
        sparsity=sparsity,
        pattern=pat,
        bits=bits,
        sym=sym,
        group_size=group_size,
        damp=check_damp(damp),
        dtype=check_dtype(dtype),
        on_singular=on_singular,
        options=dict(options),
    )
