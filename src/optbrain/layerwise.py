"""The public layer-level API: prune_layer, quantize_layer, compress_layer, and the method registry.

Every method is a function ``solve(W, H, spec) -> LayerResult`` registered under a name; the
three public functions validate their arguments into a ``CompressSpec``, call the solver, and
return the weight in W's dtype and device. ``H`` is ``2 Xᵀ X / N`` (see ``optbrain.core.hessian``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .core.checks import check_bits, check_damp, check_dtype, check_sparsity, check_weight_hessian
from .core.patterns import Pattern, parse_pattern
from .core.result import CompressSpec, LayerResult

Solver = Callable[[torch.Tensor, torch.Tensor, CompressSpec], LayerResult]
METHODS: dict[str, Solver] = {}


def register(name: str) -> Callable[[Solver], Solver]:
    """Register a layer solver under ``name`` (used as ``method=name``)."""

    def deco(fn: Solver) -> Solver:
        METHODS[name] = fn
        return fn

    return deco


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


def solve(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec, method: str = "obc") -> LayerResult:
    """Run a registered solver on a validated spec; the result is in W's dtype and device."""
    _ensure_registered()
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    check_weight_hessian(W, H)
    t0 = time.perf_counter()
    res = METHODS[method](W, H, spec)
    res.seconds = time.perf_counter() - t0
    res.weight = res.weight.to(dtype=W.dtype, device=W.device)
    if res.mask is not None:
        res.mask = res.mask.to(W.device)
        res.sparsity = float(1.0 - res.mask.float().mean())
    return res


def prune_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    *,
    method: str = "obc",
    damp: float = 0.01,
    dtype: torch.dtype = torch.float32,
    on_singular: str = "damp",
    **options: object,
) -> LayerResult:
    """Prune ``W (rows, cols)`` under ``H = 2 Xᵀ X / N (cols, cols)``.

    sparsity: fraction of weights removed, in [0, 1) (fixed by the pattern for N:M).
    pattern: "unstructured", "N:M" (e.g. "2:4") or "blockB" (e.g. "block4").
    For unstructured / block ExactOBS the result carries ``trace`` giving every other level.
    """
    if sparsity is None and parse_pattern(pattern).kind != "nm":
        raise ValueError("sparsity is required (a fraction in [0, 1)) unless pattern is N:M")
    return compress_layer(
        W,
        H,
        sparsity,
        pattern,
        method=method,
        damp=damp,
        dtype=dtype,
        on_singular=on_singular,
        **options,
    )


def quantize_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    *,
    sym: bool = True,
    group_size: int | None = None,
    method: str = "obc",
    damp: float = 0.01,
    dtype: torch.dtype = torch.float32,
    on_singular: str = "damp",
    **options: object,
) -> LayerResult:
    """Quantize ``W (rows, cols)`` to ``bits`` (per output channel, or per ``group_size``)."""
    if bits is None:
        raise ValueError("bits is required for quantize_layer (an integer >= 1)")
    return compress_layer(
        W,
        H,
        bits=bits,
        sym=sym,
        group_size=group_size,
        method=method,
        damp=damp,
        dtype=dtype,
        on_singular=on_singular,
        **options,
    )


def compress_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    bits: int | None = None,
    *,
    sym: bool = True,
    group_size: int | None = None,
    method: str = "obc",
    damp: float = 0.01,
    dtype: torch.dtype = torch.float32,
    on_singular: str = "damp",
    **options: object,
) -> LayerResult:
    """Prune and/or quantize ``W`` in one call (OBC compound when both are given)."""
    if sparsity is None and bits is None and parse_pattern(pattern).kind != "nm":
        raise ValueError("compress_layer needs a sparsity, an N:M pattern, or bits")
    spec = make_spec(
        W.shape[-1] if W.dim() == 2 else 0,
        sparsity=sparsity,
        pattern=pattern,
        bits=bits,
        sym=sym,
        group_size=group_size,
        damp=damp,
        dtype=dtype,
        on_singular=on_singular,
        **options,
    )
    return solve(W, H, spec, method)


def _ensure_registered() -> None:
    # solver modules register themselves on import
    from .core import auto, baselines, exact, gptq, sparsegpt  # noqa: F401
