"""The allocation problem: one level per layer, least summed error, total cost within a budget.

    min Σ_l e[l][j_l]   subject to   Σ_l c[l][j_l] <= B

solved by dynamic programming over discretised costs (a multiple-choice knapsack). Costs are
first shifted by each layer's cheapest level (``c - min_j c[l][j]``; the shift is a constant),
then the remaining budget ``R = B - Σ_l min_j c[l][j]`` is cut into ``K`` units of size
``u = R / K`` and every cost is rounded **up** to whole units: ``d = ⌈(c - c_min) / u⌉``. A
solution with ``Σ d <= K`` then has ``Σ c <= B`` exactly — the budget is never exceeded, at the
price of possibly missing solutions that use the last fraction of a unit per layer. When the
shifted costs are integers and ``R <= resolution`` the unit is 1 and the DP is exact.

``dp[k]`` = least error of the layers so far with ``k`` units used; each layer is a min over its
levels of a shifted copy of the previous row: ``O(layers · levels · K)``, vectorised with numpy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Real

import numpy as np

DEFAULT_RESOLUTION = 10_000

__all__ = ["BudgetError", "Solution", "brute_force", "solve_dp"]


class BudgetError(ValueError):
    """No allocation meets the budget (even the cheapest level of every layer costs more)."""


@dataclass
class Solution:
    """choice[l]: the level index chosen for layer l; cost: its exact total cost; error: its
    total error; units / unit: the discretised total and the size of one unit; exact: True when
    no rounding of costs was needed (the DP optimum is the true optimum)."""

    choice: list[int]
    cost: Fraction
    error: float
    units: int = 0
    unit: Fraction = Fraction(1)
    exact: bool = True


def _fractions(costs: Sequence[Sequence[Real | Fraction]]) -> list[list[Fraction]]:
    out = []
    for row in costs:
        if len(row) == 0:
            raise ValueError("every layer needs at least one level")
        out.append([Fraction(c) for c in row])
    return out


def _check(costs: list[list[Fraction]], errors: Sequence[Sequence[float]]) -> list[list[float]]:
    if len(costs) != len(errors):
        raise ValueError(f"{len(costs)} cost rows but {len(errors)} error rows")
    out = []
    for l, (c, e) in enumerate(zip(costs, errors, strict=True)):
        if len(c) != len(e):
            raise ValueError(f"layer {l}: {len(c)} costs but {len(e)} errors")
        out.append([float(x) if math.isfinite(float(x)) else math.inf for x in e])
    return out


def _infeasible(costs: list[list[Fraction]], budget: Fraction) -> BudgetError:
    cheapest = sum(min(r) for r in costs)
    return BudgetError(
        f"no allocation meets the budget {float(budget):.6g}: the cheapest level of every "
        f"layer already costs {float(cheapest):.6g} in total; raise the budget or add cheaper "
        "levels to the database"
    )


def solve_dp(
    costs: Sequence[Sequence[Real | Fraction]],
    errors: Sequence[Sequence[float]],
    budget: Real | Fraction,
    resolution: int = DEFAULT_RESOLUTION,
) -> Solution:
    """The least-error choice of one level per layer with total cost ``<= budget``.

    costs, errors: ``[layer][level]`` (ragged: layers may have different level counts);
    costs are non-negative numbers (ints, floats or Fractions; floats are taken exactly).
    resolution: units the remaining budget is cut into (see the module docstring).
    Raises ``BudgetError`` when even the cheapest allocation exceeds the budget.
    """
    if int(resolution) < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution!r}")
    C = _fractions(costs)
    E = _check(C, errors)
    B = Fraction(budget)
    base = [min(r) for r in C]
    R = B - sum(base)
    if R < 0:
        raise _infeasible(C, B)
    rel = [[c - b for c in row] for row, b in zip(C, base, strict=True)]
    integral = all(x.denominator == 1 for row in rel for x in row)
    if R == 0:
        unit, K, exact = Fraction(1), 0, True
    elif integral and R <= resolution:
        unit, K, exact = Fraction(1), int(math.floor(R)), True
    else:
        unit, K, exact = R / int(resolution), int(resolution), False
    units = [[-((-x) // unit) for x in row] for row in rel]  # ceil, exact in rationals
    units = [[int(u) for u in row] for row in units]
    L = len(C)
    dp = np.full(K + 1, np.inf)
    dp[0] = 0.0
    arg = np.full((L, K + 1), -1, dtype=np.int32)
    for l in range(L):
        new = np.full(K + 1, np.inf)
        for j, (d, e) in enumerate(zip(units[l], E[l], strict=True)):
            if d > K or not math.isfinite(e):
                continue
            cand = np.full(K + 1, np.inf)
            cand[d:] = dp[: K + 1 - d] + e
            better = cand < new
            new[better] = cand[better]
            arg[l, better] = j
        dp = new
    if not np.isfinite(dp).any():
        raise _infeasible(C, B)
    k = int(np.argmin(dp))
    used = k
    choice = [0] * L
    for l in range(L - 1, -1, -1):
        j = int(arg[l, k])
        choice[l] = j
        k -= units[l][j]
    cost = sum((C[l][j] for l, j in enumerate(choice)), Fraction(0))
    err = float(sum(E[l][j] for l, j in enumerate(choice)))
    assert cost <= B, "discretisation must round costs up"
    return Solution(choice, cost, err, used, unit, exact)


def brute_force(
    costs: Sequence[Sequence[Real | Fraction]],
    errors: Sequence[Sequence[float]],
    budget: Real | Fraction,
) -> Solution:
    """Enumerate every allocation (tiny problems only): the true optimum, for tests."""
    C = _fractions(costs)
    E = _check(C, errors)
    B = Fraction(budget)
    best: Solution | None = None
    for choice in itertools.product(*(range(len(r)) for r in C)):
        cost = sum((C[l][j] for l, j in enumerate(choice)), Fraction(0))
        if cost > B:
            continue
        err = float(sum(E[l][j] for l, j in enumerate(choice)))
        if best is None or err < best.error:
            best = Solution(list(choice), cost, err)
    if best is None:
        raise _infeasible(C, B)
    return best
