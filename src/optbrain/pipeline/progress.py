"""Progress of calibration and compression on stderr, drawn by ``tqdm``; silent when disabled."""

from __future__ import annotations

import sys
import time
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
        self, total: int | None, label: str, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total = total
        self.label = label
        self.enabled = enabled
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
            unit="layer",
        )

    def update(self, what: str = "", step: int = 1) -> None:
        self.done += step
        if not self.enabled:
            return
        if self._tty:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(step)
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
