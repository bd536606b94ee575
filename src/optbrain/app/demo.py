"""``optbrain demo``: the main job in two minutes.

Trains (or loads from cache) a small CNN on scikit-learn's handwritten digits, compresses it
at three budgets with exact OBC and with the baselines at the same budget, and prints dense vs
compressed test accuracy, the time taken and where the reports are.
"""

from __future__ import annotations

import time
from pathlib import Path

# (label, short name for the run directory, recipe settings, methods at that budget)
BUDGETS: list[tuple[str, str, dict, list[str]]] = [
    (
        "2:4 + 4-bit",
        "nm24-4bit",
        {"pattern": "2:4", "bits": 4},
        ["obc", "sparsegpt", "wanda", "magnitude"],
    ),
    ("2-bit", "2bit", {"bits": 2}, ["obc", "gptq", "rtn"]),
    ("80% unstructured", "sparse80", {"sparsity": 0.8}, ["obc", "sparsegpt", "wanda", "magnitude"]),
]
MODEL = "digits-cnn"


def run_demo(out: Path = Path("runs/demo"), quiet: bool = False) -> int:
    from . import zoo
    from .runs import run_zoo

    t_all = time.perf_counter()
    entry = zoo.get(MODEL)
    t0 = time.perf_counter()
    dense = entry.load()
    t_load = time.perf_counter() - t0
    dense_metrics = entry.evaluate(dense)
    acc0 = dense_metrics["accuracy"]
    print(
        f"{MODEL}: {entry.description}; dense test accuracy {acc0:.1f}% "
        f"(trained or loaded in {t_load:.1f} s)\n",
        flush=True,
    )
    rows = []
    for label, short, budget, methods in BUDGETS:
        for method in methods:
            recipe = {"rules": [{"method": method, **budget}], "calibration": {"samples": 256}}
            run_dir = out / f"{short}-{method}"
            _, report = run_zoo(
                MODEL, recipe, run_dir, quiet=True, dense=dense, dense_metrics=dense_metrics
            )
            acc = report.metrics["accuracy"]["compressed"]
            secs = report.metadata["compress_seconds"]
            rows.append((label, method, acc, secs, run_dir))
            if not quiet:
                print(
                    f"  {label:18s} {method:10s} accuracy {acc:5.1f}%  ({secs:.1f} s)", flush=True
                )
    print(f"\n| budget | method | test accuracy | drop vs dense ({acc0:.1f}%) | seconds |")
    print("|---|---|---:|---:|---:|")
    for label, method, acc, secs, _ in rows:
        print(f"| {label} | {method} | {acc:.1f}% | {acc0 - acc:+.1f} pt | {secs:.1f} |")
    obc_dir = next((r[4] for r in rows if r[1] == "obc"), rows[0][4])
    print(
        f"\ntotal {time.perf_counter() - t_all:.0f} s. Reports: {out}/*/report.html "
        f"(e.g. {obc_dir / 'report.html'}); re-render with 'optbrain report {obc_dir}'."
    )
    return 0
