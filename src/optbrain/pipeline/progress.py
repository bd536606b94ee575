"""A dependency-free progress line for calibration and compression (stderr, one line)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``[label] i/N name  elapsed mm:ss  ETA mm:ss`` rewritten in place; silent when disabled.

    On a terminal the line is redrawn with ``\\r``; elsewhere (logs, CI) one line per update.
    """

    def __init__(
        self, total: int | None, label: str, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, what: str = "", step: int = 1) -> None:
        self.done += step
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if self.total:
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            count = f"{self.done}/{self.total}"
            tail = f"elapsed {_clock(elapsed)}  ETA {_clock(eta)}"
        else:
            count = f"{self.done}"
            tail = f"elapsed {_clock(elapsed)}"
        line = f"[{self.label}] {count} {what}  {tail}"
        if self._tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty and self.done:
            self.stream.write("\n")
            self.stream.flush()
