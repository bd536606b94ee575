"""The recipe's global settings: how calibration data is used (``calibration:``) and how the
rules' unstructured sparsities are spread over the layers (``allocation:``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .core.spec import DEFAULT_TARGETS, SettingError, check_targets
from .recipe_rules import (
    CALIBRATION_KEYS,
    CALIBRATION_MODES,
    RecipeError,
    _check_keys,
    _fail,
    _is_int,
    _where,
)


@dataclass
class CalibrationConfig:
    """How calibration data is used.

    mode: "independent" (every layer's H from the dense model, one pass; OBC) or "sequential"
    (block by block, each block fed the already-compressed model's outputs; GPTQ).
    samples: number of calibration samples. batch_size: samples per forward pass (None: library
    default). targets (sequential mode): "compressed" (default; each layer fits its own outputs
    on the compressed model's inputs) or "dense" (it fits the dense model's outputs, GPTAQ-style:
    ``optbrain.core.targets``).
    """

    mode: str = "independent"
    samples: int = 128
    batch_size: int | None = None
    targets: str = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        self._normalize(("calibration",))

    def _normalize(self, path: tuple) -> None:
        if self.mode not in CALIBRATION_MODES:
            raise _fail(path, "mode", f"one of {list(CALIBRATION_MODES)}", self.mode)
        if not _is_int(self.samples) or self.samples < 1:
            raise _fail(path, "samples", "a positive integer", self.samples)
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise _fail(path, "batch_size", "a positive integer or null", self.batch_size)
        try:
            check_targets(self.targets)
        except SettingError as e:
            raise _fail(path, "targets", e.what, self.targets) from None
        if self.targets == "dense" and self.mode != "sequential":
            raise RecipeError(
                f"{_where((*path, 'targets'))}: dense needs mode: sequential (in independent mode "
                "every layer already sees the dense inputs)",
                (*path, "targets"),
            )

    @classmethod
    def from_dict(cls, d: Mapping | None, path: tuple = ("calibration",)) -> CalibrationConfig:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise RecipeError(
                f"{_where(path)} must be a mapping with keys {', '.join(CALIBRATION_KEYS)}, "
                f"got {d!r}",
                path,
            )
        _check_keys(d, CALIBRATION_KEYS, path)
        # null means "the default"; validation errors then name calibration.<key>
        return cls(**{k: d[k] for k in CALIBRATION_KEYS if d.get(k) is not None})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "samples": self.samples}
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        if self.targets != DEFAULT_TARGETS:
            out["targets"] = self.targets
        return out


#: how the rules' unstructured sparsities are spread over the layers (``allocation:``)
ALLOCATION_METHODS = ("uniform", "owl")


@dataclass
class SparsityAllocation:
    """``allocation:`` — ``uniform`` (the rules' sparsities), or ``owl`` with OWL's outlier
    threshold ``outlier_m`` (multiples of a block's mean Wanda score) and spread ``lam`` (each
    block's sparsity moves by at most ``lam``); OWL's defaults 5 and 0.08."""

    method: str = "uniform"
    outlier_m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        path = ("allocation",)
        if self.method not in ALLOCATION_METHODS:
            raise _fail(path, "method", f"one of {list(ALLOCATION_METHODS)}", self.method)
        for key, ok in (("outlier_m", lambda v: v > 0), ("lam", lambda v: 0 <= v < 0.5)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not ok(v):
                what = "a number > 0" if key == "outlier_m" else "a number in [0, 0.5)"
                raise _fail(path, key, what, v)
            setattr(self, key, float(v))

    @classmethod
    def from_value(cls, v: Any) -> SparsityAllocation:
        if v is None:
            return cls()
        if isinstance(v, SparsityAllocation):
            return v
        if isinstance(v, str):
            return cls(method=v)
        if not isinstance(v, Mapping):
            raise _fail((), "allocation", "'uniform', 'owl' or a mapping {method: owl, ...}", v)
        _check_keys(v, dict.fromkeys(("method", "outlier_m", "lam")), ("allocation",))
        return cls(**v)

    def to_value(self) -> str | dict[str, Any]:
        if (self.outlier_m, self.lam) == (5.0, 0.08):
            return self.method
        return {"method": self.method, "outlier_m": self.outlier_m, "lam": self.lam}
