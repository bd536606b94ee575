"""``fashion-cnn``: a small ResNet-style CNN trained in-process on Fashion-MNIST.

Data: Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which puts
the four original IDX files in ``/usr/share/datasets/fashion-mnist``; ``$OPTBRAIN_FASHION_MNIST``
may name another folder holding the same four ``*-idx?-ubyte.gz`` files. Images are scaled to
[0, 1] and standardised with the training set's mean and std (``MEAN``, ``STD``), so the model
takes ``(n, 1, 28, 28)`` float tensors.

Model: stem conv (16) + three residual blocks (16, 32 stride 2, 64 stride 2; 1×1 projection
shortcuts where the shape changes) + global average pooling + linear, with batch norms
(≈78k parameters). Trained once, deterministically (2 epochs, AdamW + one-cycle, batch 128, one
thread: about 1.5 minutes on a 2-core machine) and cached with a checksum (``cached_model``).
Test top-1 ≈ 90.3%.

Calibration samples come from the 60,000 training images; the metric is top-1 on the 10,000
test images.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._common import batched, head, one_thread, register_module, sample
from .training import accuracy, cached_model, train_classifier

NAME = "fashion-cnn"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
#: mean and std of the training pixels after scaling to [0, 1]
MEAN, STD = 0.2860, 0.3530
EPOCHS = 2
WIDTH = 16


def data_dir() -> Path:
    """The folder with the IDX files; an ImportError says how to install them if absent."""
    d = Path(os.environ.get("OPTBRAIN_FASHION_MNIST", DATA_DIR))
    missing = [f for f in FILES.values() if not (d / f).is_file()]
    if missing:
        raise ImportError(
            f"the zoo model {NAME!r} needs the Fashion-MNIST files ({', '.join(missing)} not "
            f"found in {d}): apt-get install dataset-fashion-mnist (Debian/Ubuntu), or set "
            "OPTBRAIN_FASHION_MNIST to a folder holding the four original .gz files"
        )
    return d


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic (2 zero bytes, dtype 0x08, ndim), dims, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {arr.size} values for shape {dims}")
    return arr.reshape(dims)


@lru_cache(maxsize=1)
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, y_train, X_test, y_test)``; X is ``(n, 1, 28, 28)``, standardised."""
    d = data_dir()

    def images(key: str) -> torch.Tensor:
        x = torch.from_numpy(_read_idx(d / FILES[key]).copy()).float().div_(255.0)
        return x.sub_(MEAN).div_(STD).unsqueeze(1)

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(d / FILES[key]).astype(np.int64))

    return images("train_x"), labels("train_y"), images("test_x"), labels("test_y")


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, 3×3 convs."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class FashionResNet(nn.Module):
    def __init__(self, width: int = WIDTH, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build() -> nn.Module:
    """The untrained network, initialised from seed 0 (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FashionResNet()


def _train(model: nn.Module) -> nn.Module:
    X, y, _, _ = data()
    return train_classifier(model, X, y, epochs=EPOCHS, lr=5e-3, batch_size=128, seed=0)


def load() -> nn.Module:
    data_dir()  # fail early, with the install hint, before building anything
    return cached_model(f"{NAME}-w{WIDTH}-e{EPOCHS}-v1", build, _train)


def calibration(n: int = 256, seed: int = 0, batch_size: int = 64) -> list[torch.Tensor]:
    """``n`` training images (never test images) in batches of ``batch_size``."""
    X, _, _, _ = data()
    return batched(sample(X, n, seed), batch_size)


@torch.no_grad()
def evaluate(
    model: nn.Module, dense: nn.Module | None = None, limit: int | None = None
) -> dict[str, float]:
    """``accuracy``: top-1 (%) on the 10,000 test images (the first ``limit`` with ``limit``);
    with ``dense``, ``agreement``: % of test images where the top-1 class equals dense's."""
    _, _, X, y = data()
    k = head(limit)
    X, y = X[:k], y[:k]
    with one_thread():
        out = {"accuracy": accuracy(model, X, y)}
        if dense is not None:
            dense.eval()
            same = 0
            for i in range(0, len(X), 1000):
                xb = X[i : i + 1000]
                same += int((model(xb).argmax(1) == dense(xb).argmax(1)).sum())
            out["agreement"] = 100.0 * same / len(X)
    return out


NOTES = (
    "trained here in ~1.5 min (2 epochs), test top-1 ≈ 90%; the stem conv has only 9 "
    "input columns, so N:M patterns skip it"
)
DESCRIPTION = "small ResNet-style CNN (3 residual blocks, batch norm) on Fashion-MNIST"
RECIPE = {"method": "obc", "sparsity": 0.5, "bits": 4}
ENTRY = register_module(__name__, DESCRIPTION, "accuracy", RECIPE, NOTES)
