"""Refit the exact solver's cost model (``optbrain.core.methods.auto.COST``) on this machine.

    python benchmarks/fit_cost.py                  # every part and shape, 1 thread, best of 2
    python benchmarks/fit_cost.py --parts quant --repeats 3 --threads 1

For each part (``quant`` = OBQ 4-bit, ``unstructured`` = 50%, ``nm`` = 2:4, ``block`` = 50%
block4) and each ``rows × cols`` shape it times ``compress_layer(method="obc")`` (best of
``--repeats``, the guard included, as ``auto`` would run it) and fits
``seconds ≈ a·cols + b·rows·cols² + c·rows·cols³`` by relative least squares (each timing
weighted by 1/seconds, coefficients kept ≥ 0). It prints the fitted ``COST`` lines to paste into
``auto.py`` and each shape's measured vs modelled seconds.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402

from optbrain import compress_layer, hessian_from_inputs  # noqa: E402
from optbrain.core.methods.auto import COST  # noqa: E402

SHAPES = (
    "32x64 64x128 128x128 32x256 128x256 256x256 64x512 256x512 512x512 128x1024 256x1024 576x1536"
).split()
PARTS = {
    "quant": {"bits": 4},
    "unstructured": {"sparsity": 0.5},
    "nm": {"pattern": "2:4"},
    "block": {"sparsity": 0.5, "pattern": "block4"},
}


def problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * cols, cols, generator=g)
    X = X @ (torch.randn(cols, cols, generator=g) / cols**0.5 + 0.5 * torch.eye(cols))
    return torch.randn(rows, cols, generator=g) / cols**0.5, hessian_from_inputs(X)


def fit(samples: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Non-negative relative least squares of ``t ≈ a·C + b·R·C² + c·R·C³``."""
    A = torch.tensor([[c, r * c**2, r * c**3] for r, c, _ in samples], dtype=torch.float64)
    t = torch.tensor([s for _, _, s in samples], dtype=torch.float64)
    A, y = A / t.unsqueeze(1), torch.ones_like(t)
    active = [0, 1, 2]
    while True:  # drop a coefficient that comes out negative and refit (tiny NNLS)
        sol = torch.linalg.lstsq(A[:, active], y.unsqueeze(1)).solution.squeeze(1)
        if (sol >= 0).all() or len(active) == 1:
            break
        active.pop(int(sol.argmin()))
    coef = [0.0, 0.0, 0.0]
    for i, v in zip(active, sol.tolist(), strict=True):
        coef[i] = max(0.0, v)
    return tuple(coef)  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--shapes", default=" ".join(SHAPES), help="space-separated ROWSxCOLS")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split()]
    for part in args.parts.split(","):
        samples = []
        for rows, cols in shapes:
            W, H = problem(rows, cols)
            compress_layer(W[:2], H, method="obc", **PARTS[part])  # compile / warm up
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                compress_layer(W, H, method="obc", **PARTS[part])
                best = min(best, time.perf_counter() - t0)
            samples.append((rows, cols, best))
            print(f"{part:12s} {rows}x{cols}: {best:.3f} s", flush=True)
        a, b, c = fit(samples)
        print(f'    "{part}": ({a:.2g}, {b:.2g}, {c:.2g}),   # was {COST[part]}')
        for rows, cols, t in samples:
            m = a * cols + b * rows * cols**2 + c * rows * cols**3
            print(f"      {rows}x{cols}: measured {t:.3f} s, modelled {m:.3f} s ({m / t:.2f}x)")


if __name__ == "__main__":
    main()
