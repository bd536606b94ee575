"""Compressing a zoo model end to end: dense metrics, compress, compressed metrics, run directory.

Used by the CLI (``optbrain compress --model``, ``optbrain demo``); the library API stays in
``optbrain.api``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from torch import nn

from ..api import compress
from ..export import save
from ..recipe import Recipe
from ..report import Report


def run_zoo(
    name: str,
    recipe: Recipe | dict | str,
    out: str | Path | None,
    *,
    samples: int | None = None,
    quiet: bool = False,
    limit: int | None = None,
    dense: nn.Module | None = None,
    dense_metrics: dict[str, float] | None = None,
) -> tuple[nn.Module, Report]:
    """Compress zoo model ``name`` with ``recipe``; metrics of dense and compressed go into the
    report (``metrics[k] = {"dense": x, "compressed": y}``). Writes ``out`` when given:
    the saved run, ``report.html`` and ``recipe.yaml``."""
    from . import zoo

    entry = zoo.get(name)
    rec = copy.deepcopy(Recipe.coerce(recipe))
    if samples is not None:
        rec.calibration.samples = samples
    dense = entry.load() if dense is None else dense
    if dense_metrics is None:
        dense_metrics = entry.evaluate(dense, limit=limit)
    model = copy.deepcopy(dense)
    calib = entry.calibration(rec.calibration.samples, rec.seed)
    t0 = time.perf_counter()
    report = compress(model, calib, rec, inputs=entry.inputs, quiet=quiet, name=name)
    seconds = time.perf_counter() - t0
    comp = entry.evaluate(model, dense=dense, limit=limit)
    metrics: dict[str, Any] = {}
    for k in sorted(set(dense_metrics) | set(comp)):
        metrics[k] = {"dense": dense_metrics.get(k), "compressed": comp.get(k)}
    report.metrics = metrics
    report.metadata["compress_seconds"] = seconds
    if entry.notes:
        report.metadata["notes"] = entry.notes
    if out is not None:
        out = Path(out)
        model.__dict__["_optbrain"]["report"] = report.to_dict()
        save(model, out)
        (out / "report.html").write_text(report.to_html())
        (out / "recipe.yaml").write_text(rec.to_yaml())
    return model, report
