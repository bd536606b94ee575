"""OWL: non-uniform unstructured sparsity from activation outliers (recipe ``allocation: owl``).

OWL (outlier-weighted layerwise sparsity, Yin et al. 2023) gives blocks with more activation
outliers a lower sparsity. With the Wanda score of every weight of a block ``b`` (all its
pruned layers), ``A_ij = |W_ij| · ‖X_j‖``::

    D_b   = #{A_ij > M · mean_b(A)} / #A                   (layerwise outlier distribution)
    ρ_b   = 2λ · (D_b − min D) / (max D − min D)           (in [0, 2λ])
    δ_b   = −(ρ_b − mean_w(ρ))                             (the block's sparsity offset)

and every pruned layer of block ``b`` takes sparsity ``s_layer + δ_b``. ``mean_w`` weights the
blocks by their parameter counts, so the model's overall sparsity is unchanged (OWL, whose
blocks all have the same size, sets ``sparsity_b = s + δ_b``); ``max δ − min δ = 2λ`` and
``|δ_b| < 2λ``. ``‖X_j‖ ∝ √H_jj``
with the collected ``H = 2 XᵀX / N`` from the dense model (one ``N`` per block, so the scale
cancels in ``D_b``). Layers outside the block list (``find_blocks``) are blocks of their own.
``M = 5``, ``λ = 0.08``: OWL's defaults (``recipe.SparsityAllocation``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter, adapter_for, find_layers
from ..core.methods.baselines import wanda_score
from ..recipe import SparsityAllocation
from .data import Forward, take_samples
from .hessians import collect_hessians
from .sequential import find_blocks

_DEFAULT = SparsityAllocation(method="owl")


def block_of(name: str, blocks: list[str]) -> str:
    """The block (a name of ``find_blocks``) holding layer ``name``, else ``name`` itself."""
    best = ""
    for b in blocks:
        if name.startswith(b + ".") and len(b) > len(best):
            best = b
    return best or name


def outlier_ratios(
    scores: Mapping[str, torch.Tensor], groups: Mapping[str, str], outlier_m: float
) -> dict[str, float]:
    """``D_b`` per block: the fraction of the block's scores above ``outlier_m`` × their mean.

    scores: ``{layer: A}`` (any shape); groups: ``{layer: block}``."""
    out: dict[str, float] = {}
    for b in dict.fromkeys(groups.values()):
        flat = torch.cat([scores[n].reshape(-1).double() for n in scores if groups[n] == b])
        out[b] = float((flat > outlier_m * flat.mean()).double().mean())
    return out


def owl_offsets_from_ratios(
    ratios: Mapping[str, float], params: Mapping[str, int], lam: float
) -> dict[str, float]:
    """``δ_b`` per block from the outlier ratios ``D_b`` (the module docstring's equations);
    ``params``: weights per block (the weights of the mean, so ``Σ_b params_b δ_b = 0``)."""
    d = torch.tensor([ratios[b] for b in ratios], dtype=torch.float64)
    w = torch.tensor([float(params[b]) for b in ratios], dtype=torch.float64)
    span = float(d.max() - d.min())
    rho = 2 * lam * (d - d.min()) / span if span > 0 else torch.zeros_like(d)
    delta = -(rho - (rho * w).sum() / w.sum())
    return {b: float(x) for b, x in zip(ratios, delta.tolist(), strict=True)}


def wanda_scores(adapter: LayerAdapter, hessians: list) -> torch.Tensor:
    """``|W_ij| · √H_jj`` of every weight of a layer (all groups, flattened, float64)."""
    parts = []
    for g, acc in enumerate(hessians):
        W = adapter.weight(g).double()
        h = torch.diagonal(acc.hessian()).double().to(W.device)
        parts.append(wanda_score(W, h).reshape(-1).cpu())
    return torch.cat(parts)


@torch.no_grad()
def owl_offsets(
    model: nn.Module,
    adapters: Mapping[str, LayerAdapter],
    batches: list[Any],
    allocation: SparsityAllocation = _DEFAULT,
    forward: Forward | None = None,
    inputs: str = "all",
) -> dict[str, float]:
    """OWL's sparsity offset ``δ`` for every layer of ``adapters`` (one calibration pass over
    ``model`` as it is, independent mode)."""
    if not adapters:
        return {}
    hessians = collect_hessians(model, dict(adapters), batches, forward, inputs=inputs)
    try:
        blocks = [b for b, _ in find_blocks(model)]
    except ValueError:
        blocks = []
    groups = {n: block_of(n, blocks) for n in adapters}
    scores = {n: wanda_scores(adapters[n], hessians.pop(n)) for n in adapters}
    params: dict[str, int] = {}
    for n, a in adapters.items():
        params[groups[n]] = params.get(groups[n], 0) + a.params
    ratios = outlier_ratios(scores, groups, allocation.outlier_m)
    per_block = owl_offsets_from_ratios(ratios, params, allocation.lam)
    return {n: per_block[groups[n]] for n in adapters}


def owl_sparsities(
    model: nn.Module,
    calibration: Any,
    sparsity: float,
    *,
    outlier_m: float = _DEFAULT.outlier_m,
    lam: float = _DEFAULT.lam,
    samples: int | None = None,
    forward: Forward | None = None,
    inputs: str = "all",
) -> dict[str, float]:
    """OWL's sparsity for every compressible layer of ``model`` at overall ``sparsity``."""
    alloc = SparsityAllocation(method="owl", outlier_m=outlier_m, lam=lam)
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise ValueError(f"OWL: sparsity must be a number, got {sparsity!r}")
    check_room(float(sparsity), alloc.lam, "OWL")
    found, _ = find_layers(model)
    if not found:
        raise ValueError("OWL: the model has no compressible layer")
    adapters = {n: adapter_for(m) for n, m in found.items()}
    off = owl_offsets(model, adapters, take_samples(calibration, samples), alloc, forward, inputs)
    return {n: float(sparsity) + d for n, d in off.items()}


