"""Compressing a zoo model end to end, uniformly or to a budget: one runner for both.

Dense metrics, compress (``optbrain.compress`` with a recipe, or ``compress_to_budget`` with a
target; a ``channels`` / ``heads`` run is then shrunk for real, ``optbrain.shrink``), compressed
metrics, parameters, MACs and measured latency of both (``pipeline.cost.compare_costs``, the
calls alternated), run directory. Used by the CLI (``optbrain compress --model`` with or
without ``--target``, ``optbrain demo``) and the benchmarks; the library API stays in
``optbrain.api`` and ``optbrain.budget``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .._files import atomic_write
from ..api import compress, shrink
from ..io import save
from ..pipeline.cost import compare_costs
from ..pipeline.journal import discard
from ..pipeline.shrink import structured_layers
from ..recipe import Recipe
from ..report import Report

if TYPE_CHECKING:
    from .zoo import ZooEntry

__all__ = ["JOURNAL", "RUN_FILES", "example_input", "run_zoo", "run_zoo_budget"]

#: the files a runner writes beside the saved run (a budget run: allocation.json; uniform:
#: recipe.yaml; an own model: source.json); those a run does not write are deleted from a
#: reused directory
RUN_FILES = frozenset({"report.html", "recipe.yaml", "allocation.json", "source.json"})
#: the compress journal inside a run directory (``optbrain.pipeline.journal``): each solved
#: layer kept as it finishes, so that an interrupted run resumes; deleted once the run is saved
JOURNAL = ".journal"


def example_input(batch: Any, inputs: str) -> Any:
    """The model input of a calibration batch (``inputs="first"``: the first element of an
    ``(x, y)`` batch), for shrinking and timing."""
    return batch[0] if inputs == "first" and isinstance(batch, tuple | list) else batch


def _run(
    entry: ZooEntry,
    run: Callable[[nn.Module, list[Any]], Report],
    calib: tuple[int, int],
    out: str | Path | None,
    files: Callable[[Report], dict[str, str]],
    *,
    limit: int | None,
    dense: nn.Module | None,
    dense_metrics: dict[str, float] | None,
    batches: list[Any] | None = None,
) -> tuple[nn.Module, Report]:
    """The sequence both runners share: load and evaluate the dense model (unless given),
    compress a copy on ``entry.calibration(*calib)`` with ``run(model, batches)``,
    evaluate it, put the metrics (``metrics[k] = {"dense": x, "compressed": y}``), the time
    and the entry's notes into the report; with ``out``, save the run there and write
    ``files(report)`` (name: text) beside it. ``batches``: calibration batches to use instead
    of the entry's."""
    dense = entry.load() if dense is None else dense
    if dense_metrics is None:
        dense_metrics = entry.evaluate(dense, limit=limit)
    model = copy.deepcopy(dense)
    if batches is None:
        batches = entry.calibration(*calib)
    t0 = time.perf_counter()
    report = run(model, batches)
    journal = report.metadata.pop("journal", None)  # discarded once the run is saved
    example = example_input(batches[0], entry.inputs)
    if structured_layers(model):  # channels / heads: remove them for real
        report.metadata["shrink"] = shrink(model, example).to_dict()
    seconds = time.perf_counter() - t0
    comp = entry.evaluate(model, dense=dense, limit=limit)
    dense_costs, comp_costs = compare_costs(dense, model, example)  # calls alternated
    comp.update(comp_costs)
    dense_metrics = {**dense_metrics, **dense_costs}
    report.metrics = {
        k: {"dense": dense_metrics.get(k), "compressed": comp.get(k)}
        for k in sorted(set(dense_metrics) | set(comp))
    }
    report.metadata["compress_seconds"] = seconds
    if entry.notes:
        report.metadata["notes"] = entry.notes
    if out is not None:
        out = Path(out)
        model.__dict__["_optbrain"]["report"] = report.to_dict()
        save(model, out)
        written = files(report)
        for fname, text in written.items():
            atomic_write(out / fname, text)
        for fname in RUN_FILES - set(written):  # an earlier run's files in a reused --out
            (out / fname).unlink(missing_ok=True)
        if journal is not None:
            discard(journal)
    return model, report


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
    executor: Any = None,
    batches: list[Any] | None = None,
) -> tuple[nn.Module, Report]:
    """Compress zoo model ``name`` with ``recipe`` (``executor``: where the layers are solved,
    ``optbrain.pipeline.executor``; ``batches``: calibration batches instead of the entry's
    ``calibration(samples, seed)``); metrics of dense and compressed go into the
    report (``metrics[k] = {"dense": x, "compressed": y}``). Writes ``out`` when given:
    the saved run, ``report.html`` and ``recipe.yaml``."""
    from . import zoo

    entry = zoo.get(name)
    rec = copy.deepcopy(Recipe.coerce(recipe))
    if samples is not None:
        rec.calibration.samples = samples

    def run(model: nn.Module, batches: list[Any]) -> Report:
        return compress(
            model, batches, rec, inputs=entry.inputs, quiet=quiet, name=name, executor=executor,
            journal=None if out is None else Path(out) / JOURNAL,
        )  # fmt: skip

    def files(report: Report) -> dict[str, str]:
        return {"report.html": report.to_html(), "recipe.yaml": rec.to_yaml()}

    calib = (rec.calibration.samples, rec.seed)
    return _run(
        entry,
        run,
        calib,
        out,
        files,
        limit=limit,
        dense=dense,
        dense_metrics=dense_metrics,
        batches=batches,
    )


