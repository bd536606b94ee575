"""OBC against the fast solvers on ill-conditioned layers: plain greedy, slack rule, guard.

    python benchmarks/bench_guard.py [--seeds 5] [--tokens 64]

The layers (issue 16): 64×128, inputs with an axis-aligned eigenvalue spread of 10⁻²
(independent columns, variances log-spaced 1 → 10⁻², shuffled) from ``--tokens`` tokens. Per
budget: the mean layer loss (damped H) over the seeds and the total seconds of plain greedy OBC
(``slack=0, guard=False``), OBC with the slack rule only (``guard=False``), OBC as shipped
(slack + guard) and the fast solver (GPTQ / SparseGPT), and how many rows of the shipped result
are above the fast solver's (must be 0).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/__init__.py

import torch  # noqa: E402

from optbrain import compress_layer  # noqa: E402
from optbrain.core.hessian import prepare_hessian, row_losses  # noqa: E402

F64 = torch.float64
BUDGETS = [
    {"bits": 3},
    {"bits": 4},
    {"sparsity": 0.5},
    {"pattern": "2:4"},
    {"pattern": "2:4", "bits": 4},
    {"sparsity": 0.5, "bits": 4},
]


def ill_conditioned(seed: int, tokens: int, rows: int = 64, cols: int = 128):
    g = torch.Generator().manual_seed(seed)
    var = torch.logspace(0, -2, cols, dtype=F64)
    X = (
        torch.randn(tokens, cols, generator=g, dtype=F64)
        * var.sqrt()[torch.randperm(cols, generator=g)]
    )
    W = torch.randn(rows, cols, generator=g, dtype=F64)
    return W.float(), (2 * X.T @ X / tokens).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    print(
        "| budget | plain greedy OBC | + slack | + slack + guard (shipped) | fast solver "
        "| rows above fast |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for kw in BUDGETS:
        fast = "sparsegpt" if ("sparsity" in kw or "pattern" in kw) else "gptq"
        runs = {
            "plain": ("obc", {"slack": 0.0, "guard": False}),
            "slack": ("obc", {"guard": False}),
            "shipped": ("obc", {}),
            "fast": (fast, {}),
        }
        tot = {k: [0.0, 0.0] for k in runs}
        above = 0
        for seed in range(args.seeds):
            W, H = ill_conditioned(seed, args.tokens)
            Hd = prepare_hessian(H, 0.01).H
            rl = {}
            for k, (m, opts) in runs.items():
                t = time.perf_counter()
                r = compress_layer(W, H, method=m, **kw, **opts)
                tot[k][1] += time.perf_counter() - t
                rl[k] = row_losses(W, r.weight, Hd)
                tot[k][0] += float(rl[k].sum()) / args.seeds
            if "sparsity" not in kw:  # row by row only where rows keep equal counts
                above += int((rl["shipped"] > rl["fast"] * (1 + 1e-5) + 1e-7).sum())
        cells = [f"{tot[k][0]:.2f} ({tot[k][1]:.1f} s)" for k in runs]
        name = " + ".join(f"{k}={v}" for k, v in kw.items())
        print(
            f"| {name} | " + " | ".join(cells) + f" | {above if 'sparsity' not in kw else 'n/a'} |"
        )


if __name__ == "__main__":
    main()
