"""The public layer-level API: prune_layer, quantize_layer, compress_layer.

Every method is a function ``solve(W, H, spec) -> LayerResult`` registered under a name
(``optbrain.core.methods``); the three public functions validate their arguments into a
``CompressSpec`` (``optbrain.core.spec.make_spec``), call the solver, and
return the weight in W's dtype and device. ``H`` is ``2 Xᵀ X / N`` (see ``optbrain.core.hessian``).
"""

from __future__ import annotations

import torch

from .methods import solve
from .patterns import parse_pattern
from .result import LayerResult
from .spec import (
    DEFAULT_DAMP,
    DEFAULT_DTYPE,
    DEFAULT_METHOD,
    DEFAULT_ON_SINGULAR,
    check_weight_hessian,
    make_spec,
)


def prune_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    *,
    method: str = DEFAULT_METHOD,
    damp: float = DEFAULT_DAMP,
    dtype: torch.dtype = DEFAULT_DTYPE,
    on_singular: str = DEFAULT_ON_SINGULAR,
    **options: object,
) -> LayerResult:
    """Prune ``W (rows, cols)`` under ``H = 2 Xᵀ X / N (cols, cols)``.

    sparsity: fraction of weights removed, in [0, 1) (fixed by the pattern for N:M).
    pattern: "unstructured", "N:M" (e.g. "2:4") or "blockB" (e.g. "block4").
    For unstructured / block ExactOBS the result carries ``trace`` giving every other level.
    """
    if not isinstance(W, torch.Tensor) or not isinstance(H, torch.Tensor):
        check_weight_hessian(W, H)  # the error naming what W / H should be
    if sparsity is None and parse_pattern(pattern).kind != "nm":
        raise ValueError("sparsity is required (a fraction in [0, 1)) unless pattern is N:M")
    shared = {"method": method, "damp": damp, "dtype": dtype, "on_singular": on_singular}
    return compress_layer(W, H, sparsity, pattern, **shared, **options)


def quantize_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    *,
    sym: bool = True,
    group_size: int | None = None,
    method: str = DEFAULT_METHOD,
    damp: float = DEFAULT_DAMP,
    dtype: torch.dtype = DEFAULT_DTYPE,
    on_singular: str = DEFAULT_ON_SINGULAR,
    **options: object,
) -> LayerResult:
    """Quantize ``W (rows, cols)`` to ``bits`` (per output channel, or per ``group_size``)."""
    if bits is None:
        raise ValueError("bits is required for quantize_layer (an integer >= 1)")
    shared = {"method": method, "damp": damp, "dtype": dtype, "on_singular": on_singular}
    return compress_layer(W, H, bits=bits, sym=sym, group_size=group_size, **shared, **options)


def compress_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    bits: int | None = None,
    *,
    sym: bool = True,
    group_size: int | None = None,
    method: str = DEFAULT_METHOD,
    damp: float = DEFAULT_DAMP,
    dtype: torch.dtype = DEFAULT_DTYPE,
    on_singular: str = DEFAULT_ON_SINGULAR,
    **options: object,
) -> LayerResult:
    """Prune and/or quantize ``W`` in one call (OBC compound when both are given)."""
    if not isinstance(W, torch.Tensor) or not isinstance(H, torch.Tensor):
        check_weight_hessian(W, H)  # the error naming what W / H should be
    if sparsity is None and bits is None and parse_pattern(pattern).kind != "nm":
        raise ValueError("compress_layer needs a sparsity, an N:M pattern, or bits")
    cols = W.shape[-1] if W.dim() == 2 else 0
    settings = (sparsity, pattern, bits, sym, group_size, damp, dtype, on_singular)
    spec = make_spec(cols, *settings, **options)  # make_spec's positional order
    return solve(W, H, spec, method)