def run_zoo_budget(
    name: str,
    target: str,
    out: str | Path | None = None,
    *,
    db_dir: str | Path | None = None,
    samples: int = 128,
    seed: int = 0,
    levels: list[str] | None = None,
    model_level: bool = True,
    model_level_samples: int | None = 32,
    quiet: bool = False,
    limit: int | None = None,
    dense: nn.Module | None = None,
    dense_metrics: dict[str, float] | None = None,
    **options: Any,
) -> tuple[nn.Module, Report]:
    """Compress zoo model ``name`` to ``target`` (``options``: ``compress_to_budget`` keywords
    such as ``objective``, ``solver``, ``uniform``, ``executor``).

    By default the DP sums model-level errors (``model_level=True``, measured on the first
    ``model_level_samples`` calibration samples), as in the OBC paper: on MiniLM the layer-wise
    objectives misjudge which layers matter (``benchmarks/bench_budget.py``); on the small
    CNNs both work.

    The report's ``metrics[k] = {"dense": x, "compressed": y}``. ``db_dir`` defaults to
    ``out/db`` (reused by later runs into the same directory), or a temporary one without
    ``out``. Writes ``out`` when given: the saved run, ``report.html`` (with the allocation
    plot) and ``allocation.json``.
    """
    from ..budget.api import compress_to_budget
    from ..report.html import insert_into_html
    from . import zoo

    entry = zoo.get(name)
    if db_dir is None and out is not None:
        db_dir = Path(out) / "db"

    def run(model: nn.Module, batches: list[Any]) -> Report:
        return compress_to_budget(
            model,
            batches,
            target,
            levels,
            db_dir,
            inputs=entry.inputs,
            seed=seed,
            model_level=model_level,
            model_level_samples=model_level_samples if model_level else None,
            quiet=quiet,
            name=name,
            **options,
        )

    def files(report: Report) -> dict[str, str]:
        alloc = report.metadata["allocation"]
        return {
            "report.html": insert_into_html(report.to_html(), alloc),
            "allocation.json": json.dumps(alloc, indent=1),
        }

    calib = (samples, seed)
    return _run(
        entry, run, calib, out, files, limit=limit, dense=dense, dense_metrics=dense_metrics
    )
