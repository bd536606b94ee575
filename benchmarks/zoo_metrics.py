"""Every metric of a zoo model, dense and compressed by a few methods at one budget.

    python benchmarks/zoo_metrics.py --model minilm --sparsity 0.5 --methods sparsegpt obc

Uses the default calibration (independent mode, 128 samples) unless --mode/--samples say
otherwise; prints each method's metrics and its summed predicted layer loss.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

from optbrain.app import zoo  # noqa: E402
from optbrain.app.runs import run_zoo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="zoo model name")
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "obc"], help="methods")
    ap.add_argument("--sparsity", type=float, help="unstructured sparsity")
    ap.add_argument("--pattern", help="N:M pattern, e.g. 2:4")
    ap.add_argument("--bits", type=int, help="bits")
    ap.add_argument("--mode", default="independent", choices=["independent", "sequential"])
    ap.add_argument("--samples", type=int, default=128, help="calibration samples")
    args = ap.parse_args()
    budget = {
        k: getattr(args, k) for k in ("sparsity", "pattern", "bits") if getattr(args, k) is not None
    }
    entry = zoo.get(args.model)
    dense = entry.load()
    dm = entry.evaluate(dense)
    print("dense", dm, flush=True)
    for m in args.methods:
        recipe = {
            "rules": [{"method": m, **budget}],
            "calibration": {"mode": args.mode, "samples": args.samples},
        }
        _, r = run_zoo(args.model, recipe, None, quiet=True, dense=dense, dense_metrics=dm)
        loss = sum(x.predicted_loss for x in r.layers if x.status == "compressed")
        metrics = {k: v["compressed"] for k, v in r.metrics.items()}
        print(m, metrics, "summed layer loss", loss, flush=True)


if __name__ == "__main__":
    main()
