"""A measured-latency budget on a zoo model: channel levels chosen by the DP, shrunk for real.

    python benchmarks/latency_budget.py --model fashion-cnn --targets latency=0.6 latency=0.5

For every target (and with / without batch-norm re-estimation, ``--bn``): ``run_zoo_budget``
with the structured grid (``structured_levels()``, the default of a latency target), the
latency table measured on this machine (``optbrain.budget.latency``, cached), model-level
errors, the refit to the dense outputs if asked (``--refit``), then ``optbrain.shrink``
(``--out``: the runs kept, for ``deploy_zoo.py --run``). The
dense and the shrunk model are then timed in the same process, call by call in turn
(``--calls`` calls each, torch eager, one thread by default), so that load from other jobs hits
both alike: the speedup as the ratio of the median call times and as the ratio of the fastest
calls. Prints markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402

from optbrain.app import zoo  # noqa: E402
from optbrain.app.runs import example_input, run_zoo_budget  # noqa: E402
from optbrain.budget import BudgetError  # noqa: E402
from optbrain.pipeline.cost import batch_of  # noqa: E402


def alternating_speedup(dense, comp, x, calls: int) -> tuple[float, float, float, float]:
    """``(dense ms, compressed ms, median ratio, min ratio)``: the two models called in turn,
    ``calls`` times each after a warm-up (medians of the call times, and the ratio of the
    fastest calls: on a loaded machine the minimum is the least disturbed estimate)."""
    d, c = [], []
    with torch.inference_mode():
        for _ in range(3):
            dense(x), comp(x)
        for _ in range(calls):
            t0 = time.perf_counter()
            dense(x)
            t1 = time.perf_counter()
            comp(x)
            t2 = time.perf_counter()
            d.append(1e3 * (t1 - t0)), c.append(1e3 * (t2 - t1))
    md, mc = statistics.median(d), statistics.median(c)
    return md, mc, md / mc, min(d) / min(c)


def profile(model, x, calls: int) -> None:
    """The fastest batch-1 call of the model and of each Linear / Conv on its own input: how
    much of the latency the layers are (the rest: batch norms, activations, adds, pooling)."""
    from torch import nn

    def fastest(f) -> float:
        with torch.inference_mode():
            for _ in range(5):
                f()
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
        return 1e3 * min(ts)

    seen: dict = {}

    def keep(name: str):
        def hook(_m, args, _out) -> None:  # returns None: the output is left alone
            seen.setdefault(name, args[0])

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules()
             if isinstance(m, nn.Linear | nn.Conv2d)]  # fmt: skip
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    total = fastest(lambda: model(x))
    layers = {n: fastest(lambda n=n: model.get_submodule(n)(seen[n])) for n in seen}
    print(f"model, batch 1, fastest of {calls}: {total:.3f} ms; its Linear / Conv layers alone: "
          f"{sum(layers.values()):.3f} ms")  # fmt: skip
    print("| layer | ms |\n|---|---:|")
    for n, t in layers.items():
        print(f"| {n} | {t:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fashion-cnn", help="zoo model name")
    ap.add_argument("--targets", nargs="+", default=["latency=0.6", "latency=0.5"])
    ap.add_argument("--bn", choices=["off", "on", "both"], default="both",
                    help="batch-norm re-estimation after the levels are written")  # fmt: skip
    ap.add_argument("--samples", type=int, default=128, help="calibration samples")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (timing and table)")
    ap.add_argument("--calls", type=int, default=300, help="alternating timed calls (batch 1)")
    ap.add_argument("--batch", type=int, default=32, help="the throughput batch also timed")
    ap.add_argument("--limit", type=int, help="evaluate on the first N examples only")
    ap.add_argument("--profile", action="store_true", help="only time the dense model's layers")
    ap.add_argument("--out", help="keep the database (OUT/db) and each run (OUT/<target>-bn<0|1>)")
    ap.add_argument(
        "--refit",
        choices=["off", "on", "both"],
        default="off",
        help="refit every layer to the dense outputs after stitching (recipe refit)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    entry = zoo.get(args.model)
    dense = entry.load().eval()
    dm = entry.evaluate(dense, limit=args.limit)
    x1 = batch_of(example_input(entry.calibration(1, 0)[0], entry.inputs), 1)
    xb = batch_of(x1, args.batch)
    if args.profile:
        return profile(dense, x1, args.calls)
    bns = {"off": [False], "on": [True], "both": [False, True]}[args.bn]
    refits = {"off": [False], "on": [True], "both": [False, True]}[args.refit]
    rows = []
    with tempfile.TemporaryDirectory(prefix="optbrain-latency-db-") as tmp:
        db = Path(args.out) / "db" if args.out else tmp
        for target, bn, refit in ((t, b, r) for t in args.targets for b in bns for r in refits):
            tag = f"{target}-bn{int(bn)}" + ("-refit" if refit else "")
            out = Path(args.out) / tag if args.out else None
            try:
                model, rep = run_zoo_budget(
                    args.model, target, out, db_dir=db, samples=args.samples, quiet=True,
                    limit=args.limit, dense=dense, dense_metrics=dm, bn_recalibration=bn,
                    refit=refit,
                )  # fmt: skip
            except BudgetError as e:
                print(target, bn, "infeasible:", e, flush=True)
                continue
            a = rep.metadata["allocation"]
            t1 = alternating_speedup(dense, model, x1, args.calls)
            tb = alternating_speedup(dense, model, xb, max(10, args.calls // 10))
            met = rep.metrics
            rows.append((target, bn, refit, met, a, t1, tb))
            chosen = {k: v for k, v in a["levels"].items() if v != "dense"}
            got = {k: v["compressed"] for k, v in met.items()}
            print(target, bn, refit, got, chosen, t1, tb, flush=True)
    q = entry.primary
    print(f"\n{args.model}, {torch.get_num_threads()} thread(s); dense {q} {dm[q]:.2f}\n")
    head = ["target", "BN re-est.", "refit", q, "drop (pt)", "params", "MACs",
            "predicted layer latency", "batch-1 speedup (median / min)",
            f"batch-{args.batch} speedup (median / min)", "levels"]  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for target, bn, refit, met, a, t1, tb in rows:
        acc = met[q]["compressed"]
        p = met["params"]["compressed"] / met["params"]["dense"]
        f = met["macs"]["compressed"] / met["macs"]["dense"]
        lv = ", ".join(f"{k} {v}" for k, v in a["levels"].items() if v != "dense")
        s1 = f"{t1[2]:.2f}× / {t1[3]:.2f}× ({t1[0]:.3f} → {t1[1]:.3f} ms)"
        sb = f"{tb[2]:.2f}× / {tb[3]:.2f}× ({tb[0]:.2f} → {tb[1]:.2f} ms)"
        yn = " | ".join("yes" if v else "no" for v in (bn, refit))
        print(f"| {target} | {yn} | {acc:.2f} | {dm[q] - acc:+.2f} | {p:.3f} | "
              f"{f:.3f} | {a['predicted_fraction']:.3f} | {s1} | {sb} | {lv} |")  # fmt: skip


if __name__ == "__main__":
    main()
