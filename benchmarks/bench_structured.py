"""Timing of structured OBS (core.structured): a full removal trace of big layers, every level.

    python benchmarks/bench_structured.py                      # 4096x4096 g=1, 4096x11008 g=1
    python benchmarks/bench_structured.py --shapes 4096x4096 --group 1 --repeat 3
    python benchmarks/bench_structured.py --shapes 4096x11008 --max-fraction 0.5

For each ``rows x cols`` shape: a random weight and ``H = 2 XᵀX / N`` of correlated inputs, then
``structured_obs`` (damping, inverse, ``G = WᵀW``, the greedy over every group) timed as one
call, with the phases (prepare_hessian, gram, greedy) timed separately. Prints wall seconds,
process CPU seconds (all threads) and the 1-minute load average, since other processes on a
shared machine inflate the wall time; ``--levels`` also times reading that many levels.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/__init__.py

import torch  # noqa: E402

from optbrain.core.hessian import prepare_hessian  # noqa: E402
from optbrain.core.structured import structured_obs  # noqa: E402
from optbrain.core.structured_engine import gram, greedy_groups  # noqa: E402


def problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``W (rows, cols)``, ``H`` of inputs ``X = Z (I + 0.3 M / √cols)`` (2·cols tokens)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(2 * cols, cols, generator=g) @ mix
    H = 2.0 * X.T @ X / X.shape[0]
    return torch.randn(rows, cols, generator=g), H


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def bench(rows: int, cols: int, group: int, max_fraction: float, levels: int) -> None:
    W, H = problem(rows, cols)
    trace, wall, cpu = timed(lambda: structured_obs(W, H, group, max_fraction=max_fraction))
    steps = trace.order.numel()
    print(
        f"{rows}x{cols} g={group}: structured_obs {steps} steps "
        f"({trace.max_fraction:.3g} of {trace.n_groups} groups): {wall:.2f} s wall, "
        f"{cpu:.2f} s CPU, load {load()}, threads {torch.get_num_threads()}"
    )
    prep, w1, c1 = timed(lambda: prepare_hessian(H))
    G, w2, c2 = timed(lambda: gram(W))
    _, w3, c3 = timed(lambda: greedy_groups(prep.Hinv, G, group, steps))
    print(
        f"    phases: prepare_hessian {w1:.2f} s ({c1:.2f} CPU), gram {w2:.2f} s ({c2:.2f} CPU), "
        f"greedy {w3:.2f} s ({c3:.2f} CPU)"
    )
    if levels:
        fr = [trace.max_fraction * (i + 1) / (levels + 1) for i in range(levels)]
        _, w4, c4 = timed(lambda: trace.levels(fr))
        print(f"    {levels} levels read from the trace: {w4:.2f} s ({c4:.2f} CPU)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"])
    ap.add_argument("--group", type=int, default=1, help="columns per group (1 = features)")
    ap.add_argument("--max-fraction", type=float, default=1.0, help="how far the trace runs")
    ap.add_argument("--levels", type=int, default=0, help="also read this many levels")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    for shape in args.shapes:
        rows, cols = (int(v) for v in shape.lower().split("x"))
        for _ in range(args.repeat):
            bench(rows, cols, args.group, args.max_fraction, args.levels)


if __name__ == "__main__":
    main()
