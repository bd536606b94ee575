"""Non-uniform vs uniform compression at equal cost, on zoo models (issue #6).

For each model one per-layer database is built (or reused from ``--db-root``); for each target
the uniform baseline is the single level, shared by all layers, with the least summed error
that meets the target (``plan_allocation(uniform=True)``), and the non-uniform allocation is
the DP's choice with the uniform allocation's exact cost as its budget — so that non-uniform
model never costs more than the uniform one. Prints a markdown table::

    .venv/bin/python benchmarks/bench_budget.py --models digits-cnn fashion-cnn minilm

Columns: the primary metric (and agreement with the dense model) of the dense model, of the
uniform and of the non-uniform allocation — at the uniform allocation's exact cost, and at the
target itself (the uniform level may cost less than the target: the grid is discrete) — with
the achieved cost of each as a fraction of the dense cost (the target's metric).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402

from optbrain.app import zoo  # noqa: E402
from optbrain.app.zoo.base import cache_dir  # noqa: E402
from optbrain.budget import (  # noqa: E402
    DbSettings,
    apply_allocation,
    build_database,
    plan_allocation,
)

TARGETS = ["flops=0.25", "flops=0.15", "bops=1/12", "bops=1/24", "size=0.15"]


def _achieved(db, alloc, model) -> float:
    from optbrain.budget.api import achieved_entry
    from optbrain.budget.costs import level_cost

    total = sum(
        level_cost(
            alloc.target.metric,
            db.record(n),
            achieved_entry(model, n, db.record(n)["levels"][lid], lid),
            lid,
        )
        for n, lid in alloc.levels.items()
    )
    return float(total / alloc.dense_cost)


def _cell(r: tuple) -> str:
    p, o, c = r
    return f"{p:.4g} / {o:.4g} ({c:.4f})" if o is not None else f"{p:.4g} ({c:.4f})"


def bench_model(name: str, targets: list[str], args: argparse.Namespace) -> list[str]:
    entry = zoo.get(name)
    dense = entry.load()
    m_dense = entry.evaluate(dense, limit=args.limit)[entry.primary]
    calib = entry.calibration(args.samples, 0)
    root = Path(args.db_root) / f"{name}-n{args.samples}"
    # the model-level objective needs model-level errors (added to an existing database)
    settings = DbSettings(
        solver=args.solver or "auto",
        model_level=args.objective == "model",
        model_level_samples=args.model_level_samples,
    )
    t0 = time.perf_counter()
    db = build_database(
        dense, calib, root, None, settings=settings, inputs=entry.inputs, seed=0, quiet=False
    )
    print(
        f"[{name}] database: {len(db.layers)} layers x {len(db.levels)} levels, "
        f"solver {settings.solver}, {time.perf_counter() - t0:.0f} s ({root})",
        file=sys.stderr,
    )
    rows = []
    dense_keys = set(entry.evaluate(dense, limit=1))
    for target in targets:
        uni = plan_allocation(db, target, args.objective, uniform=True)
        # equal cost: the DP's budget is exactly the uniform allocation's cost
        equal = plan_allocation(
            db, f"{uni.target.metric}={uni.cost / uni.dense_cost}", args.objective
        )
        nominal = plan_allocation(db, target, args.objective)
        assert equal.cost <= uni.cost and nominal.cost <= nominal.budget
        res = {}
        for label, alloc in (("uniform", uni), ("equal", equal), ("nominal", nominal)):
            model = copy.deepcopy(dense)
            apply_allocation(model, db, alloc)
            m = entry.evaluate(model, dense=dense, limit=args.limit)
            other = next((k for k in sorted(m) if k not in dense_keys), None)
            res[label] = (m[entry.primary], m.get(other), _achieved(db, alloc, model))
        lv = next(iter(uni.levels.values()))

        rows.append(
            f"| {name} | {target} | {m_dense:.4g} | {lv} | {_cell(res['uniform'])} | "
            f"{_cell(res['equal'])} | {_cell(res['nominal'])} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["digits-cnn", "fashion-cnn", "minilm"])
    p.add_argument("--targets", nargs="+", default=TARGETS)
    p.add_argument("--samples", type=int, default=256, help="calibration samples")
    p.add_argument("--objective", default="relative", choices=["relative", "loss", "model"])
    p.add_argument(
        "--model-level-samples", type=int, help="samples for model-level errors (default all)"
    )
    p.add_argument("--solver", choices=["obc", "fast", "auto"], help="default: auto, per layer")
    p.add_argument("--limit", type=int, help="evaluate on the first N examples only")
    p.add_argument("--db-root", default=str(cache_dir() / "budget-db"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    available = set(zoo.names())
    missing = [m for m in args.models if m not in available]
    if missing:
        print(f"skipping models not in the zoo: {missing}", file=sys.stderr)
    rows = []
    for name in [m for m in args.models if m in available]:
        rows += bench_model(name, args.targets, args)
    print(
        f"\nobjective {args.objective}, {args.samples} calibration samples. Cells: primary "
        "metric / agreement with the dense model (top-1 agreement %, or mean cosine to the "
        "dense embeddings) (achieved cost / dense cost, in the target's metric). "
        "'non-uniform, equal cost': the DP with the uniform allocation's cost as budget; "
        "'non-uniform, target': the DP with the target itself as budget.\n"
    )
    print(
        "| model | target | dense | uniform level | uniform | non-uniform, equal cost | "
        "non-uniform, target |"
    )
    print("|---|---|---:|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
