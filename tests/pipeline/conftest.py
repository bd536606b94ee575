"""Calibration tests: tiny models, run single-threaded (OpenMP threads only add contention)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (``tests/conftest.py``)."""
