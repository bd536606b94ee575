"""Uniform tied-group levels on a zoo model: residual-stream channels removed from every reader.

    python benchmarks/groups_zoo.py --model fashion-cnn --levels 0.25 0.5 --bn both

For every level and method (obc, magnitude, obd): every tied group of the model
(``pipeline.shrink_sites.tied_groups``) loses that fraction of its channels in all its
consumers at once (``pipeline.groups.compress_groups``: structured OBS over the group with
exact compensation, or the summed channel norms / diagonal saliencies), the ``--layers``
(default ``fc``: the last stream, read by fc alone) first at the same level and method with
``pattern: channels`` (``optbrain.compress``; they must lie after every group consumer, so
that the groups' Hessians, collected next, are the dense model's), optionally the batch
norms re-estimated on the calibration images (``--bn``), then ``optbrain.shrink``. Dense and
shrunk model are timed call by call in turn in one process (``latency_budget.
alternating_speedup``): the ratio of the median and of the fastest calls. Prints markdown.
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402
from latency_budget import alternating_speedup  # noqa: E402

import optbrain  # noqa: E402
from optbrain.app import zoo  # noqa: E402
from optbrain.app.runs import example_input  # noqa: E402
from optbrain.pipeline import recalibrate_batchnorm  # noqa: E402
from optbrain.pipeline.cost import batch_of, count_macs, count_params  # noqa: E402
from optbrain.pipeline.groups import compress_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fashion-cnn", help="zoo model name")
    ap.add_argument("--levels", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", default=["obc", "magnitude", "obd"])
    ap.add_argument("--bn", choices=["off", "on", "both"], default="both")
    ap.add_argument("--layers", nargs="*", default=["fc"], help="per-layer channel targets")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=300, help="alternating timed calls (batch 1)")
    ap.add_argument("--batch", type=int, default=32, help="the throughput batch also timed")
    ap.add_argument("--limit", type=int, help="evaluate on the first N examples only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    entry = zoo.get(args.model)
    dense = entry.load().eval()
    q = entry.primary
    dm = entry.evaluate(dense, limit=args.limit)
    calib = entry.calibration(args.samples, 0)
    x1 = batch_of(example_input(calib[0], entry.inputs), 1)
    xb = batch_of(x1, args.batch)
    p0, m0 = count_params(dense), count_macs(dense, x1)
    print(f"\n{args.model}, {torch.get_num_threads()} thread(s); dense {q} {dm[q]:.2f}, "
          f"{p0:,} params, {m0 / 1e6:.2f} M MACs\n")  # fmt: skip
    head = ["level", "method", "BN re-est.", q, "drop (pt)", "params", "MACs",
            "batch-1 speedup (median / min)", f"batch-{args.batch} (median / min)"]  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    bns = {"off": [False], "on": [True], "both": [False, True]}[args.bn]
    for level in args.levels:
        for method in args.methods:
            for bn in bns:
                model = copy.deepcopy(dense)
                if args.layers:
                    rule = {"targets": args.layers, "method": method, "pattern": "channels",
                            "sparsity": level}  # fmt: skip
                    optbrain.compress(model, calib, {"rules": [rule]}, inputs=entry.inputs,
                                      quiet=True)  # fmt: skip
                compress_groups(model, calib, level, method, inputs=entry.inputs)
                if bn:
                    recalibrate_batchnorm(model, calib, inputs=entry.inputs)
                optbrain.shrink(model, x1)
                acc = entry.evaluate(model, limit=args.limit)[q]
                t1 = alternating_speedup(dense, model, x1, args.calls)
                tb = alternating_speedup(dense, model, xb, max(10, args.calls // 10))
                p, f = count_params(model) / p0, count_macs(model, x1) / m0
                print(f"| {level} | {method} | {'yes' if bn else 'no'} | {acc:.2f} | "
                      f"{dm[q] - acc:+.2f} | {p:.3f} | {f:.3f} | {t1[2]:.2f}× / {t1[3]:.2f}× | "
                      f"{tb[2]:.2f}× / {tb[3]:.2f}× |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
