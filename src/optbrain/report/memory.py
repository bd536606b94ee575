"""Peak memory of a block (``peak_memory_tracker``), for ``LayerRecord.peak_memory_mb``.

CUDA devices use PyTorch's allocator counters (``torch.cuda.max_memory_allocated``); the CPU
uses the process's resident set size, sampled by a background thread through ``psutil`` while
the block runs, and its lifetime peak from ``resource.getrusage`` (``ru_maxrss``). No ``/proc``
writes, no global lock.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["PeakMemory", "peak_memory_tracker"]

_MB = 1024.0 * 1024.0
#: period of the CPU RSS sampler
SAMPLE_SECONDS = 0.002


@dataclass
class PeakMemory:
    """Filled in when a ``peak_memory_tracker`` block exits.

    mb: extra memory the block needed at its peak, ``peak_mb − start_mb`` (≥ 0) — the value for
    ``LayerRecord.peak_memory_mb``. peak_mb: the peak itself (absolute). start_mb: usage when the
    block began. method: how it was measured:

    - ``"cuda"``: PyTorch caching-allocator bytes on that device (``torch.cuda.memory_allocated``
      / ``max_memory_allocated``, whose peak is reset at entry). Exact for tensors; misses
      cuBLAS / cuDNN workspaces, other libraries and memory reserved but not allocated by the
      cache.
    - ``"sampled"`` (CPU): resident set size of the whole process. ``start_mb`` is the RSS at
      entry; ``peak_mb`` the highest RSS a sampling thread saw (every ``SAMPLE_SECONDS``) and, when
      the block raised the process's lifetime peak (``getrusage``), that peak, exactly. A spike
      shorter than the sampling period can be missed (a lower bound then). Counts every thread of
      the process and freed memory the allocator keeps; pages of a tensor count once touched
      (``torch.empty`` without writes may not count).
    - ``"none"``: no way to measure (no ``resource`` module, e.g. Windows; ``mb`` stays None).
    """

    device: str
    method: str
    start_mb: float = 0.0
    peak_mb: float | None = None
    mb: float | None = None


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / _MB


def _ru_maxrss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    v = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return v / _MB if sys.platform == "darwin" else v / 1024.0  # bytes on macOS, KiB elsewhere


# per CUDA device, the open trackers' highest peak seen: an inner tracker's reset of the
# device's peak counter must not lose the outer one's (appends / removes are atomic in CPython)
_OPEN_CUDA: dict[str, list[list[float]]] = {}


@contextmanager
def _cuda(device: str) -> Iterator[PeakMemory]:
    import torch

    d = torch.device(device)
    if d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    key = str(d)
    torch.cuda.synchronize(d)
    rec = PeakMemory(key, "cuda", start_mb=torch.cuda.memory_allocated(d) / _MB)
    before = torch.cuda.max_memory_allocated(d) / _MB
    open_ = _OPEN_CUDA.setdefault(key, [])
    for seen in open_:
        seen[0] = max(seen[0], before)
    torch.cuda.reset_peak_memory_stats(d)
    mine = [rec.start_mb]
    open_.append(mine)
    try:
        yield rec
    finally:
        torch.cuda.synchronize(d)
        open_.remove(mine)
        rec.peak_mb = max(mine[0], torch.cuda.max_memory_allocated(d) / _MB)
        rec.mb = max(0.0, rec.peak_mb - rec.start_mb)


class _Sampler(threading.Thread):
    """Samples the process RSS until stopped; ``peak`` is the highest value seen (MB)."""

    def __init__(self, start_mb: float) -> None:
        super().__init__(name="optbrain-rss-sampler", daemon=True)
        import psutil

        self._proc = psutil.Process()
        self._stop_event = threading.Event()
        self.peak = start_mb

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, self._proc.memory_info().rss / _MB)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss_mb())


@contextmanager
def _cpu() -> Iterator[PeakMemory]:
    lifetime = _ru_maxrss_mb()
    rec = PeakMemory("cpu", "sampled", start_mb=_rss_mb())
    sampler = _Sampler(rec.start_mb)
    sampler.start()
    try:
        yield rec
    finally:
        peak = sampler.stop()
        now = _ru_maxrss_mb()
        if lifetime is not None and now is not None and now > lifetime:
            peak = max(peak, now)  # the block set a new lifetime peak: that is its peak, exactly
        rec.peak_mb = peak
        rec.mb = max(0.0, rec.peak_mb - rec.start_mb)


def peak_memory_tracker(device: Any = None) -> AbstractContextManager[PeakMemory]:
    """Measure the peak memory of a block, in MB (MiB)::

        with peak_memory_tracker(W.device) as mem:
            result = compress(...)
        record.peak_memory_mb = mem.mb

    device: a CUDA device (``torch.device`` or ``"cuda:0"``) measures that GPU's PyTorch
    allocations; None / ``"cpu"`` measures the process RSS. See ``PeakMemory`` for what each
    method counts. Trackers nest; trackers on different threads of one process see each
    other's memory (the counters are per process).
    """
    dev = "cpu" if device is None else str(device)
    return _cuda(dev) if dev.startswith("cuda") else _cpu()