def check_room(sparsity: float, lam: float, where: str) -> None:
    """``sparsity ± 2·lam`` (the most an offset moves it) must stay in ``(0, 1)``: else a
    ``ValueError`` naming ``where``."""
    if not (sparsity - 2 * lam > 0.0 and sparsity + 2 * lam < 1.0):
        raise ValueError(
            f"{where}: sparsity {sparsity} with allocation owl (lam {lam}) could leave (0, 1) "
            f"once moved by up to ±{2 * lam:g}; use a smaller allocation.lam"
        )


def owl_layers(plans: Mapping[str, Any]) -> list[str]:
    """The planned layers OWL moves: those pruned with an unstructured sparsity."""
    return [n for n, p in plans.items() if p.sparsity and p.pattern == "unstructured"]


def check_owl_plans(plans: Mapping[str, Any], allocation: SparsityAllocation) -> None:
    """Before any work: every layer OWL moves keeps room for ``± 2·lam``."""
    for n in owl_layers(plans):
        check_room(float(plans[n].sparsity), allocation.lam, f"layer {n}")


def apply_owl(
    model: nn.Module,
    plans: dict[str, Any],
    adapters: Mapping[str, LayerAdapter],
    batches: list[Any],
    allocation: SparsityAllocation,
    forward: Forward | None = None,
    inputs: str = "all",
) -> dict[str, float]:
    """Move the sparsity of every unstructured-pruned plan by its block's OWL offset (in
    ``plans``, in place); returns the new sparsities."""
    names = owl_layers(plans)
    off = owl_offsets(model, {n: adapters[n] for n in names}, batches, allocation, forward, inputs)
    out = {}
    for n in names:
        out[n] = round(float(plans[n].sparsity) + off[n], 6)
        plans[n] = dataclasses.replace(plans[n], sparsity=out[n])
    return out
