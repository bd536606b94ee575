"""Zoo models compressed to a budget end to end (dense metrics, allocation, compressed metrics,
run directory), and the CLI path ``optbrain compress --model M --target flops=0.25 [--db DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

from torch import nn

from ..budget.api import compress_to_budget
from ..report import Report
from ..report.html import insert_into_html


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
    such as ``objective``, ``solver``, ``uniform``).

    By default the DP sums model-level errors (``model_level=True``, measured on the first
    ``model_level_samples`` calibration samples), as in the OBC paper: on MiniLM the layer-wise
    objectives misjudge which layers matter (``benchmarks/bench_budget.py``); on the small
    CNNs both work.

    The report's ``metrics[k] = {"dense": x, "compressed": y}``. ``db_dir`` defaults to
    ``out/db`` (reused by later runs into the same directory), or a temporary one without
    ``out``. Writes ``out`` when given: the saved run, ``report.html`` (with the allocation
    plot) and ``allocation.json``.
    """
    from ..export import save
    from . import zoo

    entry = zoo.get(name)
    dense = entry.load() if dense is None else dense
    if dense_metrics is None:
        dense_metrics = entry.evaluate(dense, limit=limit)
    model = copy.deepcopy(dense)
    calib = entry.calibration(samples, seed)
    if db_dir is None and out is not None:
        db_dir = Path(out) / "db"
    t0 = time.perf_counter()
    report = compress_to_budget(
        model,
        calib,
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
    seconds = time.perf_counter() - t0
    comp = entry.evaluate(model, dense=dense, limit=limit)
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
        alloc = report.metadata["allocation"]
        (out / "report.html").write_text(insert_into_html(report.to_html(), alloc))
        import json

        (out / "allocation.json").write_text(json.dumps(alloc, indent=1))
    return model, report


def allocation_table(report: Report) -> str:
    """Markdown: layer, level, cost fraction of the layer, error; then the totals."""
    a = report.metadata["allocation"]
    lines = ["| layer | level | cost / dense | error |", "|---|---|---:|---:|"]
    for n, lid in a["levels"].items():
        d = a["layer_dense_costs"].get(n) or 0.0
        frac = a["layer_costs"][n] / d if d else 0.0
        lines.append(f"| {n} | {lid} | {frac:.3f} | {a['layer_errors'][n]:.4g} |")
    lines.append("")
    lines.append(
        f"target {a['target']['text']}: budget {a['budget']:.6g} of dense {a['dense_cost']:.6g} "
        f"({a['metric']}); predicted {a['predicted_cost']:.6g} "
        f"({a['predicted_fraction']:.4f}), achieved {a['achieved_cost']:.6g} "
        f"({a['achieved_fraction']:.4f}), objective {a['objective']}"
    )
    others = ", ".join(
        f"{m} {v['fraction']:.4f}" for m, v in a["all_costs"].items() if v["fraction"] is not None
    )
    lines.append(f"all costs as a fraction of dense: {others}")
    return "\n".join(lines)


def cmd_compress_budget(args: argparse.Namespace) -> int:
    """``optbrain compress --model M --target T [--db DIR]``: the budget path of the CLI."""
    from .cli import _print_metrics

    clash = [
        f"--{k.replace('_', '-')}"
        for k in (
            "recipe", "method", "sparsity", "pattern", "bits", "group_size", "targets", "ignore",
        )
        if getattr(args, k, None) is not None
    ]  # fmt: skip
    if getattr(args, "mode", None) == "sequential":
        clash.append("--mode sequential (the database is built in independent mode)")
    if clash:
        raise ValueError(
            f"--target chooses the levels per layer itself; it cannot be combined with {clash}"
        )
    out = Path(args.out) if args.out else Path("runs") / args.model
    db = Path(args.db) if getattr(args, "db", None) else None
    _, report = run_zoo_budget(
        args.model,
        args.target,
        out,
        db_dir=db,
        samples=128 if getattr(args, "samples", None) is None else args.samples,
        quiet=args.quiet,
        limit=args.limit,
        damp=0.01 if getattr(args, "damp", None) is None else args.damp,
        sym=not getattr(args, "asym", False),
    )
    print(allocation_table(report))
    _print_metrics(report)
    print(f"\nrun written to {out}/ (report: {out / 'report.html'})")
    return 0
