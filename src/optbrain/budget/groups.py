"""Tied-group units of the budget: residual-stream channels as one unit of the DP.

A tied group (``pipeline.shrink_sites.tied_groups``: channels read by several layers, e.g. the
stem output + layer1 output of a ResNet) can only lose a channel in all its consumers at once,
so it cannot be a per-layer level. It is its own unit of the DP, next to the layers: levels
``"c0.1" … "c0.9"`` (the grid's channel fractions) from ONE group-OBS trace
(``core/structured_group.group_obs``); a level's error is the group's summed layer-wise loss
(``loss``: ``Σ_l ½ Σ_r δ H_l δᵀ`` under the undamped ``H_l``; ``model_loss``: the model-level
loss with all the consumers swapped in at once); its cost is a SAVING (negative, dense = 0)
counted for every member: each consumer at ``k`` fewer input channels and each producer at
``k`` fewer output rows (params, FLOPs from the layer records; latency from the measured table,
``latency.latency_table``).

Coupling with the per-layer units is treated as ADDITIVE: a producer of a group (``layerK.conv2``)
may also have its own channel level (its input channels); its time is priced once with fewer
input and once with fewer output channels, and the savings are added although they overlap
(optimistic by at most ``k_in/n_in · k_out/n_out`` of its dense cost; the shrunk model's
measured speed is what the report gives). The weights do not conflict: the group writes only
its consumers' weights and removes the producers' rows; a layer's own level writes its own
weight and removes its producers' rows; each layer's rows are independent problems.

Group units are offered only with a channel-only grid (no unstructured, N:M or bit levels):
then a consumer's own unit is dense (its input is tied, it has no channel level) and nothing
else writes its weight. Stored in ``groups/NNNN.json`` + ``.safetensors`` of the database
directory (sealed, checksummed, as the layers): ``"{level}/{consumer}/weight"`` and ``/mask``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_for
from ..core.hessian import row_losses
from ..core.structured_group import group_obs
from ..pipeline.data import Forward
from ..pipeline.groups import example_of, group_problem, layer_order
from ..pipeline.hessians import collect_hessians
from ..pipeline.shrink_sites import TiedGroup, tied_groups
from ..pipeline.state import GroupState, LayerState
from .costs import DENSE_BITS
from .levels import Level
from .model_loss import ModelLoss
from .store import (
    FORMAT,
    Database,
    atomic_json,
    atomic_tensors,
    checked_tensors,
    complete_record,
    read_record,
)

GROUPS = "groups"

__all__ = [
    "GROUPS",
    "apply_group",
    "build_group_units",
    "group_cost",
    "group_levels",
    "group_records",
    "group_weights",
    "is_group",
]


def is_group(name: str) -> bool:
    """Whether a DP unit name is a tied group (``"tied:a+b+c"``, ``TiedGroup.name``)."""
    return name.startswith("tied:")


def group_levels(levels: Sequence[Level]) -> list[Level]:
    """The grid's channel levels for the groups; [] unless the grid is channel-only."""
    if any(not lv.is_dense and not (lv.channels and not lv.quantizes) for lv in levels):
        return []
    return [lv for lv in levels if lv.channels]


def _stem(db: Database, i: int) -> Path:
    return db.root / GROUPS / f"{i:04d}"


def group_records(db: Database) -> list[dict[str, Any]]:
    """The complete group units of ``db`` in order (none for a database built without)."""
    if not (db.root / GROUPS).is_dir():
        return []
    return [read_record(p) for p in sorted((db.root / GROUPS).glob("*.json"))]


def group_weights(db: Database, rec: dict[str, Any], lid: str) -> dict[str, dict[str, Any]]:
    """``{consumer: {"weight", "mask"}}`` of level ``lid`` of group record ``rec``."""
    t = checked_tensors(_stem(db, int(rec["index"])).with_suffix(".safetensors"), rec)
    return {c: {p: t[f"{lid}/{c}/{p}"] for p in ("weight", "mask")} for c in rec["consumers"]}


def _complete(db: Database, i: int, name: str, model_level: bool) -> bool:
    rec = complete_record(_stem(db, i), name)
    if rec is None:
        return False
    return not model_level or all("model_loss" in e for e in rec["levels"].values())


def _savings(db: Database, grp: TiedGroup, k: int) -> dict[str, int]:
    """Params / FLOPs removed with ``k`` channels: consumers' columns, producers' rows."""
    params = flops = 0
    for c in grp.consumers:
        r = db.record(c)
        cols = k * int(r["rows"]) * int(r["channel_size"])
        params, flops = params + cols, flops + 2 * int(r["positions"]) * cols
    for p in grp.producers:
        if p in db.layers:
            r = db.record(p)
            params, flops = (
                params + k * int(r["cols"]),
                flops + 2 * k * int(r["cols"]) * int(r["positions"]),
            )
    return {"saved_params": params, "saved_flops": flops}


