"""Helpers shared by the zoo entries: one-thread sections, finding packaged files, lazy imports."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch


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


def offline() -> None:
    """Forbid Hugging Face hub downloads in this process (everything comes from packages)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


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


def gensim_test_data(entry: str) -> Path:
    """gensim's ``test/test_data`` folder (texts and human similarity ratings)."""
    d = package_dir("gensim", entry, "pip install gensim (or pip install 'optbrain[zoo]')")
    d = d / "test" / "test_data"
    if not d.is_dir():
        raise ImportError(f"gensim is installed without its test data ({d}); {entry!r} needs it")
    return d
