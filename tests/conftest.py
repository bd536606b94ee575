"""Shared test setup: makes the naive reference solvers in ``tests/obs_reference.py`` importable;
the ``one_thread`` fixture."""

import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def one_thread():
    """One torch thread for the test, the count restored after: on tiny problems OpenMP
    threads only add contention (up to 100x slower on a loaded 2-core machine), and the
    numbers do not depend on the core count. Folders and modules ask for it (autouse or
    ``usefixtures``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
