"""The allocation DP against brute force, and the budget guarantee under discretisation."""

import math
import random
from fractions import Fraction

import pytest

from optbrain.budget import BudgetError, brute_force, solve_dp


def _instance(rng: random.Random, integer: bool):
    layers = rng.randint(1, 5)
    costs, errors = [], []
    for _ in range(layers):
        k = rng.randint(1, 5)
        if integer:
            costs.append([rng.randint(0, 20) for _ in range(k)])
        else:
            costs.append([rng.uniform(0, 20) for _ in range(k)])
        errors.append([rng.choice([0.0, rng.random(), rng.expovariate(1.0)]) for _ in range(k)])
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    budget = rng.randint(math.ceil(lo), math.ceil(hi)) if integer else rng.uniform(lo, hi)
    return costs, errors, budget


@pytest.mark.parametrize("seed", range(300))
def test_dp_equals_brute_force_on_integer_costs(seed):
    rng = random.Random(seed)
    costs, errors, budget = _instance(rng, integer=True)
    dp = solve_dp(costs, errors, budget)
    bf = brute_force(costs, errors, budget)
    assert dp.exact
    assert dp.cost <= budget
    assert dp.error == pytest.approx(bf.error, rel=1e-12, abs=1e-12)
    assert sum(costs[l][j] for l, j in enumerate(dp.choice)) == dp.cost


@pytest.mark.parametrize("seed", range(300))
def test_dp_float_costs_never_exceed_budget_and_solve_the_rounded_problem(seed):
    """Coarse units: the DP's choice is feasible (costs rounded up), it is the optimum of the
    rounded problem, and no better than the true optimum."""
    rng = random.Random(1000 + seed)
    costs, errors, budget = _instance(rng, integer=False)
    resolution = rng.choice([1, 3, 7, 50, 10_000])
    try:
        bf = brute_force(costs, errors, budget)
    except BudgetError:  # float sums: the cheapest total may land a hair above the budget
        with pytest.raises(BudgetError):
            solve_dp(costs, errors, budget, resolution=resolution)
        return
    dp = solve_dp(costs, errors, budget, resolution=resolution)
    exact = [[Fraction(c) for c in row] for row in costs]
    assert sum(exact[l][j] for l, j in enumerate(dp.choice)) == dp.cost <= Fraction(budget)
    assert dp.error >= bf.error - 1e-12
    # the rounded problem the DP solves exactly: shifted costs in whole units, rounded up
    base = [min(r) for r in exact]
    R = Fraction(budget) - sum(base)
    unit = R / resolution if R > 0 else Fraction(1)
    units = [[math.ceil((c - b) / unit) for c in row] for row, b in zip(exact, base, strict=True)]
    rounded = brute_force(units, errors, resolution if R > 0 else 0)
    assert dp.error == pytest.approx(rounded.error, rel=1e-12, abs=1e-12)


def test_dp_infeasible_budget_raises():
    with pytest.raises(BudgetError, match="cheapest"):
        solve_dp([[5, 7], [3]], [[0, 0], [0]], 7)


def test_dp_exact_budget_edge():
    # the budget equals the only feasible total exactly
    sol = solve_dp([[1, 4], [2, 9]], [[1.0, 0.0], [1.0, 0.0]], Fraction(6))
    assert sol.choice == [1, 0] and sol.cost == 6
    # zero slack: only the cheapest levels
    sol = solve_dp([[1, 4], [2, 9]], [[1.0, 0.0], [1.0, 0.0]], 3)
    assert sol.choice == [0, 0]


def test_dp_scales_to_model_sized_problems():
    rng = random.Random(0)
    costs = [[rng.uniform(0, 1e9) for _ in range(30)] for _ in range(40)]
    errors = [[rng.random() for _ in range(30)] for _ in range(40)]
    budget = 0.3 * sum(max(r) for r in costs)
    sol = solve_dp(costs, errors, budget, resolution=5000)
    assert sol.cost <= Fraction(budget)
