"""Helpers shared by the text entries (minilm, smollm2): offline hub, gensim data, windows."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._common import batched, package_dir, sample


def offline() -> None:
    """Forbid Hugging Face hub downloads in this process (everything comes from packages)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def gensim_test_data(entry: str) -> Path:
    """gensim's ``test/test_data`` folder (texts and human similarity ratings)."""
    d = package_dir("gensim", entry, "pip install gensim (or pip install 'optbrain[zoo]')")
    d = d / "test" / "test_data"
    if not d.is_dir():
        raise ImportError(f"gensim is installed without its test data ({d}); {entry!r} needs it")
    return d


def window_batches(
    windows: torch.Tensor,
    n: int,
    seed: int,
    batch_size: int,
    batch: Callable[[torch.Tensor], dict[str, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """Calibration of the text models: ``n`` distinct random token windows (rows of
    ``windows``), in batches of ``batch_size``, each given to the model as ``batch(ids)``."""
    if n > len(windows):
        raise ValueError(f"at most {len(windows)} calibration windows, asked for {n}")
    return [batch(x) for x in batched(sample(windows, n, seed), batch_size)]


def sequential_gptq(bits: int, group_size: int, samples: int = 128) -> dict[str, Any]:
    """The default recipe of the transformer entries: GPTQ on a grouped grid, calibrated
    sequentially (each block sees the already compressed blocks before it)."""
    calibration = {"mode": "sequential", "samples": samples}
    return {"method": "gptq", "bits": bits, "group_size": group_size, "calibration": calibration}
