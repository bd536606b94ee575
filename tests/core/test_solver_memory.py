"""Memory of one column-method solve (GPTQ): the (C, C) buffers a solve holds at its peak.

A solve needs the float32 damped Hessian and its inverse at once (2 C²) and then only the upper
factor of the inverse (written over it) and the diagonal; before the in-place work it held
~7 C² (copies for damping, the inverse, the factor, full-size ``isfinite`` / symmetry / loss
temporaries). Measured in a fresh process so the solve sets the process's peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optbrain.core.spec import all_finite, first_nonfinite

CHILD = r"""
import gc, json, sys
import torch
from optbrain.core.layer import compress_layer
from optbrain.report import peak_memory_tracker
rows, cols = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
H = torch.zeros(cols, cols, dtype=torch.float64)
for _ in range(4):  # built in pieces so that building it is not the process's peak
    X = torch.randn(cols // 2, cols, generator=g, dtype=torch.float64)
    H.addmm_(X.t(), X)
    del X
W = torch.randn(rows, cols, generator=g)
gc.collect()
with peak_memory_tracker() as mem:
    res = compress_layer(W, H, method=sys.argv[3], bits=4)
print(json.dumps({"mb": mem.mb, "loss": res.loss}))
"""


@pytest.mark.parametrize("method", ["gptq", "sparsegpt"])
def test_column_solve_peak_is_about_two_hessians(method: str) -> None:
    rows, cols = 256, 3072
    hessian_mb = cols * cols * 4 / 2**20  # one float32 (C, C) buffer: 36 MB
    weight_mb = rows * cols * 4 / 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(rows), str(cols), method],
        capture_output=True, text=True, env=env, check=True, timeout=300,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # 2 C² (H and H⁻¹ / its factor) + the weight-sized work buffers + allocator slack;
    # before the in-place work this was ≈ 7 C²
    assert got["mb"] <= 3.2 * hessian_mb + 8 * weight_mb, (got, hessian_mb)


def test_first_nonfinite_names_the_first_bad_entry_in_blocks() -> None:
    x = torch.zeros(700, 5)
    assert first_nonfinite(x) is None and all_finite(x)
    x[613, 2] = float("nan")
    x[650, 0] = float("inf")
    assert first_nonfinite(x, block=256) == (613, 2)
    assert first_nonfinite(x, block=7) == (613, 2)
    assert not all_finite(x)
    assert first_nonfinite(torch.tensor(float("inf"))) == ()
    assert first_nonfinite(torch.tensor([1.0, float("-inf")])) == (1,)