def build_group_units(
    model: nn.Module,
    batches: Sequence[Any],
    db: Database,
    *,
    damp: float,
    inputs: str = "all",
    forward: Forward | None = None,
    model_loss: ModelLoss | None = None,
) -> list[str]:
    """Build the missing group units of ``db`` (module docstring); returns their names."""
    levels = group_levels(db.levels)
    if not levels or forward is not None:
        return []
    groups = [g for g in tied_groups(model, example_of(batches[0], inputs)) if g.reason is None]
    groups = [g for g in groups if all(c in db.layers for c in g.consumers)]
    ml = model_loss is not None
    todo = [(i, g) for i, g in enumerate(groups) if not _complete(db, i, g.name, ml)]
    if not todo:
        return []
    (db.root / GROUPS).mkdir(exist_ok=True)
    targets = {n: adapter_for(model.get_submodule(n)) for _, g in todo for n in g.consumers}
    accs = collect_hessians(model, targets, batches, inputs=inputs)
    for i, grp in todo:
        Hd = {n: accs[n][0].hessian() for n in grp.consumers}
        Ws, Hs, gs = group_problem(model, grp, Hd)
        n = grp.channels
        fit = [lv for lv in levels if 0 < int(round(lv.channels * n)) < n]
        entries: dict[str, Any] = {"dense": {"removed_channels": 0, "loss": 0.0,
                                             "predicted": 0.0, **_savings(db, grp, 0)}}  # fmt: skip
        tensors: dict[str, torch.Tensor] = {}
        if fit:
            trace = group_obs(Ws, Hs, gs, damp=damp, max_fraction=max(lv.channels for lv in fit))
            for lv in fit:
                weights, keep, pred = trace.solve(lv.channels)
                k = int((~keep).sum())
                loss = sum(
                    float(row_losses(W, w, H).sum())
                    for W, w, H in zip(Ws, weights, Hs, strict=True)
                )
                for c, w, g in zip(grp.consumers, weights, gs, strict=True):
                    w_own, mask = layer_order(grp, c, g, w.float(), keep)
                    tensors[f"{lv.id}/{c}/weight"] = w_own.cpu()
                    tensors[f"{lv.id}/{c}/mask"] = mask.to(torch.uint8)
                entries[lv.id] = {"removed_channels": k, "loss": loss, "predicted": pred,
                                  **_savings(db, grp, k)}  # fmt: skip
        if model_loss is not None:
            _model_level(model, grp, entries, tensors, model_loss)
        energy = sum(
            float(0.5 * ((W.double() @ H) * W.double()).sum()) for W, H in zip(Ws, Hs, strict=True)
        )
        rec = {"format": FORMAT, "name": grp.name, "index": i, "consumers": grp.consumers,
               "producers": grp.producers, "channels": n, "channel_sizes": gs,
               "channel_index": grp.index, "dense_energy": energy, "levels": entries}  # fmt: skip
        stem = _stem(db, i)
        rec["tensors_sha256"] = atomic_tensors(stem.with_suffix(".safetensors"), tensors)
        atomic_json(stem.with_suffix(".json"), rec)
    return [g.name for _, g in todo]


def _model_level(
    model: nn.Module, grp: TiedGroup, entries: dict, tensors: dict, mloss: ModelLoss
) -> None:
    adapters = {c: adapter_for(model.get_submodule(c)) for c in grp.consumers}
    dense = {c: a.weight(0) for c, a in adapters.items()}
    for lid, entry in entries.items():
        if lid == "dense":
            entry["model_loss"] = 0.0
            continue
        try:
            for c, a in adapters.items():
                a.set_weight(0, tensors[f"{lid}/{c}/weight"].to(dense[c].device))
            entry["model_loss"] = mloss()
        finally:
            for c, a in adapters.items():
                a.set_weight(0, dense[c])


def group_cost(
    metric: str,
    rec: Mapping[str, Any],
    lid: str,
    timing: Mapping[str, Mapping[str, float]] | None = None,
) -> Fraction:
    """The (negative) cost of group level ``lid``: minus what it saves (module docstring)."""
    e = rec["levels"][lid]
    if metric == "params":
        return Fraction(-int(e["saved_params"]))
    if metric == "flops":
        return Fraction(-int(e["saved_flops"]))
    if metric == "bops":
        return Fraction(-int(e["saved_flops"]) * DENSE_BITS)
    if metric == "size":
        return Fraction(-int(e["saved_params"]) * DENSE_BITS, 8)
    if metric == "latency":
        row = (timing or {}).get(rec["name"])
        if row is None or lid not in row:
            raise ValueError(f"the timing table has no entry for group {rec['name']!r} at {lid!r}")
        return Fraction(float(row[lid]))
    raise ValueError(f"unknown cost metric {metric!r}")


def apply_group(
    model: nn.Module, db: Database, rec: dict[str, Any], lid: str, damp: float
) -> dict[str, LayerState]:
    """Write group level ``lid`` into its consumers; their ``LayerState`` (pattern channels)."""
    plan = {"method": "obc", "level": lid, "sparsity": Level.parse(lid).channels,
            "pattern": "channels", "bits": None, "sym": True, "group_size": None, "damp": damp,
            "dtype": "float32", "options": {}, "tied_group": rec["name"]}  # fmt: skip
    out = {}
    for c, t in group_weights(db, rec, lid).items():
        adapter_for(model.get_submodule(c)).set_weight(0, t["weight"])
        out[c] = LayerState(plan=dict(plan), groups=[GroupState(mask=t["mask"].bool())])
    return out
