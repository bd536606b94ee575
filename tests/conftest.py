"""Shared test setup: makes the naive reference solvers in ``tests/obs_reference.py`` importable."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
