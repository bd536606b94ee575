"""Progress of calibration and compression on stderr, drawn by ``tqdm``; silent when disabled.

``Progress`` is one bar (per layer in ``compress``); ``Progress.within(what, predicted)`` shows
how far one long step is from the ticks of the core engines (``optbrain.core.ticks``), with the
time left extrapolated from the fraction done. ``reporting(level)`` sets, for the code
run inside it, how chatty the phases below a run are (``phase``: the calibration forwards,
evaluation): ``"quiet"`` nothing, ``"normal"`` a bar on a terminal and nothing elsewhere (logs
keep one line per layer), ``"verbose"`` also a plain line per update elsewhere.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TextIO

from tqdm import tqdm

from ..core import ticks

# one line per update where stderr is not a terminal (logs, CI): tqdm's meter, no bar
_LINE = "[{desc}] {n_fmt}/{total_fmt} {what}  elapsed {elapsed}  ETA {remaining}"
_LINE_OPEN = "[{desc}] {n_fmt} {what}  elapsed {elapsed}"  # total unknown
#: seconds a step runs before ``Progress.within`` shows anything
WITHIN_AFTER = 10.0


class Progress:
    """A ``tqdm`` bar ``label: 40%|████      | 2/5 [00:03<00:04, what]`` redrawn in place on a
    terminal; elsewhere (logs, CI) one plain line per update,
    ``[label] i/N what  elapsed mm:ss  ETA mm:ss``. Nothing at all when not ``enabled``.
    """

    def __init__(
        self,
        total: int | None,
        label: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        unit: str = "layer",
        lines: bool = True,
    ) -> None:
        self.total = total
        self.label = label
        self.enabled = enabled
        self.lines = lines  # plain lines where the stream is not a terminal
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = tqdm(
            total=total,
            desc=label,
            file=self.stream,
            disable=not (enabled and self._tty),
            dynamic_ncols=True,
            mininterval=0.0,
            unit=unit,
        )

    def update(self, what: str = "", step: int = 1) -> None:
        self.done += step
        if not self.enabled:
            return
        if self._tty:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(step)
            return
        if not self.lines:
            return
        line = tqdm.format_meter(
            self.done,
            self.total,
            time.perf_counter() - self.start,
            prefix=self.label,
            bar_format=_LINE if self.total else _LINE_OPEN,
            what=what,
        )
        self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """One line above the bar (or in the log), when enabled."""
        if self.enabled:
            self._bar.write(f"[{self.label}] {text}", file=self.stream)

    def close(self) -> None:
        self._bar.close()

    @contextlib.contextmanager
    def within(
        self, what: str, predicted: float | None = None, after: float | None = None
    ) -> Iterator[None]:
        """Progress inside one step (a layer's solve) from the engines' ticks: on a terminal a
        second bar, elsewhere a line ``[label] what: 40% of the step, elapsed 12 s, about 18 s
        left`` at most every ``after`` seconds — both only once the step has run ``after``
        seconds (default ``WITHIN_AFTER``), so short steps print nothing. ``predicted``: the cost
        model's seconds, shown beside the extrapolation."""
        after = WITHIN_AFTER if after is None else after
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        state: dict = {"bar": None, "last": t0}
        note = f" (predicted ~{seconds_text(predicted)})" if predicted else ""

        def listener(done: float) -> None:
            now = time.perf_counter()
            el = now - t0
            if el < after:
                return
            left = el * (1.0 - done) / done if done > 0 else None
            if self._tty:
                bar = state["bar"]
                if bar is None:
                    bar = state["bar"] = tqdm(
                        total=1000,
                        desc=f"  {what}",
                        file=self.stream,
                        leave=False,
                        position=1,
                        dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}",
                    )
                bar.n = int(1000 * done)
                bar.set_postfix_str(f"elapsed {seconds_text(el)}{note}", refresh=True)
                return
            if not self.lines or done >= 1.0 or now - state["last"] < after:
                return  # the step's own line follows its end
            state["last"] = now
            rest = f", about {seconds_text(left)} left" if left is not None else ""
            self.stream.write(
                f"[{self.label}] {what}: {done:.0%} of the step, elapsed "
                f"{seconds_text(el)}{rest}{note}\n"
            )
            self.stream.flush()

        try:
            with ticks.listen(listener):
                yield
        finally:
            if state["bar"] is not None:
                state["bar"].close()


def seconds_text(secs: float | None) -> str:
    """``42 s``, ``3.5 min``, ``1.2 h``."""
    if secs is None:
        return "?"
    if secs < 90:
        return f"{secs:.0f} s"
    if secs < 5400:
        return f"{secs / 60:.1f} min"
    return f"{secs / 3600:.1f} h"


LEVELS = ("quiet", "normal", "verbose")
_LEVEL: ContextVar[str | None] = ContextVar("optbrain_progress_level", default=None)


def level() -> str | None:
    """The ``reporting`` level in force, or None outside any."""
    return _LEVEL.get()


@contextlib.contextmanager
def reporting(lvl: str) -> Iterator[None]:
    """Run the body with progress level ``lvl`` (one of ``LEVELS``)."""
    if lvl not in LEVELS:
        raise ValueError(f"progress level must be one of {LEVELS}, got {lvl!r}")
    token = _LEVEL.set(lvl)
    try:
        yield
    finally:
        _LEVEL.reset(token)


def phase(total: int | None, label: str, unit: str = "batch") -> Progress:
    """A bar for a phase inside a run (forwards, evaluation), as chatty as ``level()``
    says (outside any ``reporting``: silent)."""
    lvl = level() or "quiet"
    return Progress(total, label, enabled=lvl != "quiet", unit=unit, lines=lvl == "verbose")
