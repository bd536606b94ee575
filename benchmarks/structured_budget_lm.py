"""Non-uniform channel levels on a zoo LM by the budget DP, e.g. smollm2-135m's FFN neurons.

    python benchmarks/structured_budget_lm.py --model smollm2-135m --target flops=0.775 \\
        --objective model --model-level-samples 8 --db-dir DIR

The level grid is the channel grid c0.1 … c0.9 (``structured_levels``); on a Llama only the
down projections can shrink (their inputs are the FFN neurons; the other layers read the
residual stream or are attention output projections, and get no channel level), so the DP
spreads the neurons removed over the blocks. ``--objective relative``: the layer-wise loss over
the layer's output energy; ``model``: the model-level calibration error of each level swapped
in alone (one forward over ``--model-level-samples`` samples per layer and level). The
database in ``--db-dir`` is reused by reruns (a relative one gains the model-level errors).
Prints the metrics (perplexity, MACs, params) and the chosen levels.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/__init__.py

from optbrain.app.runs import run_zoo_budget  # noqa: E402
from optbrain.budget.levels import structured_levels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="flops=0.775", help="e.g. flops=0.775, params=0.8")
    ap.add_argument("--objective", choices=["relative", "model"], default="model")
    ap.add_argument("--model-level-samples", type=int, default=8, dest="mls")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples")
    ap.add_argument("--db-dir", help="keep the database here (reused by reruns)")
    args = ap.parse_args()
    ml = args.objective == "model"
    t0 = time.time()
    _, rep = run_zoo_budget(
        args.model, args.target, None, db_dir=args.db_dir, samples=args.samples,
        levels=[lv.id for lv in structured_levels([round(0.1 * i, 1) for i in range(1, 10)])],
        model_level=ml, model_level_samples=args.mls if ml else None, quiet=True,
    )  # fmt: skip
    met = rep.metrics
    print(json.dumps(met, indent=1))
    macs = met["macs"]["compressed"] / met["macs"]["dense"]
    print(f"MACs {macs:.4f} of dense; wall {time.time() - t0:.0f} s")
    chosen = {k: v for k, v in rep.metadata["allocation"]["levels"].items() if v != "dense"}
    print("levels:", chosen)


if __name__ == "__main__":
    main()
