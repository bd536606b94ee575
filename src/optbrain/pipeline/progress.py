"""Progress of calibration and compression on stderr, drawn by ``tqdm``; silent when disabled.

``Progress`` is one bar (per layer in ``compress``). ``reporting(level)`` sets, for the code
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

# one line per update where stderr is not a terminal (logs, CI): tqdm's meter, no bar
_LINE = "[{desc}] {n_fmt}/{total_fmt} {what}  elapsed {elapsed}  ETA {remaining}"
_LINE_OPEN = "[{desc}] {n_fmt} {what}  elapsed {elapsed}"  # total unknown


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

    def close(self) -> None:
        self._bar.close()


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
