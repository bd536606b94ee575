"""Accuracy table: zoo models × budgets × methods, metric and wall time per cell.

    python benchmarks/accuracy.py                          # every installed zoo model
    python benchmarks/accuracy.py --models digits-cnn fashion-cnn --out table.md
    python benchmarks/accuracy.py --models smollm2-135m --methods auto sparsegpt --budgets 50%
    python benchmarks/accuracy.py --models fashion-cnn --samples 512 --targets dense

Each cell compresses a fresh copy of the dense model with one method at one budget (same
calibration samples for every method) and evaluates the zoo model's primary metric. Methods
that cannot express a budget (RTN/GPTQ cannot prune, OBD cannot quantize) show "n/a".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

from optbrain.app import zoo  # noqa: E402
from optbrain.app.runs import run_zoo  # noqa: E402
from optbrain.core.targets import NO_REFIT_METHODS  # noqa: E402

BUDGETS = {
    "50%": {"sparsity": 0.5},
    "70%": {"sparsity": 0.7},
    "2:4": {"pattern": "2:4"},
    "4-bit": {"bits": 4},
    "3-bit": {"bits": 3},
    "2:4+4-bit": {"pattern": "2:4", "bits": 4},
}
METHODS = ["magnitude", "wanda", "obd", "rtn", "gptq", "sparsegpt", "obc"]
PRUNE_ONLY = {"obd"}
NEEDS_PRUNING = {"wanda"}  # without pruning it is rtn
QUANT_ONLY = {"rtn", "gptq"}


def parse_options(items: list[str]) -> dict[str, dict]:
    """``["gptq:act_order=true", ...]`` (METHOD:KEY=JSON) -> ``{"gptq": {"act_order": True}}``."""
    options: dict[str, dict] = {}
    for o in items:
        m, kv = o.split(":", 1)
        k, v = kv.split("=", 1)
        options.setdefault(m, {})[k] = json.loads(v)
    return options


def applicable(method: str, budget: dict) -> bool:
    prunes = "sparsity" in budget or "pattern" in budget
    quant = "bits" in budget
    if method in QUANT_ONLY:
        return quant and not prunes
    if method in PRUNE_ONLY:
        return prunes and not quant
    if method in NEEDS_PRUNING:
        return prunes
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", help="zoo models (default: all that load)")
    ap.add_argument("--methods", nargs="+", default=METHODS, help="methods (columns)")
    ap.add_argument(
        "--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS), help="budgets (rows)"
    )
    ap.add_argument(
        "--samples",
        type=int,
        default=None,
        help="calibration samples (default: the model's recipe / 128)",
    )
    ap.add_argument(
        "--group-size",
        type=int,
        dest="group_size",
        help="quantization group size (default: per output channel)",
    )
    ap.add_argument("--limit", type=int, help="evaluate on the first N examples only")
    ap.add_argument(
        "--targets",
        choices=["compressed", "dense"],
        help="calibration targets: 'dense' = sequential mode, each layer's inputs from the "
        "compressed model and its outputs from the dense one (GPTAQ-style; methods that do "
        "not refit from H, magnitude / wanda / obd / rtn, run sequential with their own)",
    )
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="solver option for one method, e.g. auto:time_budget=20",
    )
    ap.add_argument("--out", help="also write the markdown table here")
    ap.add_argument("--json", help="also write all results as JSON here")
    args = ap.parse_args()

    options = parse_options(args.option)

    names = args.models or zoo.names()
    lines: list[str] = []
    results = []
    for name in names:
        entry = zoo.get(name)
        t0 = time.perf_counter()
        try:
            dense = entry.load()
        except ImportError as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        dense_metrics = entry.evaluate(dense, limit=args.limit)
        load_s = time.perf_counter() - t0
        metric = entry.primary
        lower = metric in getattr(entry, "lower_is_better", ())
        lines += ["", f"### {name} — {metric} ({'lower' if lower else 'higher'} is better)", ""]
        if entry.notes:
            lines += [f"Note: {entry.notes}", ""]
        lines.append(f"Dense: {metric} = {dense_metrics[metric]:.4g} (load {load_s:.0f} s)")
        lines += [
            "",
            "| budget | " + " | ".join(args.methods) + " |",
            "|---|" + "---:|" * len(args.methods),
        ]
        for budget in args.budgets:
            cells = []
            for method in args.methods:
                settings = dict(BUDGETS[budget])
                if not applicable(method, settings):
                    cells.append("n/a")
                    continue
                if "bits" in settings and args.group_size:
                    settings["group_size"] = args.group_size
                rule = {"method": method, **settings}
                if method in options:
                    rule["options"] = options[method]
                recipe: dict = {"rules": [rule]}
                if args.samples:
                    recipe["calibration"] = {"samples": args.samples}
                elif entry.recipe.get("calibration"):
                    recipe["calibration"] = dict(entry.recipe["calibration"])
                if args.targets:  # methods that do not refit from H have no targets to take
                    calib = recipe.setdefault("calibration", {})
                    calib["mode"] = "sequential"
                    if method not in NO_REFIT_METHODS:
                        calib["targets"] = args.targets
                _, report = run_zoo(
                    name,
                    recipe,
                    None,
                    quiet=True,
                    dense=dense,
                    dense_metrics=dense_metrics,
                    limit=args.limit,
                )
                value = report.metrics[metric]["compressed"]
                secs = report.metadata["compress_seconds"]
                used = sorted({r.method for r in report.layers if r.status == "compressed"})
                cell = f"{value:.4g} ({secs:.0f} s)"
                if method == "auto":
                    cell += " [" + "+".join(used) + "]"
                cells.append(cell)
                results.append(
                    {
                        "model": name,
                        "budget": budget,
                        "method": method,
                        metric: value,
                        "seconds": secs,
                        "solvers": used,
                        "dense": dense_metrics[metric],
                    }
                )
                print(f"{name} {budget} {method}: {cell}", file=sys.stderr, flush=True)
            lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
