"""Where the per-layer units of work run: in this process (``LocalExecutor``, the default) or as
Ray tasks on a local or remote cluster (``RayExecutor``, ``pip install optbrain[ray]``).

A unit is one call ``fn(*args)`` of a module-level function whose inputs are tensors and plain
values and whose result is the same (a layer's ``W``, ``H`` and setting in, its compressed
weight and numbers out; ``pipeline.compress.solve_layer``, ``budget.database``'s level
solver). Every unit is independent of the others, so ``Executor.map`` yields ``(index,
result)`` in the order the units finish and the caller (the driver) applies each result as it
arrives: progress, records and database writes stay in the driver, exactly as with the local
executor.

Ray specifics: tensors travel through Ray's object store; each task runs
``torch.set_num_threads(threads)`` first, so a unit computes what the local executor computes
with the same thread count, bit for bit (BLAS reductions depend on the thread count, not on
the process). A task whose worker dies (killed, out of memory) is re-run by Ray, up to
``max_retries`` times. ``address`` None: ``RAY_ADDRESS`` from the environment, else a local Ray
started for the run with ``workers`` CPUs (stopped by ``close``); an already initialised Ray
(e.g. started by the caller) is used as it is.

``make_executor`` is the one validator of the option (``"local"``, ``"ray"`` or an
``Executor``): an unknown name or Ray not installed is an error before any work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "ray")
Around = Callable[[int], AbstractContextManager]
RAY_EXTRA = "pip install optbrain[ray]"
#: a Ray cluster address: ``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``
_ADDRESS = re.compile(r"(ray://)?[\w.\-\[\]:]+:\d+|auto|local")

__all__ = [
    "EXECUTORS",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "check_executor_mode",
    "make_executor",
    "using_executor",
]


class Executor:
    """Runs independent units ``fn(*args)``; ``map`` yields ``(index, result)`` as they finish."""

    name = "base"

    @property
    def local(self) -> bool:
        """Do the units run in this process?"""
        return False

    def map(
        self, fn: Callable[..., Any], jobs: Sequence[tuple], around: Around | None = None
    ) -> Iterator[tuple[int, Any]]:
        """``(i, fn(*jobs[i]))`` for every unit, as they finish. ``around(i)``: a context
        entered around unit ``i`` where it runs in this process (progress inside a solve);
        executors running units elsewhere do without."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started (nothing for the local one)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Today's behaviour: the units one after the other, in order, in this process."""

    name = "local"

    @property
    def local(self) -> bool:
        return True

    def map(
        self, fn: Callable[..., Any], jobs: Sequence[tuple], around: Around | None = None
    ) -> Iterator[tuple[int, Any]]:
        for i, args in enumerate(jobs):
            with around(i) if around is not None else nullcontext():
                out = fn(*args)
            yield i, out


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(f"executor 'ray' needs Ray: {RAY_EXTRA}") from None
    return ray


def _run_task(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    """The body of every Ray task: fix the thread count, then run the unit."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


class RayExecutor(Executor):
    """Units as Ray tasks (one CPU per thread); see the module docstring.

    address: ``HOST:PORT`` / ``ray://HOST:PORT`` / ``auto`` (None: ``RAY_ADDRESS``, else a local
      Ray for the run). workers: CPUs of that local Ray (default: all cores); not with an
      address. threads: torch threads per task (default 1). max_retries: re-runs of a task
      whose worker died.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        *,
        threads: int = 1,
        max_retries: int = 3,
        object_store_memory: int | None = None,
    ) -> None:
        self.ray = _import_ray()
        if address is not None and not _ADDRESS.fullmatch(address):
            raise ValueError(
                f"Ray address must be HOST:PORT, ray://HOST:PORT or auto, got {address!r}"
            )
        for key, v in (("workers", workers), ("threads", threads), ("max_retries", max_retries)):
            low = 0 if key == "max_retries" else 1
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ValueError(f"Ray {key} must be an integer >= {low}, got {v!r}")
        if address is not None and workers is not None:
            raise ValueError(
                "Ray workers sets the size of a local Ray started for the run; with an address "
                "the cluster's own workers are used: pass one or the other"
            )
        self.address = address
        self.workers = workers
        self.threads = threads
        self.max_retries = max_retries
        self.object_store_memory = object_store_memory
        self._owned = False

    def start(self) -> RayExecutor:
        """Connect to (or start) Ray now; ``map`` does it on first use."""
        ray = self.ray
        if ray.is_initialized():
            return self
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address is not None and self.workers is None:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:  # a local Ray whose workers import this very optbrain (not another install)
            src = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
            env = {"PYTHONPATH": path, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "")}
            ray.init(
                num_cpus=self.workers or os.cpu_count() or 1,
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
                object_store_memory=self.object_store_memory,
                runtime_env={"env_vars": {k: v for k, v in env.items() if v}},
                # Ray runs its workers at nice 15 by default: on a busy machine they would get
                # a fraction of the CPU the local executor gets; same priority as the driver
                _system_config={"worker_niceness": 0},
            )
        self._owned = True
        return self

    def map(
        self, fn: Callable[..., Any], jobs: Sequence[tuple], around: Around | None = None
    ) -> Iterator[tuple[int, Any]]:
        ray = self.ray
        self.start()
        task = ray.remote(_run_task).options(
            num_cpus=self.threads, max_retries=self.max_retries, retry_exceptions=False
        )
        refs = [task.remote(fn, self.threads, *args) for args in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield index[ref], ray.get(ref)
        finally:
            for ref in pending:  # the driver stopped (an error): no work left behind
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()
        self._owned = False


def make_executor(
    executor: str | Executor | None = None,
    *,
    address: str | None = None,
    workers: int | None = None,
    threads: int = 1,
) -> Executor:
    """The executor for ``executor`` (None or ``"local"``: ``LocalExecutor``; ``"ray"``:
    ``RayExecutor(address, workers, threads=threads)``; an ``Executor``: itself). Raises
    ``ValueError`` for an unknown name or Ray options without Ray, ``ImportError`` (naming
    ``pip install optbrain[ray]``) when Ray is asked for and not installed."""
    if isinstance(executor, Executor):
        return executor
    name = "local" if executor is None else executor
    if name not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS} or an Executor, got {executor!r}")
    if name == "local":
        if address is not None or workers is not None:
            raise ValueError("a Ray address / Ray workers need executor 'ray'")
        return LocalExecutor()
    return RayExecutor(address, workers, threads=threads)


@contextmanager
def using_executor(executor: str | Executor | None = None, **options: Any) -> Iterator[Executor]:
    """``make_executor(executor, **options)`` for a ``with`` block; an executor made here from
    a name is closed at the end (one passed in belongs to the caller)."""
    ex = make_executor(executor, **options)
    try:
        yield ex
    finally:
        if ex is not executor:
            ex.close()


def check_executor_mode(executor: str | Executor | None, mode: str) -> None:
    """Validate ``executor`` (``make_executor``'s checks, nothing started) and refuse a
    distributed one in sequential mode, before any work."""
    local = executor in (None, "local") or (isinstance(executor, Executor) and executor.local)
    if not local and not isinstance(executor, Executor):
        make_executor(executor).close()  # unknown name, Ray not installed: the error, now
    if not local and mode == "sequential":
        raise ValueError(
            "executor 'ray' runs the independent per-layer solves; sequential calibration "
            "solves each layer on inputs from the layers compressed before it: use "
            "calibration mode 'independent' with Ray, or the local executor"
        )
