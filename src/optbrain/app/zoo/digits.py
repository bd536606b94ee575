"""``digits-mlp`` / ``digits-cnn``: scikit-learn's handwritten digits (8×8), trained in-process.

OBD's own setting (handwritten digits). The 1,797 images are split once with a fixed seed:
1,297 for training (calibration samples come from these), 500 for the test accuracy.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from ._common import batched, head, sample
from .base import ZooEntry, register
from .training import accuracy, cached_model, train_classifier

TEST = 500


@lru_cache(maxsize=1)
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, y_train, X_test, y_test)``; X is ``(n, 1, 8, 8)`` scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise ImportError("the digits models need scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return X[TEST:], y[TEST:], X[:TEST], y[:TEST]


def build_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=4),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def build_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def _train(epochs: int):
    def train(model: nn.Module) -> nn.Module:
        X, y, _, _ = data()
        return train_classifier(model, X, y, epochs=epochs, lr=3e-3, seed=0)

    return train


def load_cnn() -> nn.Module:
    return cached_model("digits-cnn-v2", build_cnn, _train(15))


def load_mlp() -> nn.Module:
    return cached_model("digits-mlp-v2", build_mlp, _train(30))


def calibration(n: int = 256, seed: int = 0, batch_size: int = 64) -> list[torch.Tensor]:
    """``n`` training images (disjoint from the test split) in batches."""
    X, _, _, _ = data()
    return batched(sample(X, n, seed), batch_size)


def evaluate(
    model: nn.Module, dense: nn.Module | None = None, limit: int | None = None
) -> dict[str, float]:
    """Test accuracy (%) on the 500 held-out digits; with ``dense``, top-1 agreement (%)."""
    _, _, X, y = data()
    k = head(limit)
    X, y = X[:k], y[:k]
    out = {"accuracy": accuracy(model, X, y)}
    if dense is not None:
        with torch.no_grad():
            out["agreement"] = 100.0 * float(
                (model(X).argmax(1) == dense(X).argmax(1)).float().mean()
            )
    return out


for _name, _load, _desc in (
    ("digits-cnn", load_cnn, "small CNN (incl. a grouped conv) on scikit-learn digits"),
    ("digits-mlp", load_mlp, "3-layer MLP on scikit-learn digits"),
):
    register(
        ZooEntry(
            name=_name,
            description=_desc,
            load=_load,
            calibration=calibration,
            evaluate=evaluate,
            primary="accuracy",
            recipe={"method": "obc", "pattern": "2:4", "bits": 4},
            requires=("sklearn",),
        )
    )
