"""The exact solver (``method="obc"``): ExactOBS pruning, OBQ quantization, OBC compound.

Options (``prune_layer(..., lazy=32)`` etc.): ``lazy``, ``shrink``, ``memory`` (engine speed
knobs, see ``EngineConfig``; results do not depend on them), ``max_sparsity`` (how far the
unstructured/block trace runs, default 1.0: every level), ``per_row`` (same sparsity in every
row instead of the layer-wide selection).
"""

from __future__ import annotations

from typing import Any

import torch

from ..grid import fit_grid
from ..hessian import PreparedHessian, prepare_layer, row_losses
from ..obq import obq
from ..obs import EngineConfig, PruneTrace, obs_trace, prune_nm
from ..result import LayerResult
from ..spec import CompressSpec, check_options

OPTIONS = ("lazy", "shrink", "memory", "max_sparsity", "per_row", "outliers")


def engine_config(options: dict[str, Any]) -> EngineConfig:
    kw = {k: options[k] for k in ("lazy", "shrink", "memory") if k in options}
    return EngineConfig(**kw)


def exact_prune(
    Wc: torch.Tensor, prep: PreparedHessian, spec: CompressSpec, engine: EngineConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PruneTrace | None]:
    """Prune with ExactOBS → ``(weight, keep, row_loss, trace or None)``, compute dtype."""
    pat = spec.pattern
    if pat.kind == "nm":
        out = prune_nm(Wc, prep, pat.n, pat.m, engine=engine)
        removed = torch.zeros(Wc.shape, dtype=torch.bool, device=Wc.device)
        removed.scatter_(1, out.order, True)
        return out.weight, ~removed, out.step_loss.sum(1).cpu(), None
    max_sp = float(spec.options.get("max_sparsity", 1.0))
    if not (0.0 < max_sp <= 1.0):
        raise ValueError(f"max_sparsity must be in (0, 1], got {max_sp!r}")
    trace = obs_trace(Wc, prep, pat, max_sparsity=max(max_sp, spec.sparsity or 0.0), engine=engine)
    weight, keep, rl = trace.at(spec.sparsity or 0.0, per_row=bool(spec.options.get("per_row")))
    return weight, keep, rl, trace


def solve_obc(W: torch.Tensor, H: torch.Tensor, spec: CompressSpec) -> LayerResult:
    """Exact OBS/OBQ/OBC for one layer; ``loss`` is the greedy's predicted loss."""
    check_options("obc", spec.options, OPTIONS)
    engine = engine_config(spec.options)
    if not spec.prunes and not spec.quantizes:  # nothing asked: W unchanged, exactly
        return LayerResult(
            weight=W.clone(),
            mask=None,
            loss=0.0,
            method="obc",
            row_loss=torch.zeros(W.shape[0], dtype=torch.float64),
        )
    Wc, prep = prepare_layer(W, H, spec)
    keep, trace = None, None
    weight = Wc
    predicted = torch.zeros(W.shape[0], dtype=torch.float64)
    if spec.prunes:
        weight, keep, predicted, trace = exact_prune(Wc, prep, spec, engine)
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
            engine=engine,
            outliers=bool(spec.options.get("outliers", True)),
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
