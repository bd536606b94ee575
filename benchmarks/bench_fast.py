"""Fast solvers and baselines side by side: seconds and relative loss per method and setting.

    python benchmarks/bench_fast.py                      # 256x512 layer, X of 2048 tokens
    python benchmarks/bench_fast.py --with-obc           # + the exact solver (OBC) as reference
    python benchmarks/bench_fast.py --big                # + 4096x4096 GPTQ and SparseGPT timings
    python benchmarks/bench_fast.py --json out.json --rows 128 --cols 256 --tokens 1024 --seed 1

Settings: 50% / 75% / 90% unstructured, 2:4, 4-bit, 3-bit, 2:4 + 4-bit (per-channel symmetric
grids). Inputs are "iid" (Gaussian) and "correlated" (Gaussian times a random mixing matrix).
Loss is relative and measured with the undamped H: ``½ Σ_r δ_r H δ_rᵀ / ½ Σ_r w_r H w_rᵀ`` =
``||(W − Ŵ) Xᵀ||² / ||W Xᵀ||²``. Seconds are the solver's own (``LayerResult.seconds``), best
of ``--repeat`` runs. "—" marks a method/setting pair the method does not support, or (for
sparsegpt and magnitude without pruning, which reduce to gptq and rtn) does not repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402

from optbrain import compress_layer, layer_loss  # noqa: E402

SETTINGS = {
    "50%": {"sparsity": 0.5},
    "75%": {"sparsity": 0.75},
    "90%": {"sparsity": 0.9},
    "2:4": {"pattern": "2:4"},
    "4-bit": {"bits": 4},
    "3-bit": {"bits": 3},
    "2:4+4-bit": {"pattern": "2:4", "bits": 4},
}
METHODS = {
    "gptq": {"method": "gptq"},
    "gptq act_order": {"method": "gptq", "act_order": True},
    "sparsegpt": {"method": "sparsegpt"},
    "magnitude": {"method": "magnitude"},
    "obd": {"method": "obd"},
    "rtn": {"method": "rtn"},
}


def make_problem(rows: int, cols: int, tokens: int, kind: str, seed: int):
    """``(W, H = 2 XᵀX / N)``; correlated X = Z (M + ½ I), M Gaussian / √cols."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g)
    if kind == "correlated":
        mix = torch.randn(cols, cols, generator=g) / cols**0.5
        X = X @ (mix + 0.5 * torch.eye(cols))
    W = torch.randn(rows, cols, generator=g) / cols**0.5
    H = 2.0 * (X.T @ X) / tokens
    return W, 0.5 * (H + H.T)


SAME_AS = {"sparsegpt": "gptq", "magnitude": "rtn"}  # without pruning


def run_one(W, H, setting: dict, method: dict, repeat: int) -> dict | None:
    if method["method"] in SAME_AS and "sparsity" not in setting and "pattern" not in setting:
        return None
    best = None
    for _ in range(repeat):
        try:
            r = compress_layer(W, H, **setting, **method)
        except ValueError:
            return None  # unsupported pair
        if best is None or r.seconds < best.seconds:
            best = r
    ref = layer_loss(W, torch.zeros_like(W), H)
    return {
        "seconds": best.seconds,
        "rel_loss": layer_loss(W, best.weight, H) / ref,
        "predicted_loss": best.loss,
        "method_run": best.method,
    }


def table(title: str, rows: dict, key: str, fmt: str) -> str:
    head = "| " + title + " | " + " | ".join(SETTINGS) + " |"
    sep = "|" + "---|" * (len(SETTINGS) + 1)
    lines = [head, sep]
    for name, cells in rows.items():
        vals = ["—" if cells[s] is None else format(cells[s][key], fmt) for s in SETTINGS]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell, best time kept")
    ap.add_argument("--with-obc", action="store_true", help="also run the exact solver")
    ap.add_argument("--big", action="store_true", help="also time 4096x4096 GPTQ and SparseGPT")
    ap.add_argument("--big-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", type=str, default=None, help="write all numbers to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = dict(METHODS)
    if args.with_obc:
        methods = {"obc": {"method": "obc"}, **methods}
    out = {
        "rows": args.rows,
        "cols": args.cols,
        "tokens": args.tokens,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "results": {},
    }
    print(
        f"# {args.rows}x{args.cols} layer, X of {args.tokens} tokens, seed {args.seed}, "
        f"{torch.get_num_threads()} torch threads, best of {args.repeat}\n"
    )
    for kind in ("iid", "correlated"):
        W, H = make_problem(args.rows, args.cols, args.tokens, kind, args.seed)
        rows = {}
        for name, m in methods.items():
            rows[name] = {s: run_one(W, H, cfg, m, args.repeat) for s, cfg in SETTINGS.items()}
        out["results"][kind] = rows
        print(f"## {kind} inputs: loss / (1/2 sum_r w_r H w_r^T)\n")
        print(table("method", rows, "rel_loss", ".4f") + "\n")
        print(f"## {kind} inputs: seconds\n")
        print(table("method", rows, "seconds", ".3f") + "\n")
    if args.big:
        n = args.big_size
        W, H = make_problem(n, n, 2 * n, "correlated", args.seed)
        big = {}
        for name, kw in (
            ("gptq 4-bit", {"method": "gptq", "bits": 4}),
            ("gptq 4-bit min-max grid", {"method": "gptq", "bits": 4, "search": False}),
            ("sparsegpt 50%", {"method": "sparsegpt", "sparsity": 0.5}),
            ("sparsegpt 2:4", {"method": "sparsegpt", "pattern": "2:4"}),
        ):
            r = compress_layer(W, H, **kw)
            big[name] = {
                "seconds": r.seconds,
                "rel_loss": layer_loss(W, r.weight, H) / layer_loss(W, torch.zeros_like(W), H),
            }
        out["big"] = {"size": n, "tokens": 2 * n, "results": big}
        print(f"## {n}x{n} layer (correlated X of {2 * n} tokens), one run each\n")
        print("| method | seconds | rel. loss |\n|---|---|---|")
        for name, v in big.items():
            print(f"| {name} | {v['seconds']:.2f} | {v['rel_loss']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
