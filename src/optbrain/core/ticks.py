"""Progress ticks from inside long solves: the one hook by which core engines say how far they are.

An engine calls ``tick(f)`` with the fraction ``f ∈ [0, 1]`` of its current part done, at cheap
points (the greedy engines: at every fold, i.e. every ``lazy`` steps), and wraps sub-parts in
``part(lo, hi)`` so nested work composes: row chunk ``i`` of ``n`` runs inside
``part(i / n, (i + 1) / n)``, and its ticks map into that interval of the caller's part.

A caller that wants progress installs a listener for the code it runs::

    with listen(lambda done: print(f"{done:.0%}")):
        compress_layer(W, H, sparsity=0.5, method="obc")

Without a listener ``tick`` is one context-variable read. Ticks never change a result; they are
monotone within a part (the listener sees the fraction of the whole call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Listener = Callable[[float], None]
# (listener, lo, hi): the interval of the listener's [0, 1] that the current part maps to
_STATE: ContextVar[tuple[Listener, float, float] | None] = ContextVar(
    "optbrain_ticks", default=None
)


@contextlib.contextmanager
def listen(fn: Listener) -> Iterator[None]:
    """Call ``fn(done)`` (``done ∈ [0, 1]`` of the whole body) on every tick in the body."""
    token = _STATE.set((fn, 0.0, 1.0))
    try:
        yield
    finally:
        _STATE.reset(token)


@contextlib.contextmanager
def part(lo: float, hi: float) -> Iterator[None]:
    """Run the body as the sub-interval ``[lo, hi]`` of the current part (``0 ≤ lo ≤ hi ≤ 1``);
    ticks inside it are rescaled; its end is ticked."""
    st = _STATE.get()
    if st is None:
        yield
        return
    fn, a, b = st
    token = _STATE.set((fn, a + (b - a) * lo, a + (b - a) * hi))
    try:
        yield
        tick(1.0)
    finally:
        _STATE.reset(token)


def tick(done: float) -> None:
    """Report that ``done`` (clamped to ``[0, 1]``) of the current part is finished."""
    st = _STATE.get()
    if st is None:
        return
    fn, a, b = st
    fn(a + (b - a) * min(1.0, max(0.0, float(done))))


def cubic_done(step: int, steps: int, cols: int) -> float:
    """Fraction of a greedy trace's work done after ``step`` of ``steps`` steps on ``cols``
    working coordinates: step ``k`` costs ``∝ (cols − k)²`` (the engines shrink their working
    set), so ``done = (C³ − (C − s)³) / (C³ − (C − S)³)``."""
    C = float(cols)
    total = C**3 - (C - steps) ** 3
    return 1.0 if total <= 0 else (C**3 - (C - step) ** 3) / total


def chunks(items: list) -> Iterator[tuple[int, object]]:
    """``enumerate(items)``, each item's body run as its equal share ``part(i/n, (i+1)/n)``."""
    n = len(items)
    for i, item in enumerate(items):
        with part(i / n, (i + 1) / n):
            yield i, item
