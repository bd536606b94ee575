"""ONNX Runtime helpers of the export tests (import after ``importorskip("onnxruntime")``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    """A one-thread CPU session of ``path``; ``optimized``: where ORT writes the graph it runs."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """``‖a − b‖ / ‖b‖``."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
