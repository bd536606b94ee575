"""Budget tests: a tiny conv/linear model (a grouped conv included), its calibration data and a
small level grid; single-threaded (OpenMP threads only add contention on tiny problems)."""

import pytest
import torch
from torch import nn

LEVELS = ["s0.25", "s0.5", "s0.75", "2:4", "b8", "b4", "s0.5+b4", "2:4+b8"]


class Tiny(nn.Module):
    """conv 3→8 (3×3, pad 1) on 6×6 → grouped conv 8→8 (groups 2, stride 2) → 3×3 →
    Linear 72→16 → Linear 16→4. Weight columns: 27, 36 (per group), 72, 16."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(72, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.out(torch.relu(self.fc(x.flatten(1))))


def make_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny().eval()


def make_calibration(seed: int = 1, n: int = 96, batch: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g)
    return [x[i : i + batch] for i in range(0, n, batch)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (``tests/conftest.py``)."""


@pytest.fixture(scope="session")
def tiny_db(tmp_path_factory):
    """A database of the tiny model (exact solver, model-level errors), built once; tests must
    not change its model (use copies)."""
    from optbrain.budget import DbSettings, build_database

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_tiny()
        calib = make_calibration()
        root = tmp_path_factory.mktemp("db")
        db = build_database(
            model,
            calib,
            root,
            LEVELS,
            settings=DbSettings(solver="obc", model_level=True),
            seed=1,
        )
    finally:
        torch.set_num_threads(n)
    return model, calib, db


@pytest.fixture
def tiny():
    """``(make_tiny, make_calibration)``: fresh copies for tests that change the model."""
    return make_tiny, make_calibration
