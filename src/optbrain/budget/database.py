"""Building the budget database: every layer compressed at every level, with its errors.

``build_database`` compresses every compressible layer of a model at every level of a grid and
writes the results layer by layer into a database directory, built once for any number of
budgets.

The database's other parts: ``store`` (directory layout, ``Database``, atomic writes),
``fingerprint`` (``DbSettings`` and what a database depends on), ``model_loss`` (model-level
errors); their public names are importable from here too.

Errors of a level (all summed over the groups of a layer):

* ``loss``: the layer-wise loss ``½ Σ_r δ_r H δ_rᵀ`` (``= ||δ Xᵀ||² / N``) with the collected,
  undamped ``H`` — measured on the stored weights, so it is comparable across levels.
* ``predicted``: the solver's own prediction (under the damped ``H``).
* ``model_loss`` (``model_level=True``): the model-level calibration loss increase when only
  this layer is swapped in — the mean squared difference of all floating-point model outputs
  from the dense model's on the calibration batches (as in the OBC paper's database).

Channel levels (``"c0.25"``, ``"c0.25+b8"``; ``budget/channels.py``): one structured-OBS trace
per layer gives every channel level; only layers ``optbrain.shrink`` can shrink on their own get
them (the record's ``channel_producers``, else ``channel_reason``).

Tied-group units (``budget/groups.py``, channel-only grids): the channels tied by a residual
add, one DP unit each, stored in ``groups/``.

Grouped convolutions are one unit: all groups of a layer take the same level (each group is
solved as its own problem, and the layer's numbers are the sums over groups).

Solvers: ``"obc"`` (exact: one ExactOBS trace per group gives every unstructured sparsity via
``trace.at(s)``, ExactOBS N:M per pattern, OBQ on top for bits — the arithmetic of
``compress_layer(method="obc")``); ``"fast"`` (SparseGPT for pruned levels, GPTQ for
quantized-only ones, one ``compress_layer`` call per level); ``"auto"`` (per layer: exact when
the modelled exact time of all its levels, ``optbrain.core.methods.auto.COST``, is within
``time_budget`` seconds, else fast).

Resuming: layers are written one at a time, tensors then JSON, each to a temporary file renamed
into place, so a layer is either complete or absent; an interrupted build skips the complete
layers (their tensor checksums verified) and computes the others exactly as it would have.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import clean_stale
from ..adapters import LayerAdapter, adapter_for, find_layers
from ..core.hessian import row_losses
from ..core.layer import compress_layer
from ..core.methods import safe_dtype
from ..core.methods.auto import estimate_levels_seconds
from ..core.methods.obc import solve_obc_levels
from ..pipeline import collect_hessians, trace_input_shapes
from ..pipeline.data import Forward, take_samples
from ..pipeline.executor import Executor, make_executor, using_executor
from ..pipeline.progress import Progress
from .channels import channel_size, layer_sites, producer_savings, solve_channel_levels
from .fingerprint import DbSettings, check_fingerprint, fingerprint
from .groups import GROUPS, build_group_units, group_levels
from .levels import Level, normalize_levels
from .model_loss import ModelLoss, model_level_errors
from .store import (
    FINGERPRINT,
    FORMAT,
    Database,
    DatabaseError,
    DatabaseMismatchError,
    atomic_json,
    atomic_tensors,
)

__all__ = [
    "Database",
    "DatabaseError",
    "DatabaseMismatchError",
    "DbSettings",
    "build_database",
    "check_database_dir",
    "fingerprint",
]


# --------------------------------------------------------------------------- building


def exact_seconds(adapter: LayerAdapter, levels: Sequence[Level]) -> float:
    """Modelled seconds of the exact solver for all of a layer's levels (all groups)."""
    return estimate_levels_seconds(adapter.rows, adapter.cols, levels) * adapter.groups


def _solve_exact(
    W: torch.Tensor, H: torch.Tensor, levels: Sequence[Level], st: DbSettings
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, Any, float]]:
    """Every level of one group with the exact solver: ``{id: (weight, keep, grid, predicted)}``
    (``optbrain.core.methods.obc.solve_obc_levels``), in float64 where ``methods.solve`` would
    promote the layer (``safe_dtype``)."""
    todo = [lv for lv in levels if not lv.is_dense]
    dtype = safe_dtype(W, H, torch.float32)
    solved = solve_obc_levels(
        W, H, todo, damp=st.damp, sym=st.sym, group_size=st.group_size, dtype=dtype
    )
    return {lv.id: sol for lv, sol in zip(todo, solved, strict=True)}


