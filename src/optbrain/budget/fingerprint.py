"""What a budget database depends on: build settings, fingerprint, the mismatch check.

``DbSettings`` (how levels are computed), ``fingerprint`` (model weights, calibration, levels
and settings, hashed) and ``check_fingerprint`` (rejects a database built for something else).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .._files import batches_sha256, state_sha256
from ..adapters import find_layers
from ..core.methods.auto import DATABASE_TIME_BUDGET
from ..core.spec import DEFAULT_DAMP
from ..pipeline.data import batch_samples
from .levels import Level
from .store import FORMAT, VERSION, DatabaseMismatchError

SOLVERS = ("obc", "fast", "auto")

__all__ = ["SOLVERS", "DbSettings", "check_fingerprint", "fingerprint"]


@dataclass(frozen=True)
class DbSettings:
    """How the database's levels are computed (part of its fingerprint).

    damp: relative damping of H. sym / group_size: the quantization grid (symmetric, per
    output channel by default). solver: "obc" | "fast" | "auto". time_budget: seconds of
    modelled exact solving per layer below which "auto" uses the exact solver.
    model_level: also measure each level's model-level calibration loss increase.
    model_level_samples: measure it on the first this many calibration samples only (None:
    all); one forward over them per (layer, level), so this bounds the cost on big models.
    """

    damp: float = DEFAULT_DAMP
    sym: bool = True
    group_size: int | None = None
    solver: str = "auto"
    time_budget: float = DATABASE_TIME_BUDGET
    model_level: bool = False
    model_level_samples: int | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        n = self.model_level_samples
        if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
            raise ValueError(f"model_level_samples must be a positive integer or None, got {n!r}")


def fingerprint(
    model: nn.Module,
    batches: Sequence[Any],
    levels: Sequence[Level],
    settings: DbSettings,
    *,
    seed: int | None = None,
    inputs: str = "all",
) -> dict[str, Any]:
    """What a database depends on; two builds with equal fingerprints give equal databases."""
    layers, _ = find_layers(model)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "weights_sha256": state_sha256(model),
            "layers": {n: list(m.weight.shape) for n, m in layers.items()},
        },
        "calibration": {
            "samples": sum(batch_samples(b) for b in batches),
            "batches": len(batches),
            "sha256": batches_sha256(batches),
            "seed": seed,
            "inputs": inputs,
        },
        "levels": [lv.id for lv in levels],
        "settings": asdict(settings),
    }


def check_fingerprint(
    old: dict[str, Any], new: dict[str, Any], root: Path, levels_given: bool
) -> None:
    """Raise ``DatabaseMismatchError`` naming every difference between the fingerprint of the
    database in ``root`` (``old``) and the one asked for (``new``)."""
    diffs = []
    for key in ("format", "version"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} (database) vs {new.get(key)!r}")
    om, nm = old.get("model", {}), new["model"]
    if om.get("layers") != nm["layers"]:
        diffs.append("model: other layers or layer shapes")
    elif om.get("weights_sha256") != nm["weights_sha256"]:
        diffs.append("model: other weights (state-dict SHA-256 differs)")
    oc, nc = old.get("calibration", {}), new["calibration"]
    for k in nc:
        if k == "seed" and (oc.get(k) is None or nc[k] is None):
            continue  # an unknown seed: the data's SHA-256 decides
        if oc.get(k) != nc[k]:
            diffs.append(f"calibration {k}: {oc.get(k)!r} (database) vs {nc[k]!r}")
    os_, ns = old.get("settings", {}), new["settings"]
    for k in ns:
        if k == "model_level":
            continue  # a database without model-level errors gets them added
        if k == "model_level_samples" and not (ns["model_level"] and os_.get("model_level")):
            continue  # only matters when both have (or will have) model-level errors
        if os_.get(k) != ns[k]:
            diffs.append(f"setting {k}: {os_.get(k)!r} (database) vs {ns[k]!r}")
    if levels_given and old.get("levels") != new["levels"]:
        diffs.append(
            f"levels: database {old.get('levels')} vs requested {new['levels']} "
            "(pass levels=None to use the database's grid)"
        )
    if diffs:
        raise DatabaseMismatchError(
            f"the database in {root} was built for another model or settings — "
            + "; ".join(diffs)
            + ". Use another database directory, or delete this one to rebuild it."
        )
