"""Small, deterministic training loops for the zoo's own models, with a checksummed cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..._files import atomic_write, safetensors_bytes, sha256_file
from .base import cache_dir


def train_classifier(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 1e-4,
) -> nn.Module:
    """AdamW + one-cycle schedule on ``(X, y)``; deterministic for a seed (one thread: small
    models train faster that way and the result does not depend on the core count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, X, y, epochs, lr, batch_size, seed, weight_decay)
    finally:
        torch.set_num_threads(threads)


def _train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float,
) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(X) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def cached_model(
    key: str, build: Callable[[], nn.Module], train: Callable[[nn.Module], nn.Module]
) -> nn.Module:
    """``build()`` with weights from the cache (``key``), training and caching them if absent.

    The cache file's SHA-256 is stored beside it; a file that does not match is retrained.
    """
    d = cache_dir()
    path: Path = d / f"{key}.safetensors"
    meta: Path = d / f"{key}.json"
    with torch.random.fork_rng():  # the initial weights depend on the key's seed only
        torch.manual_seed(0)
        model = build()
    if path.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            if info.get("sha256") == sha256_file(path):
                model.load_state_dict(load_file(str(path)))
                return model.eval()
        except (ValueError, OSError, RuntimeError, KeyError):
            pass
    model = train(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    digest = atomic_write(path, safetensors_bytes(state))  # a kill: the hash mismatches, retrain
    atomic_write(meta, json.dumps({"sha256": digest}))
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(X), batch_size):
        correct += int((model(X[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / len(X)
