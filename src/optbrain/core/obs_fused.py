"""The fused CPU kernel of the greedy OBS engine: one compiled loop per row, its ``H⁻¹`` in cache.

The same algorithm as ``core.obs.greedy_single`` (module docstring there), row by row: each row
copies its starting inverse ``B = H⁻¹`` (lower triangle only — ``B`` is symmetric) into a scratch
buffer and runs all its greedy steps in one compiled function (numba, no Python per step). A
step on the working set of ``m`` coordinates::

    c      = B[p, :] − Σ_l U[l, p] U[l, :]          the current row p of H⁻¹ (lazy terms U)
    w     -= (w_p − t_p) / c_p · c                   OBS compensation
    U[k]   = c / √c_p                                rank-1 downdate, kept lazily
    swap p with the last working coordinate; m −= 1  (the working set stays contiguous)

and every ``lazy`` steps ``B[i, :i+1] −= Σ_l U[l, i] U[l, :i+1]`` (the downdates folded into the
lower triangle, one pass over ``B`` for ``lazy`` rank-1 terms). Work per row:
``Σ_m m²`` multiply-adds ≈ ``C³/3`` (half of the ``2C³/3`` useful FLOP, by symmetry), on a buffer
of ``C²`` floats a core keeps in its L2/L3 cache instead of a batched ``(rows, C, C)`` tensor in
main memory. Rows run in parallel on threads (the kernel releases the GIL), taken from a shared
queue of small row chunks, so a core slowed by another process takes fewer chunks rather than
holding the others up.

Scorers (``mode``): 0 prune ``w_p² / d_p``; 1 N:M (a group of ``m`` columns stops once it has
``m − n`` removed); 2 quantize (OBQ: target ``q(w_p)``, saliency ``(q(w_p) − w_p)² − c·Δ_p²``
over ``d_p``, and the outlier rule of ``core.obq.QuantScorer``). Ties go to the lowest original
column, as ``argmin`` over the column-ordered working set of the tensor engine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # numba is a dependency; without it (an unsupported platform) the tensor engine runs
    import numba
except ImportError:  # pragma: no cover - exercised only where numba cannot be installed
    numba = None

PRUNE, NM, QUANT, FORCED, NONE = 0, 1, 2, 3, 4
#: work per thread below which the kernel runs in the calling thread (multiply-adds)
SERIAL_WORK = 2e7
#: row chunks per thread in the shared queue (load balance on a busy machine vs. overhead)
CHUNKS_PER_THREAD = 8
#: ``pool_threads`` reads the number of runnable tasks here (Linux)
LOADAVG = "/proc/loadavg"


def available() -> bool:
    """Whether the fused kernel can run here (numba importable)."""
    return numba is not None and os.environ.get("OPTBRAIN_NO_FUSED", "") != "1"


def _kernel(
    W, Hinv, shared, POS, TOTAL, P1, FORCE, lazy, mode1, mode2, SCALE, ZERO, K, outliers,
    nm_n, nm_m, OUT, ORDER, LOSS, lo, hi,
):  # fmt: skip
    """Rows ``lo..hi`` of the greedy engine (see module docstring); arrays are numpy.

    W: ``(R, Cw)`` working weights (gathered at POS); Hinv: ``(1, Cw, Cw)`` shared (``shared``)
    or ``(R, Cw, Cw)``; POS: ``(R, Cw)`` original columns; SCALE, ZERO: ``(R, Cw)`` grid at POS
    (QUANT); OUT: ``(R, C)`` output rows (fixed coordinates are written with their targets,
    working ones with their final values); ORDER ``(R, S)`` int64; LOSS ``(R, S)`` f64.
    Row r takes ``TOTAL[r]`` steps: the first ``P1[r]`` with ``mode1``, the rest with ``mode2``;
    ``FORCED`` fixes (to 0) the original columns ``FORCE[r, s]`` in that order (a replay).
    K: constants in the compute dtype ``[0, maxq, slack, ¼, tiny, 1]`` (so float32 rows compute
    in float32 throughout, as the tensor engine).
    """
    Cw = W.shape[1]
    C = OUT.shape[1]
    dt = W.dtype
    B = np.empty((Cw, Cw), dt)
    U = np.empty((max(lazy, 1), Cw), dt)
    c = np.empty(Cw, dt)
    d = np.empty(Cw, dt)
    w = np.empty(Cw, dt)
    sc = np.empty(Cw, dt)
    ze = np.empty(Cw, dt)
    V = np.empty(Cw, dt)  # scores of the working coordinates (``_choose``)
    E = np.empty(Cw, dt)  # their grid errors (QUANT)
    pos = np.empty(Cw, np.int64)
    where = np.full(C, -1, np.int64)
    cnt = np.zeros(C // nm_m + 1, np.int64)
    zero_, tiny, one = K[0], K[4], K[5]
    for r in range(lo, hi):
        H0 = Hinv[0] if shared else Hinv[r]
        for i in range(Cw):
            for j in range(i + 1):
                B[i, j] = H0[i, j]
            d[i] = H0[i, i]
            w[i] = W[r, i]
            pos[i] = POS[r, i]
            where[pos[i]] = i
            sc[i] = SCALE[r, i]
            ze[i] = ZERO[r, i]
        cnt[:] = 0
        m = Cw
        k = 0
        total = min(TOTAL[r], Cw)
        for s in range(total):
            mode = mode1 if s < P1[r] else mode2
            if mode == FORCED:
                p = where[FORCE[r, s]]
            else:
                p = _choose(mode, m, w, d, pos, sc, ze, cnt, K, outliers, nm_n, nm_m, C, V, E)
            t = zero_
            if mode == QUANT:
                t = _grid_value(w[p], sc[p], ze[p], zero_, K[1])
            # --- c = current row p of H⁻¹ over the working set
            for j in range(p):
                c[j] = B[p, j]
            for j in range(p, m):
                c[j] = B[j, p]
            l = 0
            while l + 4 <= k:  # four lazy terms per pass over c (fewer loads and stores)
                a0, a1, a2, a3 = U[l, p], U[l + 1, p], U[l + 2, p], U[l + 3, p]
                u0, u1, u2, u3 = U[l], U[l + 1], U[l + 2], U[l + 3]
                for j in range(m):
                    c[j] -= a0 * u0[j] + a1 * u1[j] + a2 * u2[j] + a3 * u3[j]
                l += 4
            for l2 in range(l, k):
                a = U[l2, p]
                for j in range(m):
                    c[j] -= a * U[l2, j]
            dp = max(c[p], tiny)
            val = w[p] - t
            LOSS[r, s] = 0.5 * (float(val) * float(val)) / float(dp)
            f = val / dp
            for j in range(m):
                w[j] -= c[j] * f
            OUT[r, pos[p]] = t
            ORDER[r, s] = pos[p]
            if mode == NM:
                cnt[pos[p] // nm_m] += 1
            rs = one / np.sqrt(dp)
            for j in range(m):
                u = c[j] * rs
                U[k, j] = u
                d[j] -= u * u
            # --- move the last working coordinate into slot p
            e_ = m - 1
            where[pos[p]] = -1
            if p != e_:
                for j in range(p):
                    B[p, j] = B[e_, j]
                for i in range(p + 1, e_):
                    B[i, p] = B[e_, i]
                B[p, p] = B[e_, e_]
                w[p], d[p], pos[p], sc[p], ze[p] = w[e_], d[e_], pos[e_], sc[e_], ze[e_]
                where[pos[p]] = p
                for l3 in range(k + 1):
                    U[l3, p] = U[l3, e_]
            m = e_
            k += 1
            if k == lazy or s == total - 1:
                _fold(B, U, d, m, k)
                k = 0
        for j in range(m):
            OUT[r, pos[j]] = w[j]
            where[pos[j]] = -1


def _choose(mode, m, w, d, pos, sc, ze, cnt, K, outliers, nm_n, nm_m, C, V, E):
    """The working index the scorer ``mode`` fixes next (ties: the lowest original column).

    Scores are first written to ``V`` (and grid errors to ``E``) in branch-free loops the
    compiler vectorizes; the argmin with its tie rule is a separate scalar pass."""
    zero_, maxq, slack, quarter = K[0], K[1], K[2], K[3]
    if mode == QUANT:
        n_out = 0
        for j in range(m):  # grid errors, scores and the count of off-grid weights in one pass
            e = _grid_error(w[j], sc[j], ze[j], zero_, maxq)
            E[j] = e
            V[j] = (e - slack * sc[j] * sc[j]) / d[j]  # rounded as QuantScorer: (c·Δ)·Δ
            n_out += e > quarter * sc[j] * sc[j]
        if outliers and n_out > 0:  # an off-grid weight first: the largest error
            p = -1
            best = np.inf
            bpos = C
            for j in range(m):
                if E[j] > quarter * sc[j] * sc[j]:
                    v = -E[j]
                    if v < best or (v == best and pos[j] < bpos):
                        best, p, bpos = v, j, pos[j]
            return p
    else:
        for j in range(m):
            V[j] = w[j] * w[j] / d[j]
        if mode == NM:
            for j in range(m):
                if cnt[pos[j] // nm_m] >= nm_m - nm_n:
                    V[j] = np.inf
    p = -1
    best = np.inf
    bpos = C
    for j in range(m):
        v = V[j]
        if v < best or (v == best and pos[j] < bpos):
            best, p, bpos = v, j, pos[j]
    if p < 0:  # every score is +inf or NaN: the lowest working column, as argmin
        for j in range(m):
            if pos[j] < bpos:
                p, bpos = j, pos[j]
    return p


def _grid_value(x, s, z, lo, maxq):
    """``s · (clamp(round(x / s) + z, lo, maxq) − z)`` (``grid.quantize_values``), rounded as the
    tensor code rounds it: compiled without contraction, so no fused multiply-add makes an
    on-grid weight's error non-zero."""
    return s * (min(max(np.rint(x / s) + z, lo), maxq) - z)


