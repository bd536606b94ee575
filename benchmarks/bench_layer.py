"""Layer benchmark of the exact solvers: seconds and loss per method on one random layer.

    python benchmarks/bench_layer.py                     # 256x512 layer, X of 2048 tokens
    python benchmarks/bench_layer.py --reference         # + the plain per-row rank-1 OBS loop
    python benchmarks/bench_layer.py --json out.json

Inputs are "correlated" (Gaussian times a random mixing matrix, as real activations are) and
"iid" (plain Gaussian). Loss is relative: ``||(W − Ŵ) Xᵀ||² / ||W Xᵀ||²``. ``--reference`` also
times the textbook formulation (every row keeps its own copy of H⁻¹ and downdates it with a
rank-1 update at every step — the structure of the original OBC code) on the same layer in the
same run, so the speed-up is a ratio measured under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402

from optbrain import (  # noqa: E402
    compress_layer,
    hessian_from_inputs,
    prepare_hessian,
    prune_layer,
)
from optbrain.core.grid import fit_grid, quantize_values  # noqa: E402


def make_problem(rows: int, cols: int, tokens: int, kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g)
    if kind == "correlated":
        mix = torch.randn(cols, cols, generator=g) / cols**0.5
        X = X @ (mix + 0.5 * torch.eye(cols))
    W = torch.randn(rows, cols, generator=g) / cols**0.5
    return W, X


def rel_loss(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    W, W_hat, X = W.double(), W_hat.double(), X.double()
    return float(((W - W_hat) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())


def reference_obs(W: torch.Tensor, Hinv: torch.Tensor, quant=None) -> torch.Tensor:
    """Plain ExactOBS / OBQ: per-row copies of H⁻¹, a full rank-1 downdate at every step."""
    R, C = W.shape
    w = W.clone()
    Hi = Hinv.expand(R, C, C).clone()
    ar = torch.arange(R)
    done = torch.zeros(R, C, dtype=torch.bool)
    for _ in range(C):
        d = torch.diagonal(Hi, 0, 1, 2)
        target = torch.zeros_like(w) if quant is None else quant(w)
        score = ((w - target) ** 2 / d).masked_fill(done, float("inf"))
        p = score.argmin(1)
        col = Hi[ar, :, p]
        dp = col[ar, p]
        w -= col * ((w[ar, p] - target[ar, p]) / dp).unsqueeze(1)
        w[ar, p] = target[ar, p]
        done[ar, p] = True
        Hi -= col.unsqueeze(2) * (col / dp.unsqueeze(1)).unsqueeze(1)
    return w


def _trace(W: torch.Tensor, prep):
    """The greedy engine's full trace alone (no 50% level, no guard), as a result-like object."""
    from types import SimpleNamespace

    from optbrain.core.patterns import Pattern
    from optbrain.core.trace import obs_trace

    obs_trace(W, prep, Pattern("unstructured"))
    return SimpleNamespace(weight=None)  # every sparsity: no single loss


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_kind(kind: str, args: argparse.Namespace) -> list[dict]:
    """Every exact method (and the reference loop with --reference) on one input kind."""
    W, X = make_problem(args.rows, args.cols, args.tokens, kind, args.seed)
    H = hessian_from_inputs(X)
    prep = prepare_hessian(H, 0.01)
    cases = [
        ("ExactOBS full trace (engine)", lambda: _trace(W, prep)),
        ("ExactOBS full trace (+50%)", lambda: prune_layer(W, H, 0.5)),
        ("OBQ 4-bit", lambda: compress_layer(W, H, bits=4)),
        ("OBQ 3-bit", lambda: compress_layer(W, H, bits=3)),
        ("ExactOBS 2:4", lambda: prune_layer(W, H, pattern="2:4")),
        ("ExactOBS block4 50%", lambda: prune_layer(W, H, 0.5, pattern="block4")),
        ("OBC 2:4 + 4-bit", lambda: compress_layer(W, H, pattern="2:4", bits=4)),
    ]
    prune_layer(W[:2], H, 0.5)  # warm: numba's cached machine code, lazy imports
    compress_layer(W[:2], H, bits=4)
    rows = []
    for name, fn in cases:
        res, sec = timed(fn)
        rows.append(
            {
                "inputs": kind,
                "method": name,
                "seconds": sec,
                "rel_loss": float("nan") if res.weight is None else rel_loss(W, res.weight, X),
            }
        )
        print(f"{kind:10s} {name:36s} {sec:8.3f} s  loss {rows[-1]['rel_loss']:.5f}", flush=True)
    if args.reference:
        grid = fit_grid(W, 4, weight=torch.diagonal(prep.H))
        sc, ze = grid.columns(W.shape[1])
        refs = [
            ("reference: full trace (rank-1 loop)", lambda: reference_obs(W, prep.Hinv)),
            (
                "reference: OBQ 4-bit (rank-1 loop)",
                lambda: reference_obs(
                    W, prep.Hinv, lambda w: quantize_values(w, sc, ze, grid.maxq)
                ),
            ),
        ]
        for name, fn in refs:
            out, sec = timed(fn)
            rows.append(
                {"inputs": kind, "method": name, "seconds": sec, "rel_loss": rel_loss(W, out, X)}
            )
            print(
                f"{kind:10s} {name:36s} {sec:8.3f} s  loss {rows[-1]['rel_loss']:.5f}", flush=True
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="output channels of the layer")
    ap.add_argument("--cols", type=int, default=512, help="input features of the layer")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (rows of X)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument(
        "--inputs",
        choices=["correlated", "iid", "both"],
        default="both",
        help="input distribution(s) to run",
    )
    ap.add_argument(
        "--reference",
        action="store_true",
        help="also time the plain per-row rank-1 formulation (slow: ~1 min)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    kinds = ["correlated", "iid"] if args.inputs == "both" else [args.inputs]
    rows = [r for kind in kinds for r in run_kind(kind, args)]

    print(
        f"\n{args.rows}x{args.cols} layer, {args.tokens} tokens, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| inputs | method | seconds | loss ‖ΔW X‖²/‖W X‖² |")
    print("|---|---|---:|---:|")
    for r in rows:
        loss = "—" if r["rel_loss"] != r["rel_loss"] else f"{r['rel_loss']:.5f}"
        print(f"| {r['inputs']} | {r['method']} | {r['seconds']:.3f} | {loss} |")
    if args.reference:
        print()
        for kind in kinds:
            sel = {r["method"]: r["seconds"] for r in rows if r["inputs"] == kind}
            ref = sel["reference: full trace (rank-1 loop)"]
            t = ref / sel["ExactOBS full trace (engine)"]
            t50 = ref / sel["ExactOBS full trace (+50%)"]
            q = sel["reference: OBQ 4-bit (rank-1 loop)"] / sel["OBQ 4-bit"]
            print(
                f"{kind}: speed-up over the rank-1 loop, same run: full trace {t:.1f}x "
                f"(with the 50% level and the guard {t50:.1f}x), OBQ 4-bit {q:.1f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "rows": args.rows,
                    "cols": args.cols,
                    "tokens": args.tokens,
                    "threads": torch.get_num_threads(),
                    "results": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
