"""Engine benchmark: seconds and useful GFLOP/s of the exact greedy engine, as a ratio to a GEMM.

    python benchmarks/bench_engine.py                           # every shape and kind
    python benchmarks/bench_engine.py --shapes 256x512 --kinds trace,obq4 --repeats 3
    python benchmarks/bench_engine.py --busy 3                  # + the slowdown under 3 spinners
    python benchmarks/bench_engine.py --engine "kernel=torch kernel=fused"   # A/B, alternated
    python benchmarks/bench_engine.py --shapes 256x512 --kinds trace --profile  # where time goes
    python benchmarks/bench_engine.py --device cuda              # a GPU line (tensor engine)

The machine this project runs on is shared, so every figure is a ratio measured in the same run:
each engine timing sits between two timings of a ``2048 × 2048`` float32 GEMM (``2·2048³``
FLOP) and is reported against their mean; ``--busy K`` runs each case quiet and then with ``K``
competing busy processes (pure-Python spin loops, killed at exit, also on Ctrl-C) and reports the
slowdown; several ``--engine`` settings (``EngineConfig`` fields) are alternated case by case
(A B A B ...).

Useful FLOP per kind (``R × C`` layer; one greedy step on a working set of ``n`` coordinates
costs the ``2n²`` of its exact ``H⁻¹`` downdate)::

    trace   full ExactOBS trace (C steps)            Σ_k 2(C−k)² ≈ R·2C³/3
    u50     50% unstructured (solve_obc's work: the full trace, then the masked optimum)  R·2C³/3
    nm24    ExactOBS 2:4 (C/2 steps)                  R·2(C³ − (C/2)³)/3 = R·7C³/12
    obq4    OBQ 4-bit (C steps)                       R·2C³/3
    obc24q4 2:4 then OBQ 4-bit on the C/2 kept        R·7C³/12 + R·C³/12 = R·2C³/3

Inputs: ``X (N = 2·C tokens, C)`` Gaussian times a random mixing matrix (correlated, as real
activations are); ``H = 2XᵀX/N``, 1% damping. Output: a Markdown table and one JSON line per
timing (``--json PATH`` also writes them to a file).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402

from optbrain import hessian_from_inputs  # noqa: E402
from optbrain.core.hessian import prepare_layer  # noqa: E402
from optbrain.core.methods.obc import exact_nm, exact_prune, exact_quantize  # noqa: E402
from optbrain.core.obs import EngineConfig  # noqa: E402
from optbrain.core.spec import make_spec  # noqa: E402

SHAPES = ("256x512", "768x768", "576x1536", "1536x576")
KINDS = ("trace", "u50", "nm24", "obq4", "obc24q4")
GEMM_N = 2048

_BUSY: list[subprocess.Popen] = []


def useful_flop(kind: str, rows: int, cols: int) -> float:
    """Useful FLOP of ``kind`` on a ``rows × cols`` layer (module docstring)."""
    c3 = float(cols) ** 3
    per_row = {"nm24": 7 * c3 / 12}.get(kind, 2 * c3 / 3)
    return rows * per_row


def parse_engine(text: str) -> tuple[str, EngineConfig]:
    """``"lazy=64,kernel=torch"`` → ``(text, EngineConfig(lazy=64, kernel="torch"))``;
    ``"default"``: ``EngineConfig()``."""
    kw = {}
    for item in [] if text == "default" else text.split(","):
        key, _, val = item.partition("=")
        kw[key] = float(val) if key == "shrink" else val if key == "kernel" else int(val)
    return text, EngineConfig(**kw)


def make_problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * cols, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    X = X @ (mix + 0.5 * torch.eye(cols))
    W = torch.randn(rows, cols, generator=g) / cols**0.5
    return W, hessian_from_inputs(X)


def run_case(kind: str, W: torch.Tensor, H: torch.Tensor, engine: EngineConfig) -> torch.Tensor:
    """One engine run of ``kind`` (the arithmetic of ``method="obc"`` without the guard)."""
    pat = "2:4" if kind in ("nm24", "obc24q4") else "unstructured"
    bits = 4 if kind in ("obq4", "obc24q4") else None
    sparsity = 0.5 if kind == "u50" else None
    spec = make_spec(W.shape[1], sparsity, pat, bits=bits)
    Wc, prep = prepare_layer(W, H, spec)
    if kind == "trace":
        from optbrain.core.patterns import Pattern
        from optbrain.core.trace import obs_trace

        return obs_trace(Wc, prep, Pattern("unstructured"), engine=engine).step_loss
    if kind == "u50":
        return exact_prune(Wc, prep, spec, engine)[0]
    keep = None
    weight = Wc
    if pat == "2:4":
        weight, keep, _ = exact_nm(Wc, prep, 2, 4, engine)
    if bits is not None:
        weight = exact_quantize(weight, keep, prep, spec, engine)[0]
    return weight


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_seconds(A: torch.Tensor, B: torch.Tensor) -> float:
    """Best of 3 timings of ``A @ B`` (on A's device, synchronized)."""
    best = float("inf")
    for _ in range(3):
        _sync(A.device)
        t0 = time.perf_counter()
        torch.mm(A, B)
        _sync(A.device)
        best = min(best, time.perf_counter() - t0)
    return best


def start_busy(k: int) -> None:
    for _ in range(k):
        _BUSY.append(
            subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        )
    time.sleep(0.5)


def stop_busy() -> None:
    while _BUSY:
        p = _BUSY.pop()
        p.kill()
        p.wait()


def _on_signal(signum, frame):  # noqa: ARG001
    stop_busy()
    raise KeyboardInterrupt


def measure(kind, W, H, engine, A, B, repeats):
    """Best-of-``repeats`` engine seconds, and the mean of the GEMM timings around each run."""
    run_case(kind, W[:2], H, engine)  # warm: numba's cached machine code, lazy imports
    best, gemms = float("inf"), [gemm_seconds(A, B)]
    for _ in range(repeats):
        _sync(W.device)
        t0 = time.perf_counter()
        run_case(kind, W, H, engine)
        _sync(W.device)
        best = min(best, time.perf_counter() - t0)
        gemms.append(gemm_seconds(A, B))
    return best, sum(gemms) / len(gemms)


def profile_case(kind: str, W, H, engine: EngineConfig, title: str) -> None:
    """Operators by self CPU time (with call counts) of one run, and the share of ``fold``."""
    from torch.profiler import ProfilerActivity, profile

    from optbrain.core import obs

    spent = [0.0]
    fold = obs.fold

    def timed_fold(*a):
        t0 = time.perf_counter()
        r = fold(*a)
        spent[0] += time.perf_counter() - t0
        return r

    obs.fold = timed_fold
    try:
        t0 = time.perf_counter()
        run_case(kind, W, H, engine)
        total = time.perf_counter() - t0
    finally:
        obs.fold = fold
    print(f"{title}: {total:.3f} s, fold {spent[0]:.3f} s ({spent[0] / total:.0%})", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_case(kind, W, H, engine)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of ROWSxCOLS")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {KINDS}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--repeats", type=int, default=1, help="engine runs per case (best taken)")
    ap.add_argument("--busy", type=int, default=0, help="K competing busy processes (0: none)")
    ap.add_argument(
        "--engine",
        default="",
        help='space-separated EngineConfig settings to A/B, e.g. "lazy=32 lazy=64,step_threads=1"',
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print a torch.profiler table (operators by self time, calls) of each case instead",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (problems and GEMM there)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the JSON lines here")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        ap.error(f"unknown kind(s) {bad}; choose from {list(KINDS)}")
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        ap.error(f"--shapes must be ROWSxCOLS[,...], got {args.shapes!r}")
    try:
        engines = [parse_engine(v) for v in args.engine.split()] or [("default", EngineConfig())]
    except (TypeError, ValueError) as e:
        ap.error(f"--engine: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    atexit.register(stop_busy)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        ap.error(f"--device {args.device!r} is not usable here: {e}")
    A = torch.randn(GEMM_N, GEMM_N, device=device)
    B = torch.randn(GEMM_N, GEMM_N, device=device)
    gemm_flop = 2.0 * GEMM_N**3
    load = os.getloadavg()[0]
    results = []
    out = open(args.json, "w") if args.json else None  # noqa: SIM115
    try:
        for rows, cols in shapes:
            W, H = (t.to(device) for t in make_problem(rows, cols, args.seed))
            for kind in kinds:
                flop = useful_flop(kind, rows, cols)
                for name, engine in engines:
                    if args.profile:
                        profile_case(kind, W, H, engine, f"{rows}x{cols} {kind} {name}")
                        continue
                    rec = {"shape": f"{rows}x{cols}", "kind": kind, "engine": name}
                    rec["device"] = str(device)
                    sec, gsec = measure(kind, W, H, engine, A, B, args.repeats)
                    rec.update(
                        seconds=sec,
                        gflops=flop / sec / 1e9,
                        gemm_gflops=gemm_flop / gsec / 1e9,
                    )
                    rec["ratio"] = rec["gflops"] / rec["gemm_gflops"]
                    if args.busy:
                        start_busy(args.busy)
                        try:
                            bsec, _ = measure(kind, W, H, engine, A, B, args.repeats)
                        finally:
                            stop_busy()
                        rec.update(busy=args.busy, busy_seconds=bsec, slowdown=bsec / sec)
                    rec["threads"] = torch.get_num_threads()
                    rec["load1"] = os.getloadavg()[0]
                    results.append(rec)
                    line = json.dumps(rec)
                    print(line, flush=True)
                    if out:
                        out.write(line + "\n")
    except KeyboardInterrupt:
        stop_busy()
        print("interrupted", file=sys.stderr)
    finally:
        stop_busy()
        if out:
            out.close()
    print(
        f"\n{device}, {torch.get_num_threads()} threads, load average at start {load:.1f}, "
        f"GEMM {GEMM_N}² fp32\n"
    )
    busy_h = f" | busy {args.busy}: s | slowdown" if args.busy else ""
    head = "| shape | kind | engine | seconds | useful GFLOP/s | GEMM GFLOP/s | ratio"
    print(head + busy_h + " |")
    print("|---|---|---:|---:|---:|---:|---:" + ("|---:|---:" if args.busy else "") + "|")
    for r in results:
        extra = f" | {r['busy_seconds']:.3f} | {r['slowdown']:.2f}×" if args.busy else ""
        print(
            f"| {r['shape']} | {r['kind']} | {r['engine']} | {r['seconds']:.3f} | "
            f"{r['gflops']:.2f} | {r['gemm_gflops']:.1f} | {r['ratio']:.1%}{extra} |"
        )


if __name__ == "__main__":
    main()
