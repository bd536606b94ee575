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

from ..columnwise import option_bool, option_scope
from ..result import LayerResult, unchanged
from ..spec import CompressSpec, check_options
from .column import check_column, column_method

SPARSEGPT_OPTIONS = ("block_size", "scope", "static_groups", "search")


def check_sparsegpt(spec: CompressSpec) -> tuple[str, bool]:
    """Every option of SparseGPT for ``spec``, checked before any work → ``(scope,
    static_groups)``."""
    check_options("sparsegpt", spec.options, SPARSEGPT_OPTIONS)
    scope = option_scope("sparsegpt", spec.options)
    static = option_bool("sparsegpt", spec.options, "static_groups", False)
    check_column("sparsegpt", spec, static)
    return scope, static


def solve_sparsegpt(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """SparseGPT on one layer ``W (rows, cols)``; see the module docstring."""
    scope, static = check_sparsegpt(spec)
    if not spec.prunes and not spec.quantizes:
        return unchanged(W, "sparsegpt", spec)
    info = {"scope": scope}
    return column_method("sparsegpt", W, H, spec, static_groups=static, scope=scope, info=info)