def _grid_error(x, s, z, lo, maxq):
    """``(q(x) − x)²``, compiled without contraction (see ``_grid_value``)."""
    e = s * (min(max(np.rint(x / s) + z, lo), maxq) - z) - x
    return e * e


def _fold(B, U, d, m, k):
    """``B[i, :i+1] −= Σ_{l<k} U[l, i] U[l, :i+1]`` for ``i < m`` and ``d = diag B``: the lazy
    downdates folded into the lower triangle, four terms per pass over a row of ``B``."""
    for i in range(m):
        Bi = B[i]
        l = 0
        while l + 4 <= k:
            a0, a1, a2, a3 = U[l, i], U[l + 1, i], U[l + 2, i], U[l + 3, i]
            u0, u1, u2, u3 = U[l], U[l + 1], U[l + 2], U[l + 3]
            for j in range(i + 1):
                Bi[j] -= a0 * u0[j] + a1 * u1[j] + a2 * u2[j] + a3 * u3[j]
            l += 4
        for l2 in range(l, k):
            a = U[l2, i]
            ul = U[l2]
            for j in range(i + 1):
                Bi[j] -= a * ul[j]
        d[i] = Bi[i]


_compiled = None
#: the fold may fuse multiply-adds (``contract``); the step code may not: it decides ties
#: (``q(w)`` on the grid's edge, ``err > ¼Δ²``) exactly as the tensor code's rounding does
FOLD_FLAGS = {"contract"}


