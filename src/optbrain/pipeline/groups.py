"""Tied channel groups compressed at once: the residual stream's channels, removed from all readers.

``compress_groups(model, calibration, 0.25)`` finds the tied groups (``shrink_sites.tied_groups``:
channels read by several layers, e.g. the stem output + every block output of a ResNet stage,
read by the next convs and the projection shortcut), collects every consumer's Hessian in one
pass of the dense model, removes a fraction of each group's channels from all its consumers
with ``core/structured_group.solve_group`` (``obc``: structured OBS over the group with exact
compensation per consumer; ``magnitude`` / ``obd``: summed channel norms / saliencies), writes
the weights and records each consumer as a ``channels`` layer on the model's ``ModelState`` (a
``LayerState`` per consumer, mask = kept columns), so ``optbrain.shrink`` removes the channels
from every consumer and the producers' rows (stem conv, block convs, shortcuts, their batch
norms), and ``optbrain.save`` / ``load`` work as after ``optbrain.compress``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_for
from ..core.spec import DEFAULT_DAMP
from ..core.structured_group import GroupResult, solve_group
from .data import Forward, take_samples
from .hessians import collect_hessians
from .shrink_sites import TiedGroup, tied_groups
from .state import STATE_ATTR, GroupState, LayerState, ModelState

__all__ = [
    "compress_groups",
    "example_of",
    "group_columns_perm",
    "group_problem",
    "layer_order",
    "write_group",
]


def example_of(batch: Any, inputs: str = "all") -> Any:
    """One sample of a calibration batch, as the model is called with it (``inputs="first"``:
    the first element of a tuple batch)."""
    one = take_samples([batch], 1)[0]
    return one[0] if inputs == "first" and isinstance(one, tuple | list) else one


def group_columns_perm(group: TiedGroup, name: str, csize: int) -> torch.Tensor:
    """Columns of consumer ``name`` in group-channel order: ``index[c] · csize + j``."""
    idx = torch.tensor(group.index[name], dtype=torch.long)
    return (idx.unsqueeze(1) * csize + torch.arange(csize)).reshape(-1)


def _csize(module: nn.Module) -> int:
    return math.prod(getattr(module, "kernel_size", (1,)))


def group_problem(
    model: nn.Module, group: TiedGroup, hessians: Mapping[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """``(Ws, Hs, channel sizes)`` of the group's consumers, columns in group-channel order."""
    Ws, Hs, gs = [], [], []
    for name in group.consumers:
        module = model.get_submodule(name)
        g = _csize(module)
        perm = group_columns_perm(group, name, g)
        W = adapter_for(module).weight(0)
        H = hessians[name]
        Ws.append(W.index_select(1, perm.to(W.device)))
        Hs.append(H[perm][:, perm])
        gs.append(g)
    return Ws, Hs, gs


def write_group(
    model: nn.Module,
    group: TiedGroup,
    weights: list[torch.Tensor],
    keep: torch.Tensor,
    plan: dict[str, Any],
) -> dict[str, LayerState]:
    """Write the group's consumer weights (group-channel order) into ``model``; returns each
    consumer's ``LayerState`` (mask: the kept columns in the layer's own order)."""
    states = {}
    for name, w in zip(group.consumers, weights, strict=True):
        module = model.get_submodule(name)
        out, mask = layer_order(group, name, _csize(module), w, keep)
        adapter_for(module).set_weight(0, out)
        states[name] = LayerState(plan=dict(plan), groups=[GroupState(mask=mask)])
    return states


def layer_order(
    group: TiedGroup, name: str, csize: int, w: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Consumer ``name``'s weight ``w`` (group-channel order) and the kept channels ``(n,)`` as
    ``(weight, mask (rows, cols) bool)`` in the layer's own column order."""
    perm = group_columns_perm(group, name, csize)
    out = torch.empty_like(w)
    out[:, perm.to(w.device)] = w
    kept = torch.empty(perm.numel(), dtype=torch.bool)
    kept[perm] = keep.cpu().repeat_interleave(csize)
    return out, kept.unsqueeze(0).expand(out.shape[0], -1).clone()


def compress_groups(
    model: nn.Module,
    calibration: Any,
    fraction: float | Mapping[str, float],
    method: str = "obc",
    *,
    inputs: str = "all",
    forward: Forward | None = None,
    damp: float = DEFAULT_DAMP,
    groups: list[TiedGroup] | None = None,
) -> dict[str, GroupResult]:
    """Remove ``fraction`` of the channels of every tied group of ``model`` (in place).

    fraction: one fraction for all groups, or ``{group name: fraction}`` (``TiedGroup.name``;
    groups not named are left alone). groups: the groups (default: ``tied_groups`` of the
    model on the first calibration sample; refused groups are skipped). The model's
    ``ModelState`` gains a ``channels`` layer per consumer (created if the model has none).
    Returns ``{group name: GroupResult}``. ``forward``: a custom call is not traceable here
    (ValueError).
    """
    if forward is not None:
        raise ValueError("tied groups need the model's plain call (a custom forward was given)")
    batches = calibration if isinstance(calibration, list) else [calibration]
    if groups is None:
        groups = tied_groups(model, example_of(batches[0], inputs))
    groups = [g for g in groups if g.reason is None]
    if not isinstance(fraction, Mapping):
        fraction = {g.name: float(fraction) for g in groups}
    unknown = sorted(set(fraction) - {g.name for g in groups})
    if unknown:
        raise ValueError(f"no tied group named {unknown}; groups: {[g.name for g in groups]}")
    todo = [g for g in groups if fraction.get(g.name, 0.0) > 0]
    if not todo:
        return {}
    targets = {n: adapter_for(model.get_submodule(n)) for g in todo for n in g.consumers}
    accs = collect_hessians(model, targets, batches, inputs=inputs)
    results: dict[str, GroupResult] = {}
    layers: dict[str, LayerState] = {}
    for grp in todo:
        Ws, Hs, gs = group_problem(model, grp, {n: accs[n][0].hessian() for n in grp.consumers})
        frac = fraction[grp.name]
        res = solve_group(Ws, Hs, gs, frac, method, damp=damp)
        plan = {"method": method, "sparsity": frac, "pattern": "channels", "bits": None,
                "sym": True, "group_size": None, "damp": damp, "dtype": "float32",
                "options": {}, "tied_group": grp.name}  # fmt: skip
        layers.update(write_group(model, grp, res.weights, res.keep, plan))
        results[grp.name] = res
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        state = ModelState(recipe={"tied_groups": dict(fraction), "method": method}).attach(model)
    state.layers.update(layers)
    return results
