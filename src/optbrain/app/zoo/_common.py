"""Helpers shared by the zoo entries: threads, packaged files, lazy imports, data, registering."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .base import ZooEntry, register


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(1)``, restoring the count afterwards.

    The zoo's models are small: on a shared 2-core machine one thread is several times faster
    than two (measured 3-6× for MiniLM and SmolLM2 forwards), and results do not depend on the
    core count.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def need(module: str, entry: str, install: str) -> ModuleType:
    """``import module``, or an ImportError saying which zoo entry needs it and how to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the zoo model {entry!r} needs {module!r}: {install}") from e


def package_dir(module: str, entry: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (no heavy imports)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ImportError(f"the zoo model {entry!r} needs the package {module!r}: {install}")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin is None:  # pragma: no cover - namespace oddities
        raise ImportError(f"cannot locate the files of {module!r} (needed by {entry!r})")
    return Path(spec.origin).parent


def sample(X: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct rows of ``X`` in a random order (the first ``n`` of a seeded permutation)."""
    return X[torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:n]]


def batched(X: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``X`` cut into consecutive batches of ``batch_size`` rows (the last may be smaller)."""
    return [X[i : i + batch_size] for i in range(0, len(X), batch_size)]


def head(limit: int | None, minimum: int = 1) -> int | None:
    """The slice end for the evaluation items of ``evaluate(limit=...)``: None (all of them)
    without a limit, else ``limit`` but at least ``minimum``; ``items[: head(limit)]``."""
    return None if limit is None else max(minimum, int(limit))


def register_module(
    module: str,
    description: str,
    primary: str,
    recipe: dict[str, Any],
    notes: str = "",
    **fields: Any,
) -> ZooEntry:
    """Register the zoo entry of the module named ``module`` (pass ``__name__``), which defines
    ``NAME``, ``load()``, ``calibration(n, seed)`` and ``evaluate(model, dense, limit)``;
    ``fields``: the other ``ZooEntry`` fields (``requires``, ``lower_is_better``, ...)."""
    m = sys.modules[module]
    return register(
        ZooEntry(
            m.NAME,
            description,
            m.load,
            m.calibration,
            m.evaluate,
            primary,
            recipe=recipe,
            notes=notes,
            **fields,
        )
    )
