"""Layer losses on the calibration inputs and on held-out inputs, per damping and solver.

    python benchmarks/layer_heldout.py --model smollm2-135m --blocks 3 20 \\
        --layers self_attn.q_proj self_attn.o_proj mlp.up_proj mlp.down_proj \\
        --damps 0.01 0.1 0.3 0.001 --bits 4 --asym

Every chosen layer's H from the entry's calibration (seed 0) and a second H from a second random
draw of windows (seed 1, ``--samples`` each, one pass of the dense model: independent
mode). Each solver (``METHOD`` or ``METHOD+clip``: with ``clip_search``) compresses the layer
at each damping on the first H; the table gives the layer loss ``½ Σ_r δ_r H δ_rᵀ`` under the
undamped calibration H and under the held-out H, as ratios to the layer's first cell (first
method, first damping). A solver that fits the calibration inputs more closely
(lower calibration loss) while the held-out loss rises is overfitting them.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

from accuracy import parse_options  # noqa: E402  (benchmarks/ is on sys.path)

from optbrain import compress_layer  # noqa: E402
from optbrain.adapters import find_layers  # noqa: E402
from optbrain.app import zoo  # noqa: E402
from optbrain.core.hessian import row_losses  # noqa: E402
from optbrain.pipeline.hessians import collect_hessians  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", nargs="+", type=int, default=[3, 20])
    ap.add_argument("--layers", nargs="+", default=["self_attn.q_proj", "mlp.down_proj"])
    ap.add_argument("--methods", nargs="+", default=["gptq", "obc"])
    ap.add_argument("--damps", nargs="+", type=float, default=[0.01, 0.1, 0.001])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE")
    args = ap.parse_args()
    options = parse_options(args.option)
    entry = zoo.get(args.model)
    model = entry.load()
    layers = find_layers(model)[0]
    want = {f"layers.{b}.{k}" for b in args.blocks for k in args.layers}
    targets = {n: a for n, a in layers.items() if any(n.endswith(w) for w in want)}
    if not targets:
        raise SystemExit(f"no layer of {args.model} ends with any of {sorted(want)}")
    calib = collect_hessians(
        model, targets, entry.calibration(args.samples, 0), inputs=entry.inputs
    )
    held = collect_hessians(model, targets, entry.calibration(args.samples, 1), inputs=entry.inputs)
    head = [f"d={d:g} calib / held-out" for d in args.damps]
    print("| layer | method | " + " | ".join(head) + " |\n|---|---|" + "---|" * len(head))
    for name, adapter in targets.items():
        W = adapter.weight.detach()
        H = calib[name][0].hessian().double()
        T = held[name][0].hessian().double()
        first = None
        for spec in args.methods:
            method, _, variant = spec.partition("+")
            opts = {**options.get(method, {}), **({"clip_search": True} if variant else {})}
            cells = []
            for damp in args.damps:
                r = compress_layer(
                    W.float(), H.float(), bits=args.bits, sym=not args.asym, method=method,
                    damp=damp, **opts,
                )  # fmt: skip
                loss = (row_losses(W, r.weight, H).sum(), row_losses(W, r.weight, T).sum())
                cells.append(tuple(float(x) for x in loss))
            c0, h0 = first = first or cells[0]
            row = " | ".join(f"{c / c0:.3f} / {h / h0:.3f}" for c, h in cells)
            print(f"| {name} | {spec} | {row} |", flush=True)


if __name__ == "__main__":
    main()
