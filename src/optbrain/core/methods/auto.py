"""``method="auto"``: exact OBC where it fits a time budget, GPTQ / SparseGPT where it does not.

The choice is made from the layer shape before anything runs, with a cost model of the exact
solver (``estimate_obc_seconds``)::

    seconds ≈ a · cols + b · rows · cols² + c · rows · cols³        (per part, summed)

``a`` is the per-greedy-step overhead, ``b`` the per-step row work, ``c`` the lazy ``H⁻¹``
downdates that dominate large layers. Constants (``COST``) were fitted by relative least squares
(``python benchmarks/fit_cost.py``) to ``method="obc"`` timings (best of 2, the guard included)
of the fused CPU kernel on this project's 2-core CPU machine with 1 torch thread, for 4-bit
quantization, 50% unstructured, 2:4 and 50% block4 pruning, on ``rows × cols`` in {32×64,
64×128, 128×128, 32×256, 128×256, 256×256, 64×512, 256×512, 512×512, 128×1024, 256×1024,
576×1536}; the model is within 0.75–1.35× of those timings above 0.05 s (e.g. 256×512 4-bit:
0.53 s measured, 0.55 s modelled; 576×1536 50%: 29.2 s measured, 28.7 s modelled; 4096×4096
4-bit: about 45 minutes modelled). Block pruning runs the tensor engine (no fused scorer).
Compound (prune + quantize) is the sum of its two parts, and unstructured/block pruning cost
does not depend on the sparsity (the exact solver records the full trace). On a faster or
idle machine the estimate is pessimistic, i.e. auto errs towards the fast solver.

Options: ``time_budget`` (seconds per layer, default 30; 0 always picks the fast solver,
``float("inf")`` always OBC), plus the options of the solvers it may run: each solver
receives its own, and all are checked against every solver auto may pick (``check_auto``), so
whether a recipe is valid does not depend on a layer's size. The result's ``method`` says
which solver ran and ``info["auto"]`` records the decision: ``{"solver",
"estimated_obc_seconds", "time_budget"}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from ..result import Check, LayerResult, Solver
from ..spec import CompressSpec
from .gptq import GPTQ_OPTIONS, check_gptq, solve_gptq
from .obc import OPTIONS as OBC_OPTIONS
from .obc import LevelLike, check_obc, solve_obc
from .sparsegpt import SPARSEGPT_OPTIONS, check_sparsegpt, solve_sparsegpt

#: ``method="auto"``: seconds of modelled exact solving allowed per layer and spec.
DEFAULT_BUDGET = 30.0
#: The budget database's ``solver="auto"`` (``budget.database.DbSettings.time_budget``): seconds
#: for *all* levels of a layer (a dozen or more solves sharing one trace), hence larger.
DATABASE_TIME_BUDGET = 300.0

# part -> (a, b, c): seconds ≈ a·cols + b·rows·cols² + c·rows·cols³ (see the module docstring)
COST: dict[str, tuple[float, float, float]] = {
    "quant": (2.0e-4, 2.3e-9, 8.7e-12),
    "unstructured": (1.2e-4, 5.7e-9, 9.9e-12),
    "nm": (3.8e-5, 2.9e-9, 6.1e-12),
    "block": (2.1e-4, 3.3e-8, 1.8e-11),
}


def part_seconds(part: str, rows: int, cols: int) -> float:
    """Modelled seconds of one part (a key of ``COST``) of the exact solver on ``rows × cols``."""
    a, b, c = COST[part]
    return a * cols + b * rows * cols**2 + c * rows * cols**3


def estimate_obc_seconds(rows: int, cols: int, spec: CompressSpec) -> float:
    """Modelled seconds of ``method="obc"`` on a ``rows × cols`` layer for ``spec``."""
    parts = []
    if spec.prunes:
        parts.append(spec.pattern.kind)
    if spec.quantizes:
        parts.append("quant")
    total = 0.0
    for p in parts:
        total += part_seconds(p, rows, cols)
    return total


def estimate_levels_seconds(rows: int, cols: int, levels: Iterable[LevelLike]) -> float:
    """Modelled seconds of ``obc.solve_obc_levels`` for all ``levels`` of one layer: one
    unstructured trace shared by every sparsity, one N:M solve per pattern, one OBQ per
    quantized level."""
    levels = list(levels)
    t = 0.0
    if any(lv.sparsity for lv in levels):
        t += part_seconds("unstructured", rows, cols)
    t += sum(part_seconds("nm", rows, cols) for p in {lv.pattern for lv in levels if lv.pattern})
    t += sum(part_seconds("quant", rows, cols) for lv in levels if lv.bits is not None)
    return t


def predicted_seconds(method: str, rows: int, cols: int, spec: CompressSpec) -> float | None:
    """Modelled seconds of ``method`` on one ``rows × cols`` part, or None where there is no
    model (the fast solvers and structured OBS, which take seconds at most): ``"obc"`` its
    estimate, ``"auto"`` the estimate when it would choose OBC within its ``time_budget``."""
    if spec.pattern.structured or method not in ("obc", "auto"):
        return None
    est = estimate_obc_seconds(rows, cols, spec)
    if method == "auto" and est > _budget(spec.options):
        return None
    return est


def _budget(options: dict) -> float:
    v = options.get("time_budget", DEFAULT_BUDGET)
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or v < 0:
        raise ValueError(f"method 'auto': time_budget must be a number of seconds >= 0, got {v!r}")
    return float(v)


def _fast(spec: CompressSpec) -> tuple[str, Solver, Check, tuple[str, ...]]:
    if spec.prunes:
        return "sparsegpt", solve_sparsegpt, check_sparsegpt, SPARSEGPT_OPTIONS
    return "gptq", solve_gptq, check_gptq, GPTQ_OPTIONS


def _sub(spec: CompressSpec, keys: Iterable[str]) -> CompressSpec:
    keys = set(keys)
    return dataclasses.replace(spec, options={k: v for k, v in spec.options.items() if k in keys})


def check_auto(spec: CompressSpec) -> float:
    """Every option of ``method="auto"`` for ``spec``, checked before any work → the time
    budget. The options go to every solver auto may pick on some layer size (exact OBC and
    GPTQ / SparseGPT, only one of them with ``time_budget`` 0 or ∞), so a recipe is valid or
    not whatever the layer's size; ``channels`` / ``heads``: structured OBS, no options."""
    allowed = {"time_budget", *OBC_OPTIONS, *GPTQ_OPTIONS, *SPARSEGPT_OPTIONS}
    bad = sorted(set(spec.options) - allowed)
    if bad:
        raise ValueError(
            f"method 'auto' does not take option(s) {bad}; its options are {sorted(allowed)}"
        )
    budget = _budget(spec.options)
    if spec.pattern.structured:
        check_obc(_sub(spec, set(spec.options) - {"time_budget"}))
        return budget
    fast, _, fast_check, fast_keys = _fast(spec)
    runs: list[tuple[str, Check, tuple[str, ...]]] = [
        ("obc", check_obc, OBC_OPTIONS),
        (fast, fast_check, fast_keys),
    ]
    if budget == 0:
        runs = runs[1:]
    elif budget == math.inf:
        runs = runs[:1]
    for name, check, keys in runs:
        try:
            check(_sub(spec, keys))
        except ValueError as e:
            which = "within" if name == "obc" else "over"
            raise ValueError(
                f"method 'auto' runs {name} on layers {which} its time budget: {e}"
            ) from None
    return budget


def solve_auto(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """Run OBC if its modelled time fits ``time_budget``, else GPTQ (quantization only) or
    SparseGPT (pruning, or pruning + quantization); ``channels`` / ``heads``: always OBC
    (structured OBS)."""
    budget = check_auto(spec)
    rows, cols = W.shape
    est = 0.0 if spec.pattern.structured else estimate_obc_seconds(rows, cols, spec)
    if spec.pattern.structured:  # structured OBS shares one H⁻¹ per layer: always affordable
        name, fn, keys = "obc", solve_obc, ()
    elif est <= budget:
        name, fn, keys = "obc", solve_obc, OBC_OPTIONS
    else:
        name, fn, _, keys = _fast(spec)
    res = fn(W, H, _sub(spec, keys))
    res.info["auto"] = {
        "solver": name,
        "estimated_obc_seconds": est,
        "time_budget": budget,
    }
    return res