def _solve_fast(
    W: torch.Tensor, H: torch.Tensor, levels: Sequence[Level], st: DbSettings
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, Any, float]]:
    """Every level of one group with SparseGPT (pruned levels) / GPTQ (quantized only)."""
    out = {}
    for lv in levels:
        if lv.is_dense:
            continue
        res = compress_layer(
            W,
            H,
            sparsity=lv.sparsity or None,
            pattern=lv.pattern or "unstructured",
            bits=lv.bits,
            sym=st.sym,
            group_size=st.group_size,
            damp=st.damp,
            method="sparsegpt" if lv.prunes else "gptq",
        )
        out[lv.id] = (res.weight, res.mask, res.grid, float(res.loss))
    return out


def solve_levels(
    Ws: list[torch.Tensor],
    Hs: list[torch.Tensor],
    fit: Sequence[Level],
    st: DbSettings,
    solver: str,
    csize: int,
) -> tuple[list[dict[str, dict[str, Any]]], dict[str, torch.Tensor], float, float]:
    """One layer's unit of work (any executor, ``pipeline.executor``): every level of ``fit``
    for each group ``W_g (rows, cols)``, ``H_g (cols, cols)`` (channel levels with channels of
    ``csize`` columns). Returns the per-group stats ``{level: {nnz, loss, predicted,
    scales}}``, the tensors to store, the dense output energy ``Σ_g ½ Σ_r W_r H W_rᵀ`` and the
    seconds it took."""
    t0 = time.perf_counter()
    solve = _solve_exact if solver == "obc" else _solve_fast
    plain = [lv for lv in fit if not lv.channels]
    per_group = []
    tensors: dict[str, torch.Tensor] = {}
    energy = 0.0
    for g, (W, H) in enumerate(zip(Ws, Hs, strict=True)):
        H = H.to(W.device)
        rows, cols = W.shape
        energy += float(0.5 * ((W.double() @ H) * W.double()).sum())
        res = solve(W, H, plain, st)
        res.update(
            solve_channel_levels(
                W, H, fit, csize, damp=st.damp, sym=st.sym, group_size=st.group_size,
                exact=solver == "obc",
            )
        )  # fmt: skip
        stats = {}
        for lid, (w, keep, grid, predicted) in res.items():
            w = w.to(torch.float32)
            tensors[f"{lid}/{g}/weight"] = w.cpu()
            if keep is not None:
                tensors[f"{lid}/{g}/mask"] = keep.cpu().to(torch.uint8)
            if grid is not None:
                tensors[f"{lid}/{g}/scale"] = grid.scale.cpu().to(torch.float32)
                tensors[f"{lid}/{g}/zero"] = grid.zero.cpu().to(torch.float32)
            stats[lid] = {
                "nnz": int(keep.sum()) if keep is not None else rows * cols,
                "loss": float(row_losses(W, w, H).sum()),
                "predicted": float(predicted),
                "scales": int(grid.scale.numel()) if grid is not None else 0,
            }
        per_group.append(stats)
        del H
    return per_group, tensors, energy, time.perf_counter() - t0


def _layer_job(
    adapter: LayerAdapter,
    hessians: list,
    levels: Sequence[Level],
    st: DbSettings,
    site: list[dict[str, Any]] | str | None,
) -> tuple:
    """The arguments of ``solve_levels`` for one layer (the levels that fit it, ``"auto"``
    resolved here)."""
    csize = channel_size(adapter)
    producers = site if isinstance(site, list) else None
    fit = [
        lv
        for lv in levels
        if (
            lv.fits(adapter.cols) if not lv.channels else producers and lv.fits(adapter.cols, csize)
        )
    ]
    solver = st.solver
    if solver == "auto":
        solver = "obc" if exact_seconds(adapter, fit) <= st.time_budget else "fast"
    Ws = [adapter.weight(g) for g in range(adapter.groups)]
    return Ws, [acc.hessian() for acc in hessians], fit, st, solver, csize


