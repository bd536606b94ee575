"""GPTQ (``method="gptq"``): column-order quantization with lazy block updates, quantization only.

Every column ``p`` of ``W (rows, cols)``, in a fixed order shared by all rows, is rounded to
its grid value and the rounding error is spread over the not-yet-quantized columns with the
OBS update read off the upper Cholesky factor ``U`` of ``H⁻¹`` (see ``core.columnwise``)::

    e_p = (w_p − q(w_p)) / U_pp        w_j −= e_p U_pj  (j after p)        loss += ½ e_p²

Cost ``Θ(rows · cols²)`` (plus one ``Θ(cols³)`` factorization) instead of OBQ's
``Θ(rows · cols³)``. The accumulated ``½ Σ e_p²`` is exactly ``½ Σ_r δ_r H δ_rᵀ`` under the
damped ``H`` (the predicted loss equals the measured one).

Options (``spec.options``):

* ``block_size`` (int, default 128): lazy block width; the result does not depend on it beyond
  floating-point rounding.
* ``act_order`` (bool, default False): process columns by descending ``diag H``; the
  permutation is undone at the end (the grid keeps the original column layout).
* ``static_groups`` (bool, default False): with ``group_size``, fit every group's grid up front
  on the original weights. Otherwise a group's grid is fitted when its first column (in
  processing order — also with ``act_order``) is reached, from the current compensated values of
  the whole group; either way the returned ``QuantGrid`` is the grid each column was rounded on,
  so ``grid.on_grid(weight)`` holds.
* ``search`` (bool, default True): Hessian-weighted MSE scale search in ``fit_grid`` (the same
  grid as OBQ/OBC and RTN). ``False`` is plain min-max (faster on very large layers).
* ``clip_search`` (bool, default False): every row's grid chosen among GPTQ's own grid (the
  searched one, min-max with ``search=False``) and min-max grids of shrunk ranges by its loss
  after compensation (``core.clip_search``; 22 GPTQ passes; never worse per row than GPTQ's own
  grid). Per output channel or with ``static_groups``.

Without groups the grid is fitted on the original weights, exactly as OBQ does, so GPTQ, OBC and
RTN compare on the same grid; with ``H = c·I`` GPTQ reduces to round-to-nearest.
"""

from __future__ import annotations

import torch

from ..columnwise import option_bool
from ..result import LayerResult
from ..spec import CompressSpec, check_options
from .column import check_column, column_method

GPTQ_OPTIONS = ("block_size", "act_order", "static_groups", "search", "clip_search")


def check_gptq(spec: CompressSpec) -> tuple[bool, bool]:
    """Every option of GPTQ for ``spec``, checked before any work → ``(act_order,
    static_groups)``; pruning requests and missing bits are a ValueError."""
    check_options("gptq", spec.options, GPTQ_OPTIONS)
    if spec.prunes:
        raise ValueError(
            f"method 'gptq' quantizes only; it cannot prune (got pattern "
            f"{spec.pattern}, sparsity={spec.sparsity}); use method='sparsegpt' for pruning "
            "or pruning + quantization"
        )
    if not spec.quantizes:
        raise ValueError("method 'gptq' needs bits (it is a quantization method)")
    act_order = option_bool("gptq", spec.options, "act_order", False)
    static = option_bool("gptq", spec.options, "static_groups", False)
    check_column("gptq", spec, static)
    return act_order, static


def solve_gptq(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """GPTQ on one layer ``W (rows, cols)`` with ``H (cols, cols)``; see the module docstring."""
    act_order, static = check_gptq(spec)
    info = {"act_order": act_order, "static_groups": static}
    return column_method("gptq", W, H, spec, static_groups=static, act_order=act_order, info=info)
