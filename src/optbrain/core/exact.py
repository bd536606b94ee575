"""The exact solver (``method="obc"``): ExactOBS pruning, OBQ quantization, OBC compound."""

from __future__ import annotations

import torch

from ..layerwise import register
from .grid import fit_grid
from .hessian import PreparedHessian, prepare_hessian, row_losses
from .obq import obq
from .obs import PruneTrace, obs_trace, prune_nm
from .result import CompressSpec, LayerResult


def _prepare(
    W: torch.Tensor, H: torch.Tensor, spec: CompressSpec
) -> tuple[torch.Tensor, PreparedHessian]:
    prep = prepare_hessian(H, spec.damp, dtype=spec.dtype, on_singular=spec.on_singular)
    Wc = W.to(spec.dtype).clone()
    Wc[:, prep.dead] = 0  # dead inputs: the weight never reaches the output
    return Wc, prep


def exact_prune(
    Wc: torch.Tensor, prep: PreparedHessian, spec: CompressSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PruneTrace | None]:
    """Prune with ExactOBS → ``(weight, keep, row_loss, trace or None)``, compute dtype."""
    lazy = int(spec.options.get("lazy", 32))
    memory = spec.options.get("memory")
    pat = spec.pattern
    if pat.kind == "nm":
        out = prune_nm(Wc, prep, pat.n, pat.m, lazy=lazy, memory=memory)
        removed = torch.zeros(Wc.shape, dtype=torch.bool, device=Wc.device)
        removed.scatter_(1, out.order, True)
        return out.weight, ~removed, out.step_loss.sum(1).cpu(), None
    max_sp = float(spec.options.get("max_sparsity", 1.0))
    trace = obs_trace(
        Wc, prep, pat, max_sparsity=max(max_sp, spec.sparsity or 0.0), lazy=lazy, memory=memory
    )
    weight, keep, rl = trace.at(spec.sparsity or 0.0, per_row=bool(spec.options.get("per_row")))
    return weight, keep, rl, trace


@register("obc")
def solve_obc(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """Exact OBS/OBQ/OBC for one layer."""
    Wc, prep = _prepare(W, H, spec)
    keep, trace = None, None
    weight = Wc
    predicted = torch.zeros(W.shape[0], dtype=torch.float64)
    if spec.prunes:
        weight, keep, predicted, trace = exact_prune(Wc, prep, spec)
    grid = None
    if spec.quantizes:
        grid = fit_grid(
            weight,
            spec.bits,
            sym=spec.sym,
            group_size=spec.group_size,
            weight=torch.diagonal(prep.H),
        )
        out = obq(
            weight,
            prep,
            grid,
            keep=keep,
            lazy=int(spec.options.get("lazy", 32)),
            memory=spec.options.get("memory"),
        )
        weight = out.weight
        # the pruned state is the optimum on {Ŵ_S = 0}, so the losses add (Pythagoras)
        predicted = predicted + out.step_loss.sum(1).cpu()
    measured = row_losses(Wc, weight, prep.H).cpu()
    return LayerResult(
        weight=weight,
        mask=keep,
        loss=float(predicted.sum()),
        method="obc",
        bits=spec.bits,
        grid=grid,
        damping=prep.damping,
        fallback=prep.fallback,
        row_loss=predicted,
        trace=trace,
        info={"pattern": str(spec.pattern), "measured_loss": float(measured.sum())},
    )
