"""The fused CPU kernel (optbrain.core.obs_fused) against the tensor engine (core.obs).

Both are tested against the naive from-scratch greedy in test_obs.py / test_obq.py (their engine
parametrizations run ``kernel="torch"`` and the default, fused); here the two engines are
compared with each other on problems too large for the naive reference, and the kernel's own
plumbing (threads, progress, the choice of kernel) is checked.
"""

import pytest
import torch
from obs_reference import make_problem

from optbrain import compress_layer, prepare_hessian
from optbrain.core import obs_fused, ticks
from optbrain.core.grid import fit_grid
from optbrain.core.obq import QuantScorer, obq
from optbrain.core.obs import EngineConfig, NMScorer, PruneScorer, Scorer, greedy_single

F64 = torch.float64
FUSED, TORCH = EngineConfig(kernel="fused"), EngineConfig(kernel="torch")


def _problem(seed, rows, cols, dtype=F64):
    W, X, H = make_problem(seed, rows, cols, dtype=F64)
    prep = prepare_hessian(H, 0.01, dtype=dtype)
    return W.to(dtype), prep


def _scorers(W, prep, cols):
    grid = fit_grid(W, 4, weight=torch.diagonal(prep.H))
    scale, zero = grid.columns(cols)
    return {
        "prune": (PruneScorer, cols),
        "2:4": (lambda: NMScorer(W.shape[0], cols, 2, 4, W.device), cols // 2),
        "obq": (lambda: QuantScorer(scale.to(W.dtype), zero.to(W.dtype), grid.maxq), cols),
        "obq-slack": (
            lambda: QuantScorer(scale.to(W.dtype), zero.to(W.dtype), grid.maxq, True, 0.25),
            cols,
        ),
    }


@pytest.mark.parametrize("kind", ["prune", "2:4", "obq", "obq-slack"])
def test_fused_equals_tensor_engine_float64(kind):
    W, prep = _problem(1, 24, 48)
    make, steps = _scorers(W, prep, 48)[kind]
    a = greedy_single(W, prep.Hinv, steps, make(), engine=FUSED)
    b = greedy_single(W, prep.Hinv, steps, make(), engine=TORCH)
    assert torch.equal(a.order, b.order)
    torch.testing.assert_close(a.weight, b.weight, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(a.step_loss, b.step_loss, atol=1e-14, rtol=1e-9)


def test_fused_compound_per_row_inverse_equals_tensor_engine():
    """OBQ on the kept weights of a 50% mask: a per-row ``(R, Cw, Cw)`` inverse and ``pos``."""
    W, prep = _problem(2, 16, 40)
    r = compress_layer(W, prep.H, 0.5, dtype=F64, damp=0.0, guard=False)
    grid = fit_grid(r.weight, 3, weight=torch.diagonal(prep.H))
    a = obq(r.weight, prep, grid, keep=r.mask, engine=FUSED)
    b = obq(r.weight, prep, grid, keep=r.mask, engine=TORCH)
    assert len(set((~r.mask).sum(1).tolist())) > 1  # rows keep different counts: padding
    for row in range(16):  # the same quantization order of the kept weights (padding apart)
        kept = r.mask[row]
        assert [c for c in a.order[row].tolist() if kept[c]] == [
            c for c in b.order[row].tolist() if kept[c]
        ]
    torch.testing.assert_close(a.weight, b.weight, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(a.step_loss.sum(1), b.step_loss.sum(1), rtol=1e-9, atol=1e-14)
    assert a.order.shape == b.order.shape and (a.weight[~r.mask] == 0).all()


def test_fused_float32_trace_agrees_to_1e5():
    """float32: the greedy orders agree (a late near-tie may flip in a row) and the traces'
    cumulative losses agree to 1e-5 relative wherever the orders do."""
    W, prep = _problem(3, 64, 192, torch.float32)
    a = greedy_single(W, prep.Hinv, 192, PruneScorer(), engine=FUSED)
    b = greedy_single(W, prep.Hinv, 192, PruneScorer(), engine=TORCH)
    same = a.order == b.order
    agree = same.cumprod(1).bool()  # the prefix of each row where the orders agree
    assert float(same.all(1).float().mean()) >= 0.9
    assert float(agree.float().mean()) >= 0.97
    ca, cb = a.step_loss.cumsum(1), b.step_loss.cumsum(1)
    rel = (ca - cb).abs() / cb.abs().clamp_min(1e-30)
    assert float(rel[agree].max()) <= 1e-5


def test_threads_and_chunks_do_not_change_results(monkeypatch):
    W, prep = _problem(4, 37, 32)  # 37 rows: uneven chunks
    ref = greedy_single(W, prep.Hinv, 32, PruneScorer(), engine=FUSED)  # small: one thread
    monkeypatch.setattr(obs_fused, "SERIAL_WORK", 0.0)  # force the thread pool
    for threads in (2, 3):
        out, order, loss = obs_fused.fused_greedy(
            W, prep.Hinv, 32, obs_fused.PRUNE, lazy=16, threads=threads
        )
        assert torch.equal(out, ref.weight) and torch.equal(order, ref.order)
        assert torch.equal(loss, ref.step_loss)


def test_progress_ticks_are_monotone_to_one(monkeypatch):
    W, prep = _problem(5, 40, 24)
    seen = []
    with ticks.listen(seen.append):
        greedy_single(W, prep.Hinv, 24, PruneScorer(), engine=FUSED)
    assert len(seen) >= 4 and seen[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False))
    monkeypatch.setattr(obs_fused, "SERIAL_WORK", 0.0)
    seen.clear()
    with ticks.listen(seen.append):
        obs_fused.fused_greedy(W, prep.Hinv, 24, obs_fused.PRUNE, threads=2, progress=ticks.tick)
    assert len(seen) >= 4 and seen[-1] == pytest.approx(1.0)


def test_kernel_choice_and_bad_settings(monkeypatch):
    W, prep = _problem(6, 4, 8)

    class Custom(PruneScorer):
        def fused(self):  # a scorer only the tensor engine knows
            return Scorer.fused(self)

    with pytest.raises(ValueError, match="kernel must be one of"):
        EngineConfig(kernel="numba")
    with pytest.raises(ValueError, match="kernel='fused' needs"):
        greedy_single(W, prep.Hinv, 4, Custom(), engine=FUSED)
    auto = greedy_single(W, prep.Hinv, 4, Custom())  # auto: falls back to the tensor engine
    ref = greedy_single(W, prep.Hinv, 4, PruneScorer(), engine=TORCH)
    assert torch.equal(auto.order, ref.order)
    monkeypatch.setenv("OPTBRAIN_NO_FUSED", "1")
    assert not obs_fused.available()
    assert not EngineConfig().fused_for(W, PruneScorer())
    with pytest.raises(ValueError, match="kernel='fused' needs"):
        greedy_single(W, prep.Hinv, 4, PruneScorer(), engine=FUSED)
    assert EngineConfig(lazy=5).lazy_for("fused") == 5
    assert EngineConfig().lazy_for("fused") == 16 and EngineConfig().lazy_for("torch") == 32
    with pytest.raises(ValueError, match="kernel must be one of"):
        compress_layer(W, prep.H, 0.5, kernel="fast")


@pytest.mark.parametrize(
    "content,expect", [("0.5 0.4 0.3 1/80 9", 2), ("3.0 2.0 1.0 4/80 9", 4), ("9 9 9 12/80 9", 4)]
)
def test_pool_threads_adds_workers_while_others_run(tmp_path, monkeypatch, content, expect):
    """Runnable tasks besides this one (the 4th field of /proc/loadavg) add workers, at most
    the base count more; a base below the cores is the caller's limit and kept; without the
    file the base count. (A 2-core machine, whatever this one has.)"""
    monkeypatch.setattr(obs_fused, "_cores", lambda: 2)
    f = tmp_path / "loadavg"
    f.write_text(content)
    monkeypatch.setattr(obs_fused, "LOADAVG", str(f))
    assert obs_fused.pool_threads(2) == expect
    assert obs_fused.pool_threads(1) == 1
    monkeypatch.setattr(obs_fused, "LOADAVG", str(tmp_path / "missing"))
    assert obs_fused.pool_threads(2) == 2
