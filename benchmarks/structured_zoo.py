"""Structured compression of a zoo model: channels (and heads) removed for real, next to dense.

    python benchmarks/structured_zoo.py --model fashion-cnn --levels 0.25 0.5 0.75
    python benchmarks/structured_zoo.py --model minilm --targets 're:.*output\\.dense' \\
        --heads 're:.*attention\\.output\\.dense' --levels 0.3 0.5

For every level and method (obc, magnitude, obd) one ``run_zoo`` with ``pattern: channels``
(and ``heads`` on the ``--heads`` layers), then ``optbrain.shrink``: the table gives the
model's metrics, parameters, MACs and measured torch CPU latency (batch 1 and the throughput
batch, median of repeats, warm-up excluded) as ratios to the dense model timed in the same
run. Prints markdown. ``--refit``: every layer then refitted to the dense outputs
(``recipe.refit``, ``optbrain.pipeline.refit``). ``--mode sequential`` calibrates block by
block on the already compressed model (``sequential+dense``: with dense targets); the
default is independent.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

from optbrain.app import zoo  # noqa: E402
from optbrain.app.runs import run_zoo  # noqa: E402


def recipe(
    method: str,
    level: float,
    targets: list[str],
    heads: list[str],
    samples: int,
    mode: str,
    refit: bool = False,
) -> dict:
    rules = [{"targets": targets, "ignore": heads, "method": method, "pattern": "channels",
              "sparsity": level}]  # fmt: skip
    if heads:
        rules.append({"targets": heads, "method": method, "pattern": "heads", "sparsity": level})
    calibration: dict = {"samples": samples, "mode": mode.split("+")[0]}
    if mode == "sequential+dense":
        calibration["targets"] = "dense"
    return {"rules": rules, "calibration": calibration, "refit": refit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="zoo model name")
    ap.add_argument("--levels", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--methods", nargs="+", default=["obc", "magnitude", "obd"])
    ap.add_argument("--targets", nargs="+", default=["*"], help="layers pruned by channels")
    ap.add_argument("--heads", nargs="*", default=[], help="layers pruned by heads")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples")
    ap.add_argument(
        "--mode",
        default="independent",
        choices=["independent", "sequential", "sequential+dense"],
        help="calibration mode (sequential+dense: dense targets, GPTAQ-style)",
    )
    ap.add_argument("--limit", type=int, help="evaluate on the first N examples only")
    ap.add_argument(
        "--refit", action="store_true", help="refit every layer to the dense outputs after"
    )
    args = ap.parse_args()
    entry = zoo.get(args.model)
    dense = entry.load()
    dm = entry.evaluate(dense, limit=args.limit)
    rows = []
    for level in args.levels:
        for m in args.methods:
            rec = recipe(m, level, args.targets, args.heads, args.samples, args.mode, args.refit)
            _, r = run_zoo(args.model, rec, None, quiet=True, dense=dense, dense_metrics=dm,
                           limit=args.limit)  # fmt: skip
            rows.append((level, m, r.metrics, r.metadata.get("shrink", {})))
            print(level, m, {k: v["compressed"] for k, v in r.metrics.items()}, flush=True)
    met0 = rows[0][2]  # the dense metrics and those only measured against dense (agreement)
    quality = [k for k in met0 if k not in ("params", "macs") and not k.startswith("latency")]
    lat = sorted(k for k in rows[0][2] if k.startswith("latency"))
    head = ["level", "method", *quality, "params", "MACs", *(f"{k} speedup" for k in lat),
            "skipped"]  # fmt: skip
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    d = rows[0][2]
    dq = (d[k]["dense"] for k in quality)
    print("| dense | | " + " | ".join("" if v is None else f"{v:.4f}" for v in dq)
          + f" | {d['params']['dense']:.0f} | {d['macs']['dense']:.3g} | "
          + " | ".join("1.00×" for _ in lat) + " | |")  # fmt: skip
    for level, m, met, sh in rows:
        q = " | ".join(f"{met[k]['compressed']:.4f}" for k in quality)
        p = met["params"]["compressed"] / met["params"]["dense"]
        f = met["macs"]["compressed"] / met["macs"]["dense"]
        s = " | ".join(f"{met[k]['dense'] / met[k]['compressed']:.2f}×" for k in lat)
        print(f"| {level} | {m} | {q} | {p:.3f} | {f:.3f} | {s} | {len(sh.get('skipped', {}))} |")


if __name__ == "__main__":
    main()
