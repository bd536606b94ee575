"""The one driver of the column-order solvers (GPTQ, SparseGPT) over ``core.columnwise``."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..clip_search import clip_search
from ..columnwise import column_solve, option_block, option_bool, upper_inverse_factor
from ..grid import fit_grid
from ..hessian import prepare_layer
from ..result import LayerResult, layer_result
from ..spec import CompressSpec


def check_clip_search(method: str, spec: CompressSpec, static_groups: bool) -> None:
    """``clip_search`` needs quantization without pruning on a static grid: a ValueError
    naming what is wrong otherwise (before any work)."""
    if spec.prunes or not spec.quantizes:
        raise ValueError(
            f"method {method!r}: clip_search chooses quantization grids; it needs bits and no "
            f"pruning (got bits={spec.bits}, pattern {spec.pattern}, sparsity={spec.sparsity})"
        )
    if spec.group_size is not None and not static_groups:
        raise ValueError(
            f"method {method!r}: clip_search with group_size={spec.group_size} needs "
            "static_groups=True (every candidate's groups are fitted on the original weights)"
        )


def check_column(method: str, spec: CompressSpec, static_groups: bool) -> tuple[int, bool, bool]:
    """The options ``column_method`` reads, checked before any work → ``(block_size, search,
    clip_search)``."""
    block = option_block(method, spec.options)
    search = option_bool(method, spec.options, "search", True)
    clip = option_bool(method, spec.options, "clip_search", False)
    if clip:
        check_clip_search(method, spec, static_groups)
    return block, search, clip


def column_method(
    method: str,
    W: torch.Tensor,
    H: torch.Tensor,
    spec: CompressSpec,
    *,
    static_groups: bool,
    act_order: bool = False,
    scope: str | None = None,
    info: dict | None = None,
) -> LayerResult:
    """The one driver of GPTQ and SparseGPT: prepare H, run ``column_solve`` with the spec's
    grid (and, given a ``scope``, its pruning pattern), build the result. ``act_order``: columns
    by descending ``diag H``. Reads the ``block_size``, ``search`` and ``clip_search`` options
    (``clip_search``: each row's grid chosen by its loss after compensation,
    ``core.clip_search``; quantization on a static grid only)."""
    block, search, clip = check_column(method, spec, static_groups)
    # Memory: only diag H and U (the upper factor of H⁻¹) are read by the solve, so without
    # act_order H⁻¹ is made over the copy of H and U over H⁻¹ (one (C, C) buffer throughout);
    # H is kept only where a fallback or the permutation needs it.
    Wc, prep = prepare_layer(W, H, spec, keep_hessian=act_order, column_major=True)
    perm = None
    if act_order:
        perm = torch.argsort(prep.diagonal, descending=True, stable=True)
    if perm is None:
        U, chol_fallback = upper_inverse_factor(None, prep.Hinv, overwrite=True)
        if U is None:  # H⁻¹ not positive definite in the compute dtype: U from H instead
            Wc, prep = prepare_layer(W, H, spec)
            U, chol_fallback = upper_inverse_factor(prep.H)
    else:
        Hp, Hip = prep.H[perm][:, perm], prep.Hinv[perm][:, perm]
        prep = replace(prep, Hinv=None)
        U, chol_fallback = upper_inverse_factor(Hp, Hip, overwrite=True)
        del Hp, Hip
    diagH = prep.diagonal
    prep = replace(prep, H=None, Hinv=None)
    prune = scope is not None
    kw = {"perm": perm, "block_size": block, "sym": spec.sym, "group_size": spec.group_size}
    if clip:  # the base candidate: the grid column_solve would fit (``search`` honoured)
        assert spec.bits is not None
        base = fit_grid(
            Wc, spec.bits, sym=spec.sym, group_size=spec.group_size, search=search, weight=diagH
        )
        out = clip_search(Wc, diagH, U, spec.bits, base, **kw)
    else:
        out = column_solve(
            Wc,
            diagH,
            U,
            bits=spec.bits,
            static_groups=static_groups,
            search=search,
            pattern=spec.pattern if prune and spec.prunes else None,
            sparsity=spec.sparsity if prune else None,
            scope=scope or "layer",
            **kw,
        )
    info = {**(info or {}), **out.info}
    if chol_fallback:
        info["cholesky"] = chol_fallback
    return layer_result(
        method, spec, out.weight, out.keep, out.row_loss, prep=prep, grid=out.grid, info=info
    )
