"""The result of a budget allocation: the chosen level per layer and what it costs
(``budget.api.plan_allocation`` makes it, ``apply_allocation`` writes it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from .costs import Target
from .levels import Level
from .solver import DEFAULT_RESOLUTION


@dataclass
class Allocation:
    """The chosen level per layer and what it costs.

    levels: ``{layer: level id}``. costs / errors: the chosen entries' cost and error per
    layer. dense_cost, budget, cost: totals (exact rationals). error: summed objective.
    """

    target: Target
    objective: str
    levels: dict[str, str]
    costs: dict[str, Fraction]
    errors: dict[str, float]
    dense_cost: Fraction
    budget: Fraction
    cost: Fraction
    error: float
    uniform: bool = False
    exact: bool = True
    resolution: int = DEFAULT_RESOLUTION
    dense_costs: dict[str, Fraction] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.to_dict(),
            "metric": self.target.metric,
            "objective": self.objective,
            "uniform": self.uniform,
            "dense_cost": float(self.dense_cost),
            "budget": float(self.budget),
            "predicted_cost": float(self.cost),
            "predicted_fraction": float(self.cost / self.dense_cost) if self.dense_cost else None,
            "error": self.error,
            "exact": self.exact,
            "resolution": self.resolution,
            "levels": dict(self.levels),
            "layer_kinds": {k: Level.parse(v).kind for k, v in self.levels.items()},
            "layer_costs": {k: float(v) for k, v in self.costs.items()},
            "layer_dense_costs": {k: float(v) for k, v in self.dense_costs.items()},
            "layer_errors": dict(self.errors),
        }