def _get_kernel():
    """Compile (first use: ~3 s per dtype, then numba's on-disk cache) and return the kernel."""
    global _compiled
    if _compiled is None:
        exact = numba.njit(nogil=True, cache=True)
        inline = numba.njit(nogil=True, cache=True, inline="always")  # into the vector loops
        globals()["_grid_value"] = inline(_grid_value)
        globals()["_grid_error"] = inline(_grid_error)
        globals()["_fold"] = numba.njit(nogil=True, cache=True, fastmath=FOLD_FLAGS)(_fold)
        globals()["_choose"] = exact(_choose)
        _compiled = exact(_kernel)
    return _compiled


def fused_greedy(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    steps: int,
    mode: int,
    pos: torch.Tensor | None = None,
    lazy: int = 16,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    maxq: int = 0,
    outliers: bool = False,
    slack: float = 0.0,
    nm: tuple[int, int] = (0, 1),
    threads: int | None = None,
    progress: Callable[[float], None] | None = None,
    force: torch.Tensor | None = None,
    force_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the greedy engine on every row of ``W (R, C)`` with the fused kernel (CPU tensors).

    Hinv: ``(C, C)`` shared (``pos=None``) or ``(R, Cw, Cw)`` over the working coordinates
    ``pos (R, Cw)``; scale, zero: ``(R, C)`` grid per original column (mode QUANT).
    force, force_counts: a replay before the scorer — row r first fixes to 0 the original
    columns ``force[r, :force_counts[r]]`` in that order (exact OBS, so the state after them is
    the least-squares optimum with those weights removed; the order only changes the per-step
    losses), then takes ``steps − force_counts[r]`` steps with ``mode`` (``NONE``: stop).
    Returns ``(weight (R, C), order (R, steps) int64, step_loss (R, steps) float64)``; a row
    that stops early leaves zeros at the end of its order and losses.
    ``progress(done)`` is called in the calling thread as row chunks finish.
    """
    R, C = W.shape
    dt = W.dtype
    shared = Hinv.dim() == 2
    pos_t = torch.arange(C).expand(R, C) if pos is None else pos
    Wk = W if pos is None else W.gather(1, pos)
    Cw = pos_t.shape[1]
    steps = min(int(steps), Cw)
    total = torch.full((R,), steps, dtype=torch.long)
    if force is None:
        p1 = torch.zeros(R, dtype=torch.long)
        force = torch.zeros(R, 1, dtype=torch.long)
        mode1 = mode
    else:
        p1 = force_counts.to(torch.long).clamp(0, steps)
        mode1 = FORCED
        if mode == NONE:
            total = p1.clone()
    out = W.detach().clone().contiguous()
    order = torch.zeros(R, steps, dtype=torch.long)
    loss = torch.zeros(R, steps, dtype=torch.float64)
    if scale is None:
        sc = ze = torch.zeros(R, Cw, dtype=dt)
    else:
        sc = scale.to(dt).gather(1, pos_t).contiguous()
        ze = zero.to(dt).gather(1, pos_t).contiguous()
    consts = [0.0, maxq, slack, 0.25, torch.finfo(dt).tiny, 1.0]
    args_np = [
        np.ascontiguousarray(Wk.detach().numpy()),
        np.ascontiguousarray((Hinv.unsqueeze(0) if shared else Hinv).detach().numpy()),
        shared,
        np.ascontiguousarray(pos_t.numpy()),
        total.numpy(),
        p1.numpy(),
        np.ascontiguousarray(force.numpy()),
        max(1, int(lazy)),
        int(mode1),
        int(mode),
        sc.numpy(),
        ze.numpy(),
        np.array(consts, dtype=sc.numpy().dtype),
        bool(outliers),
        int(nm[0]),
        int(nm[1]),
        out.numpy(),
        order.numpy(),
        loss.numpy(),
    ]
    work = R * float(Cw) ** 3 / 3
    run_rows(_get_kernel(), args_np, R, work, threads, progress)
    return out, order, loss


def pool_threads(base: int) -> int:
    """Workers of a row pool: ``base`` (torch's thread count), plus one for each other task the
    kernel sees runnable right now (``/proc/loadavg``), at most ``base`` more — only when
    ``base`` is not below the cores this process may use (a lower count is the caller's limit).

    The scheduler shares the cores per runnable thread, so with K busy processes a pool of
    ``base`` workers gets ``base / (base + K)`` of the machine; the shared chunk queue lets
    extra workers take that share back without a barrier to wait at. On a quiet machine
    nothing is added. Measured (``benchmarks/bench_engine.py --busy 3``, 2 cores, 256×512 and
    768×768 trace / OBQ 4-bit): slowdown under 3 busy processes 1.5–2.3× with 2 workers, 1.3–1.9×
    with 4; with this rule 1.56–2.38× over the 20 cases of the full benchmark.
    """
    if base < _cores():  # the caller limited its threads below the machine: keep that limit
        return base
    try:
        with open(LOADAVG) as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):  # not Linux: the base count
        return base
    return base + min(base, max(0, running - 1))


def _cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_rows(
    kernel: Callable,
    args: list,
    rows: int,
    work: float,
    threads: int | None = None,
    progress: Callable[[float], None] | None = None,
) -> None:
    """``kernel(*args, lo, hi)`` over row chunks: in the calling thread when the ``work``
    (multiply-adds) is small, else on ``threads`` threads (default: ``pool_threads``) taking
    chunks from a shared queue (``CHUNKS_PER_THREAD`` per thread: a thread slowed by other
    processes takes fewer). ``progress(done)`` runs in the calling thread after each chunk."""
    T = max(1, int(threads)) if threads else pool_threads(torch.get_num_threads())
    if work < SERIAL_WORK * T:
        T = 1
    n = max(1, math.ceil(rows / (CHUNKS_PER_THREAD * T)))
    bounds = [(lo, min(rows, lo + n)) for lo in range(0, rows, n)]
    if T == 1:
        for i, (lo, hi) in enumerate(bounds):
            kernel(*args, lo, hi)
            if progress is not None:
                progress((i + 1) / len(bounds))
        return
    with ThreadPoolExecutor(max_workers=T) as pool:
        futures = [pool.submit(kernel, *args, lo, hi) for lo, hi in bounds]
        for i, fut in enumerate(futures):
            fut.result()
            if progress is not None:
                progress((i + 1) / len(futures))
