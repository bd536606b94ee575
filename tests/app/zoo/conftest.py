"""Zoo tests: one torch thread (several times faster for these small models on a shared 2-core
machine, and the numbers do not depend on the core count); no hub access."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (``tests/conftest.py``)."""


def _changes(dense: torch.nn.Module, model: torch.nn.Module, targets: list[str]):
    d = dict(dense.named_parameters())
    changed, others = [], []
    for name, p in model.named_parameters():
        if torch.equal(p, d[name]):
            continue
        layer = name.rsplit(".", 1)[0]
        if layer in targets and name.endswith("weight"):
            changed.append(layer)
        else:
            others.append(name)
    return sorted(changed), others


@pytest.fixture
def changes():
    """``changes(dense, model, targets)`` -> (sorted target layers whose weight changed,
    names of any other parameters that changed)."""
    return _changes
