"""Non-uniform compression to a global budget (issue #6): a per-layer database of compressed
levels with their errors, cost models (params, FLOPs, BOPs, size, latency), and a dynamic
program choosing one level per layer under the budget.

    from optbrain.budget import compress_to_budget
    report = compress_to_budget(model, calibration, target="flops=0.25", db_dir="db/")

* ``levels``   — ``Level(sparsity, pattern, bits, channels)`` with stable ids (``"s0.5+b4"``,
  ``"c0.25"``), grids (``default_levels``, ``structured_levels``)
* ``channels`` — channel levels: where they apply (what ``shrink`` honours), their solve
* ``latency``  — the measured per-machine latency table (cached)
* ``database`` — build / resume / reuse the on-disk database, fingerprint checks
* ``costs``    — cost models per layer and level, ``parse_target("bops=1/12")``
* ``solver``   — the DP (``solve_dp``) and a brute force for tests
* ``api``      — ``compress_to_budget``, ``plan_allocation``, ``apply_allocation``
* ``allocation_svg`` (from ``report.charts``): the level chosen per layer as an inline SVG
"""

from ..report.charts import allocation_svg
from .api import OBJECTIVES, Allocation, apply_allocation, compress_to_budget, plan_allocation
from .costs import DENSE_BITS, METRICS, Target, level_cost, parse_target
from .database import (
    Database,
    DatabaseError,
    DatabaseMismatchError,
    DbSettings,
    build_database,
    fingerprint,
)
from .latency import LatencyCache, latency_table
from .levels import Level, default_levels, normalize_levels, structured_levels
from .solver import BudgetError, Solution, brute_force, solve_dp

__all__ = [
    "DENSE_BITS",
    "METRICS",
    "OBJECTIVES",
    "Allocation",
    "BudgetError",
    "Database",
    "DatabaseError",
    "DatabaseMismatchError",
    "DbSettings",
    "LatencyCache",
    "Level",
    "Solution",
    "Target",
    "allocation_svg",
    "apply_allocation",
    "brute_force",
    "build_database",
    "compress_to_budget",
    "default_levels",
    "fingerprint",
    "latency_table",
    "level_cost",
    "normalize_levels",
    "parse_target",
    "plan_allocation",
    "solve_dp",
    "structured_levels",
]
