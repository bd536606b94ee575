"""The exact engines on CUDA tensors (device follows the tensors): the tensor engine, OBQ, the
masked optimum's batched path and ``compress_layer`` give the CPU results, on the GPU.

Skipped without CUDA (CI has none); where a GPU is lent:
``pytest tests/core/test_engine_cuda.py``.
"""

import pytest
import torch
from obs_reference import make_problem

from optbrain import compress_layer, prepare_hessian
from optbrain.core.grid import fit_grid
from optbrain.core.obq import obq
from optbrain.core.obs import EngineConfig, PruneScorer, greedy_single
from optbrain.core.trace import masked_optimum

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
F64 = torch.float64
CUDA = torch.device("cuda")


def _problem(seed=0, rows=12, cols=96):
    W, X, H = make_problem(seed, rows, cols, dtype=F64)
    return W, prepare_hessian(H, 0.01, dtype=F64)


def test_greedy_trace_on_cuda_equals_cpu():
    W, prep = _problem()
    cpu = greedy_single(W, prep.Hinv, 96, PruneScorer(), engine=EngineConfig(kernel="torch"))
    gpu = greedy_single(W.to(CUDA), prep.Hinv.to(CUDA), 96, PruneScorer())  # auto: torch on CUDA
    assert gpu.weight.device.type == "cuda"
    assert torch.equal(gpu.order.cpu(), cpu.order)
    torch.testing.assert_close(gpu.step_loss.cpu(), cpu.step_loss, atol=1e-10, rtol=1e-8)
    with pytest.raises(ValueError, match="kernel='fused' needs CPU"):
        fused = EngineConfig(kernel="fused")
        greedy_single(W.to(CUDA), prep.Hinv.to(CUDA), 4, PruneScorer(), engine=fused)


def test_obq_and_masked_optimum_on_cuda_equal_cpu():
    W, prep = _problem(1)
    grid = fit_grid(W, 4, weight=torch.diagonal(prep.H))
    cpu = obq(W, prep, grid)
    gprep = prepare_hessian(prep.H.to(CUDA), 0.0, dtype=F64)
    gpu = obq(W.to(CUDA), gprep, grid.to(CUDA))
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, atol=1e-9, rtol=1e-7)
    frac = torch.linspace(0.2, 0.8, W.shape[0])[:, None]  # rows solving the S and the F system
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) > frac
    a = masked_optimum(W, prep.H, keep)
    b = masked_optimum(W.to(CUDA), prep.H.to(CUDA), keep.to(CUDA))
    assert b.device.type == "cuda"
    torch.testing.assert_close(b.cpu(), a, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"pattern": "2:4"}, {"bits": 4}])
def test_compress_layer_on_cuda_equals_cpu(kw):
    W, X, H = make_problem(2, 16, 64)
    cpu = compress_layer(W, H, method="obc", dtype=F64, **kw)
    gpu = compress_layer(W.to(CUDA), H.to(CUDA), method="obc", dtype=F64, **kw)
    assert gpu.weight.device.type == "cuda"
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, atol=1e-8, rtol=1e-6)