def _layer_record(
    name: str,
    index: int,
    adapter: LayerAdapter,
    tokens: int,
    job: tuple,
    solved: tuple,
    input_shape: tuple[int, ...] | None,
    model_loss: ModelLoss | None,
    site: list[dict[str, Any]] | str | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A solved layer's record and tensors (model-level errors measured here, in the driver,
    which holds the model)."""
    _, _, fit, st, solver, csize = job
    per_group, tensors, energy, _ = solved
    producers = site if isinstance(site, list) else None
    G = adapter.groups
    entries: dict[str, Any] = {}
    for lv in fit:
        e: dict[str, Any] = {
            "sparsity": 0.0,
            "channels": lv.channels,
            "pattern": lv.pattern,
            "bits": lv.bits,
            "sym": st.sym if lv.quantizes else None,
            "group_size": st.group_size if lv.quantizes else None,
        }
        if lv.is_dense:
            e.update(nnz=adapter.params, loss=0.0, predicted=0.0, scales=0)
        else:
            for k in ("nnz", "loss", "predicted", "scales"):
                e[k] = sum(s[lv.id][k] for s in per_group)
        e["sparsity"] = 1.0 - e["nnz"] / adapter.params
        if lv.channels:
            k = int(round(lv.channels * (adapter.cols // csize)))
            e.update(removed_channels=k, **producer_savings(k, producers or []))
        entries[lv.id] = e
    if model_loss is not None:
        model_level_errors(adapter, entries, tensors, model_loss)
    positions = adapter.positions(input_shape) if input_shape is not None else 1
    record = {
        "format": FORMAT,
        "name": name,
        "index": index,
        "type": type(adapter.module).__name__,
        "kind": adapter.kind,
        "groups": G,
        "rows": adapter.rows,
        "cols": adapter.cols,
        "params": adapter.params,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "positions": int(positions),
        "tokens": int(tokens),
        "dense_energy": energy,
        "solver": solver,
        "channel_size": csize,
        "levels": entries,
    }
    if site is not None:
        record["channel_producers" if producers is not None else "channel_reason"] = site
    return record, tensors


def build_database(
    model: nn.Module,
    batches: Sequence[Any],
    root: str | os.PathLike,
    levels: Sequence[Level | str] | None = None,
    *,
    settings: DbSettings | None = None,
    forward: Forward | None = None,
    inputs: str = "all",
    seed: int | None = None,
    quiet: bool = True,
    on_layer: Callable[[str], None] | None = None,
    executor: str | Executor | None = None,
) -> Database:
    """Build (or resume, or reuse) the database of ``model`` in directory ``root``.

    batches: the calibration batches (a list; the optbrain batch convention, see
      ``optbrain.pipeline.data``). levels: the grid (None: the grid of an existing database,
      else ``default_levels()``); the dense level is always added.
    A database already in ``root`` whose fingerprint differs (model weights, calibration,
    levels, settings) raises ``DatabaseMismatchError``; its complete layers are reused, and
    asking ``model_level=True`` of one built without adds the model-level errors (from the
    stored weights, no re-solving).
    on_layer(name): called after each layer is written (progress hooks, tests).
    executor: where the layers' levels are solved (``optbrain.pipeline.executor``: ``"local"``,
      default; ``"ray"``; an ``Executor``): the driver writes each finished layer as it
      arrives, so an interrupted distributed build resumes from the layers written.
    The model is left unchanged (weights swapped for model-level errors are restored).
    """
    st = settings or DbSettings()
    make_executor(executor)  # an unknown executor, Ray not installed: the error, now
    root = Path(root)
    check_database_dir(root)
    batches = list(batches)
    if not batches:
        raise ValueError("calibration is empty: at least one batch is needed")
    old = None
    if (root / FINGERPRINT).is_file():
        old = Database(root).fingerprint
    if levels is None and old is not None:
        grid = normalize_levels(old["levels"])
    else:
        grid = normalize_levels(levels)
    if st.group_size is not None and any(lv.channels and lv.quantizes for lv in grid):
        raise ValueError(
            "channel levels with bits need per-row grids (group_size=None): once shrink removes "
            f"columns, quantization groups of {st.group_size} columns would no longer line up"
        )
    fp = fingerprint(model, batches, grid, st, seed=seed, inputs=inputs)
    layers, _ = find_layers(model)
    if not layers:
        raise ValueError("nothing to compress: the model has no compressible layer")
    fp["layer_order"] = list(layers)
    if old is not None:
        check_fingerprint(old, fp, root, levels_given=levels is not None)
    else:
        (root / "layers").mkdir(parents=True, exist_ok=True)
        atomic_json(root / FINGERPRINT, fp)
    (root / "layers").mkdir(parents=True, exist_ok=True)
    db = Database(root)
    pending = [n for n in db.layers if not db.is_complete(n, verify=True)]
    upgrade = st.model_level and not db.fingerprint["settings"].get("model_level")
    tied = bool(group_levels(db.levels)) and forward is None  # tied-group units to check
    if not pending and not upgrade and not tied:
        return db
    mloss = None
    if st.model_level:
        few = (
            batches
            if st.model_level_samples is None
            else take_samples(batches, st.model_level_samples)
        )
        mloss = ModelLoss(model, few, forward, inputs)
    seconds: dict[str, float] = {}
    if pending:
        seconds = _build_pending(
            model, batches, db, pending, layers, st, forward, inputs, mloss, quiet, on_layer,
            executor,
        )  # fmt: skip
    if upgrade:  # model-level errors for the layers built without them, then the fingerprint
        _add_model_level(db, layers, mloss, quiet)  # type: ignore[arg-type]
        fp = dict(db.fingerprint)
        fp["settings"] = {
            **fp["settings"],
            "model_level": True,
            "model_level_samples": st.model_level_samples,
        }
        atomic_json(root / FINGERPRINT, fp)
    out = Database(root)
    if tied:
        clean_stale(root / GROUPS)
        build_group_units(
            model, batches, out, damp=st.damp, inputs=inputs, forward=forward, model_loss=mloss
        )
    out.seconds = seconds
    return out


def check_database_dir(root: Path) -> None:
    """Refuse a ``root`` that is a file, or a directory holding something other than a budget
    database (building there would mix our files into someone else's); delete the temporary
    files of a killed build."""
    if root.exists() and not root.is_dir():
        raise DatabaseError(f"{root} is a file, not a budget database directory")
    clean_stale(root)
    clean_stale(root / "layers")
    if not root.is_dir() or (root / FINGERPRINT).is_file():
        return
    other = [p.name for p in root.iterdir() if not (p.name == "layers" and p.is_dir())]
    other += [f"layers/{p.name}" for p in (root / "layers").glob("*")]
    if other:
        raise DatabaseError(
            f"{root} is not empty and not a budget database (it holds {sorted(other)[:3]}); "
            "refusing to build inside it: pass an empty or new directory"
        )


def _add_model_level(
    db: Database, layers: dict[str, nn.Module], mloss: ModelLoss, quiet: bool
) -> None:
    todo = [
        n for n in db.layers if any("model_loss" not in e for e in db.record(n)["levels"].values())
    ]
    progress = Progress(len(todo), "model-level errors", enabled=not quiet)
    try:
        for name in todo:
            rec = json.loads(json.dumps(db.record(name)))
            model_level_errors(adapter_for(layers[name]), rec["levels"], db.tensors(name), mloss)
            atomic_json(db.stem(name).with_suffix(".json"), rec)
            progress.update(name)
    finally:
        progress.close()


def _producer_records(
    sites: dict[str, list[str] | str], adapters: dict[str, LayerAdapter], shapes: dict
) -> dict[str, list[dict[str, Any]] | str]:
    """Channel sites with each producer as ``{"name", "cols", "positions"}`` (a producer that
    is not a compressible layer, e.g. an Embedding, saves no counted cost: cols 0)."""
    out: dict[str, list[dict[str, Any]] | str] = {}
    for name, site in sites.items():
        if isinstance(site, str):
            out[name] = site
            continue
        recs = []
        for p in site:
            a = adapters.get(p)
            shape = shapes.get(p)
            pos = int(a.positions(shape)) if a is not None and shape is not None else 0
            recs.append({"name": p, "cols": a.cols if a is not None else 0, "positions": pos})
        out[name] = recs
    return out


def _build_pending(
    model: nn.Module,
    batches: Sequence[Any],
    db: Database,
    pending: list[str],
    layers: dict[str, nn.Module],
    st: DbSettings,
    forward: Forward | None,
    inputs: str,
    mloss: ModelLoss | None,
    quiet: bool,
    on_layer: Callable[[str], None] | None,
    executor: str | Executor | None = None,
) -> dict[str, float]:
    adapters = {n: adapter_for(layers[n]) for n in pending}
    sites: dict[str, Any] = {}
    if any(lv.channels for lv in db.levels):
        every = {n: adapter_for(m) for n, m in layers.items()}
        shapes = trace_input_shapes(model, every, batches[0], forward, inputs=inputs)
        sites = _producer_records(layer_sites(model, batches[0], inputs, forward), every, shapes)
    else:
        shapes = trace_input_shapes(model, adapters, batches[0], forward, inputs=inputs)
    hessians = collect_hessians(model, adapters, batches, forward, inputs=inputs)
    tokens = {n: hessians[n][0].tokens for n in pending}
    seconds: dict[str, float] = {}
    jobs = [_layer_job(adapters[n], hessians.pop(n), db.levels, st, sites.get(n)) for n in pending]
    progress = Progress(len(pending), "database", enabled=not quiet)

    def within(i: int) -> Any:  # the cost model's seconds, for layers solved exactly
        secs = exact_seconds(adapters[pending[i]], jobs[i][2])
        return progress.within(pending[i], secs if jobs[i][4] == "obc" else None)

    try:
        with using_executor(executor) as ex:
            for i, solved in ex.map(solve_levels, jobs, around=within):
                name = pending[i]
                rec, tensors = _layer_record(
                    name,
                    db.layers.index(name),
                    adapters[name],
                    tokens[name],
                    jobs[i],
                    solved,
                    shapes.get(name),
                    mloss,
                    sites.get(name),
                )
                jobs[i] = ()  # the layer's W and H are no longer needed
                stem = db.stem(name)
                rec["tensors_sha256"] = atomic_tensors(stem.with_suffix(".safetensors"), tensors)
                atomic_json(stem.with_suffix(".json"), rec)
                seconds[name] = solved[3]
                progress.update(name)
                if on_layer is not None:
                    on_layer(name)
    finally:
        progress.close()
    return seconds
