"""SparseGPT (``method="sparsegpt"``): column-block pruning, adaptive masks, optional quantization.

Columns of ``W (rows, cols)`` are fixed left to right with the OBS update read off the upper
Cholesky factor ``U`` of ``H⁻¹`` (see ``core.columnwise``). At the start of every lazy block
(``block_size`` columns) the mask of the block is chosen from the current weights with the OBS
saliency ``w_p² / U_pp²`` — the exact cost of zeroing ``w_p`` at that point of the sweep::

    unstructured  the round(s·R·i2) − round(s·R·i1) smallest saliencies of the block (all rows,
                  or per row with ``scope="row"``) → exactly round(s · rows · cols) zeros
    N:M           in every group of M consecutive columns, the M − N smallest of each row
                  (chosen when the group's first column is reached, from current values)
    blockB        pattern blocks scored by ½ ‖U_BB⁻ᵀ w_B‖² (the exact cost of zeroing the block)

Pruned weights become exactly 0. With ``bits`` every kept weight is rounded to its grid value
(the compound of pruning and GPTQ in one sweep), and 0 is always a grid level. The accumulated
``½ Σ e_p²`` is exactly ``½ Σ_r δ_r H δ_rᵀ`` under the damped ``H``.

Options: ``block_size`` (int, default 128; rounded up to a multiple of M or of the pattern
block), ``scope`` ("layer" default | "row"), and for quantization ``static_groups`` and
``search`` (as in GPTQ). Columns are processed in natural order (no ``act_order``).
"""

from __future__ import annotations

import torch

from ..columnwise import column_solve, option_block, option_bool, option_scope
from ..hessian import prepare_layer
from ..result import LayerResult, layer_result, unchanged
from ..spec import CompressSpec, check_options

SPARSEGPT_OPTIONS = ("block_size", "scope", "static_groups", "search")


def solve_sparsegpt(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """SparseGPT on one layer ``W (rows, cols)``; see the module docstring."""
    check_options("sparsegpt", spec.options, SPARSEGPT_OPTIONS)
    opts = spec.options
    block = option_block("sparsegpt", opts)
    scope = option_scope("sparsegpt", opts)
    static = option_bool("sparsegpt", opts, "static_groups", False)
    search = option_bool("sparsegpt", opts, "search", True)
    if not spec.prunes and not spec.quantizes:
        return unchanged(W, "sparsegpt", spec)
    Wc, prep = prepare_layer(W, H, spec)
    out = column_solve(
        Wc,
        prep,
        block_size=block,
        bits=spec.bits,
        sym=spec.sym,
        group_size=spec.group_size,
        static_groups=static,
        search=search,
        pattern=spec.pattern if spec.prunes else None,
        sparsity=spec.sparsity,
        scope=scope,
    )
    info = {"scope": scope, **out.info}
    return layer_result(
        "sparsegpt", spec, out.weight, out.keep, out.row_loss, prep=prep, grid=out.grid, info=info
    )
