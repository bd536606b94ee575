"""Non-uniform compression to a global budget: database → costs → DP → stitched model + Report.

``compress_to_budget(model, calibration, target="flops=0.25")`` builds (or reuses) the
per-layer database, prices every (layer, level) with the target's cost model, chooses one level
per layer by dynamic programming (least summed error with total cost <= budget), writes the
chosen weights into the model through the layer adapters, and records masks and grids on
``model._optbrain`` (a ``ModelState``) so ``optbrain.save`` / ``load`` work as after
``optbrain.compress``.

Objectives (the error the DP sums): ``"relative"`` (default without model-level errors): the
layer-wise loss divided by the layer's dense output energy ``½ Σ_r W_r H W_rᵀ``, so layers with
large activations do not dominate; ``"loss"``: the raw layer-wise loss ``½ Σ_r δ_r H δ_rᵀ``;
``"model"`` (default with ``model_level=True``): the model-level calibration loss increase of
swapping in only that layer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_for, find_layers
from ..core.methods.auto import DATABASE_TIME_BUDGET
from ..core.spec import DEFAULT_DAMP
from ..pipeline.batchnorm import recalibrate_batchnorm
from ..pipeline.compress import sort_records
from ..pipeline.data import Forward, iter_batches, take_samples
from ..pipeline.executor import Executor, make_executor
from ..pipeline.refit import refit_to_dense
from ..pipeline.state import GroupState, LayerState, ModelState, WeightBackup
from ..pipeline.targets import dense_copy
from ..report import LayerRecord, Report
from .allocation import Allocation
from .costs import METRICS, Target, level_cost, parse_target
from .database import Database, DbSettings, build_database
from .groups import apply_group, group_cost, group_records, is_group
from .latency import LatencyCache, latency_table
from .levels import Level, structured_levels
from .solver import DEFAULT_RESOLUTION, BudgetError, Solution, solve_dp
from .store import FINGERPRINT, database_root

OBJECTIVES = ("relative", "loss", "model")
UNIFORM_SLACK = 0.005

__all__ = [
    "Allocation",
    "OBJECTIVES",
    "apply_allocation",
    "compress_to_budget",
    "plan_allocation",
]


def _error(rec: dict[str, Any], entry: dict[str, Any], objective: str) -> float:
    if objective == "loss":
        return float(entry["loss"])
    if objective == "relative":
        energy = float(rec["dense_energy"])
        return float(entry["loss"]) / energy if energy > 0 else float(entry["loss"])
    if "model_loss" not in entry:
        raise ValueError(
            "objective 'model' needs model-level errors: build the database with model_level=True"
        )
    return float(entry["model_loss"])


def _load_timing(timing: Mapping | str | Path | None) -> Mapping | None:
    if timing is None or isinstance(timing, Mapping):
        return timing
    return json.loads(Path(timing).read_text())


def plan_allocation(
    db: Database,
    target: str | Target,
    objective: str = "relative",
    *,
    timing: Mapping[str, Mapping[str, float]] | str | Path | None = None,
    resolution: int = DEFAULT_RESOLUTION,
    uniform: bool = False,
    slack: float = UNIFORM_SLACK,
) -> Allocation:
    """Choose one level per layer of ``db`` meeting ``target``.

    uniform: the same level for every layer instead (among the levels every layer has, the
    one with the least summed error whose cost is within ``budget · (1 + slack)``) — the
    baseline for comparisons. The slack lets a nominal level through whose per-layer rounding
    of pruned counts lands a hair above the budget (e.g. 85% of 2,304 weights keeps 346, not
    345.6); to compare at equal cost, give the DP the uniform allocation's cost as an absolute
    target (``benchmarks/bench_budget.py`` does). The DP itself never exceeds the budget.
    Raises ``BudgetError`` when nothing meets the budget.
    """
    tgt = parse_target(target)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    table = _load_timing(timing)
    names = list(db.layers)
    ids: list[list[str]] = []
    costs: list[list[Fraction]] = []
    errors: list[list[float]] = []
    dense: dict[str, Fraction] = {}
    for n in names:
        rec = db.record(n)
        lids = list(rec["levels"])
        ids.append(lids)
        costs.append([level_cost(tgt.metric, rec, rec["levels"][i], i, table) for i in lids])
        errors.append([_error(rec, rec["levels"][i], objective) for i in lids])
        dense[n] = costs[-1][lids.index("dense")]
    for rec in group_records(db):  # tied groups: one unit each, costs are savings (dense 0)
        lids = list(rec["levels"])
        names.append(rec["name"])
        ids.append(lids)
        costs.append([group_cost(tgt.metric, rec, i, table) for i in lids])
        errors.append([_error(rec, rec["levels"][i], objective) for i in lids])
        dense[rec["name"]] = Fraction(0)
    dense_cost = sum(dense.values(), Fraction(0))
    budget = tgt.budget(dense_cost)
    if uniform:
        common = [i for i in ids[0] if all(i in row for row in ids[1:])]
        best: Solution | None = None
        for lid in common:
            choice = [row.index(lid) for row in ids]
            cost = sum((costs[l][j] for l, j in enumerate(choice)), Fraction(0))
            err = float(sum(errors[l][j] for l, j in enumerate(choice)))
            if cost <= budget * (1 + Fraction(slack)) and (
                best is None or err < best.error or (err == best.error and cost > best.cost)
            ):
                best = Solution(choice, cost, err)
        if best is None:
            raise BudgetError(
                f"no single level shared by all layers meets {tgt.text} "
                f"(budget {float(budget):.6g} of dense {float(dense_cost):.6g})"
            )
        sol = best
    else:
        sol = solve_dp(costs, errors, budget, resolution)
    return Allocation(
        target=tgt,
        objective=objective,
        levels={n: ids[l][j] for l, (n, j) in enumerate(zip(names, sol.choice, strict=True))},
        costs={n: costs[l][j] for l, (n, j) in enumerate(zip(names, sol.choice, strict=True))},
        errors={n: errors[l][j] for l, (n, j) in enumerate(zip(names, sol.choice, strict=True))},
        dense_cost=dense_cost,
        budget=budget,
        cost=sol.cost,
        error=sol.error,
        uniform=uniform,
        exact=sol.exact,
        resolution=int(resolution),
        dense_costs=dense,
    )


def apply_allocation(
    model: nn.Module, db: Database, alloc: Allocation, backup: WeightBackup | None = None
) -> dict[str, LayerState]:
    """Write the chosen levels' weights into ``model`` (in place); returns the per-layer state
    kept on ``model._optbrain.layers`` (masks, grids) for ``optbrain.save``. If a write
    fails, the weights written so far are put back. backup: the caller's ``WeightBackup`` to
    keep the dense weights in (a caller with later steps restores them all if one fails)."""
    modules = dict(model.named_modules())
    state: dict[str, LayerState] = {}
    writes = []
    grecs = {r["name"]: r for r in group_records(db)}
    tied = [(grecs[n], lid) for n, lid in alloc.levels.items() if is_group(n) and lid != "dense"]
    for name, lid in alloc.levels.items():
        if lid == "dense" or is_group(name):
            continue
        module = modules.get(name)
        adapter = adapter_for(module) if module is not None else None
        if adapter is None:
            raise ValueError(f"layer {name!r} of the database is not a compressible layer here")
        rec = db.record(name)
        entry = rec["levels"][lid]
        layer = LayerState(plan=_level_plan(rec, lid, entry, db.fingerprint["settings"]["damp"]))
        for g, t in enumerate(db.level_weights(name, lid)):
            writes.append((adapter, g, t["weight"]))
            layer.groups.append(
                GroupState(
                    mask=None if t["mask"] is None else t["mask"].bool(),
                    scale=t["scale"],
                    zero=t["zero"],
                    bits=entry["bits"],
                    sym=entry["sym"],
                    group_size=entry["group_size"],
                )
            )
        state[name] = layer
    backup = WeightBackup() if backup is None else backup
    with backup.restoring():  # leave the model as it was, not half stitched
        for adapter, g, w in writes:
            if g == 0:
                backup.keep(adapter.module.weight)
            adapter.set_weight(g, w)
        for rec, lid in tied:  # a consumer of a group is dense in its own unit
            for c in rec["consumers"]:
                if c in state:
                    raise ValueError(f"layer {c!r} has a level of its own and of {rec['name']}")
                backup.keep(modules[c].weight)
            state.update(apply_group(model, db, rec, lid, db.fingerprint["settings"]["damp"]))
    return state


def _level_plan(rec: dict[str, Any], lid: str, entry: dict[str, Any], damp: float) -> dict:
    """The plan recorded for a layer stitched at level ``lid`` (as ``LayerPlan.to_dict``)."""
    lv = Level.parse(lid)
    return {
        "method": rec["solver"],
        "level": lid,
        "sparsity": lv.sparsity or lv.channels or None,
        "pattern": "channels" if lv.channels else lv.pattern or "unstructured",
        "bits": lv.bits,
        "sym": entry["sym"] if entry["sym"] is not None else True,
        "group_size": entry["group_size"],
        "damp": damp,
        "dtype": "float32",
        "options": {},
    }


def achieved_entry(model: nn.Module, name: str, entry: dict[str, Any], lid: str) -> dict:
    """The level entry with ``nnz`` counted on the model's weights (pruned levels only:
    weights outside the mask must be zero; quantized weights that round to zero are counted
    as kept unless the level prunes)."""
    if not Level.parse(lid).prunes:
        return entry
    adapter = adapter_for(model.get_submodule(name))
    nnz = sum(int(torch.count_nonzero(adapter.weight(g))) for g in range(adapter.groups))
    return {**entry, "nnz": nnz}


def _materialise(calibration: Any, samples: int | None) -> list[Any]:
    if samples is not None:
        return take_samples(calibration, samples)
    if isinstance(calibration, Iterable) and not isinstance(calibration, (torch.Tensor, Mapping)):
        return [b for _, b in iter_batches(calibration)]
    return [calibration]


def compress_to_budget(
    model: nn.Module,
    calibration: Any,
    target: str | Target = "flops=0.25",
    levels: Sequence[Level | str] | None = None,
    db_dir: str | Path | None = None,
    *,
    inputs: str = "all",
    forward: Forward | None = None,
    objective: str | None = None,
    model_level: bool = False,
    model_level_samples: int | None = None,
    solver: str = "auto",
    damp: float = DEFAULT_DAMP,
    sym: bool = True,
    group_size: int | None = None,
    time_budget: float = DATABASE_TIME_BUDGET,
    samples: int | None = None,
    seed: int | None = None,
    timing: Mapping[str, Mapping[str, float]] | str | Path | None = None,
    latency_batch: int = 1,
    latency_cache: LatencyCache | None = None,
    bn_recalibration: bool = False,
    refit: bool = False,
    resolution: int = DEFAULT_RESOLUTION,
    uniform: bool = False,
    quiet: bool = False,
    name: str | None = None,
    executor: str | Executor | None = None,
) -> Report:
    """Compress ``model`` in place to meet ``target`` with a per-layer level allocation.

    calibration / inputs / forward: as ``optbrain.compress`` (``samples``: use only the first
      ``samples`` samples; ``seed``: recorded in the database fingerprint).
    target: ``"flops=0.25"``, ``"bops=1/12"``, ``"size=0.3"``, ``"params=4x"``,
      ``"latency=0.5"``, an absolute ``"flops=1.2e9"`` (see ``optbrain.budget.costs``).
    timing: the latency table ``{layer: {level: ms}}`` (or a JSON path); None with a latency
      target: measured on this machine at batch ``latency_batch`` (``budget/latency.py``,
      cached per machine in ``latency_cache``, default ``~/.cache/optbrain/latency``).
    levels: the level grid (ids like ``"s0.5+b4"``, ``"c0.25"``; None: an existing database's
      grid, else ``default_levels()``, or ``structured_levels()`` for a latency target —
      in torch eager only removed channels run faster). db_dir: the database directory
      (built, resumed or reused; None: a temporary one). objective: "relative" | "loss" |
      "model" (see the module docstring).
    model_level / model_level_samples / solver / damp / sym / group_size / time_budget:
      database settings (``DbSettings``). resolution: DP units. uniform: one level for all
      layers (the baseline). bn_recalibration: re-estimate the batch norms' running statistics
      on the calibration batches after the levels are written (``recalibrate_batchnorm``).
      refit: then (before the batch norms) refit every layer to the dense outputs
      (``optbrain.pipeline.refit``; ``metadata["refit"]``).
      executor: where the database's layers are solved (``"local"``, ``"ray"`` or an
      ``Executor``, ``optbrain.pipeline.executor``); the same database either way.

    Channel levels leave the model masked (whole input columns zero); ``optbrain.shrink``
    then removes them for real (the CLI and ``app.runs.run_zoo_budget`` do).

    Returns a ``Report`` (one record per layer, the layers kept dense as "skipped" with their
    reason; ``metadata["allocation"]``: target, budget, chosen levels, predicted and achieved
    cost). The model must be the dense model the database was built from.
    """
    t0 = time.perf_counter()
    make_executor(executor)  # an unknown executor, Ray not installed: the error, now
    tgt = parse_target(target)
    measure = tgt.metric == "latency" and timing is None
    if (
        measure
        and levels is None
        and not (db_dir is not None and (Path(db_dir) / FINGERPRINT).is_file())
    ):
        levels = structured_levels()
    if objective is None:
        objective = "model" if model_level else "relative"
    if objective == "model" and not model_level:
        raise ValueError("objective='model' needs model_level=True")
    batches = _materialise(calibration, samples)
    settings = DbSettings(
        damp=damp,
        sym=sym,
        group_size=group_size,
        solver=solver,
        time_budget=time_budget,
        model_level=model_level,
        model_level_samples=model_level_samples,
    )
    with database_root(db_dir) as root:
        db = build_database(
            model,
            batches,
            root,
            levels,
            settings=settings,
            forward=forward,
            inputs=inputs,
            seed=seed,
            quiet=quiet,
            executor=executor,
        )
        t_db = time.perf_counter() - t0
        if measure:
            timing = latency_table(model, db, batch=latency_batch, cache=latency_cache)
        alloc = plan_allocation(
            db, tgt, objective, timing=timing, resolution=resolution, uniform=uniform
        )
        dense = dense_copy(model) if refit else None
        done = None
        with WeightBackup().restoring() as backup:  # every step below, or none of them
            state = apply_allocation(model, db, alloc, backup)
            if dense is not None:
                done = refit_to_dense(
                    model,
                    dense,
                    batches,
                    forward=forward,
                    inputs=inputs,
                    state=state,
                    backup=backup,
                )
            if bn_recalibration:
                recalibrate_batchnorm(model, batches, forward, inputs=inputs)
        report = _report(model, db, alloc, name, timing)
        if measure:
            report.metadata["allocation"]["latency_batch"] = latency_batch
        report.metadata["bn_recalibration"] = bn_recalibration
        if done is not None:
            report.metadata["refit"] = done.to_dict()
        report.metadata["database"] = None if db_dir is None else str(root)
        report.metadata["database_seconds"] = t_db
        report.metadata["database_layer_seconds"] = dict(db.seconds)  # the layers built now
        report.metadata["calibration_batches"] = len(batches)
        report.metadata["seconds"] = time.perf_counter() - t0
    ModelState(recipe=report.recipe, layers=state, report=report.to_dict()).attach(model)
    return report


def _report(
    model: nn.Module,
    db: Database,
    alloc: Allocation,
    name: str | None,
    timing: Any,
) -> Report:
    table = _load_timing(timing)
    records: list[LayerRecord] = []
    _, skipped = find_layers(model)
    achieved: dict[str, Fraction] = {}
    totals = {m: [Fraction(0), Fraction(0)] for m in METRICS if m != "latency"}
    by_group: dict[str, str] = {}
    for grec in group_records(db):
        glid = alloc.levels.get(grec["name"], "dense")
        achieved[grec["name"]] = alloc.costs.get(grec["name"], Fraction(0))
        for m, t in totals.items():
            t[1] += group_cost(m, grec, glid)
        if glid != "dense":
            by_group.update(dict.fromkeys(grec["consumers"], f"{grec['name']} {glid}"))
    for n in db.layers:
        rec = db.record(n)
        lid = alloc.levels[n]
        entry = rec["levels"][lid]
        got = achieved_entry(model, n, entry, lid)
        achieved[n] = level_cost(alloc.target.metric, rec, got, lid, table)
        for m, t in totals.items():
            t[0] += level_cost(m, rec, rec["levels"]["dense"], "dense")
            t[1] += level_cost(m, rec, got, lid)
        lv = Level.parse(lid)
        info = {
            "level": lid,
            "cost": float(alloc.costs[n]),
            "dense_cost": float(alloc.dense_costs[n]),
            "achieved_cost": float(achieved[n]),
            "error": alloc.errors[n],
            "nnz": got["nnz"],
            "solver": rec["solver"],
        }
        if "model_loss" in entry:
            info["model_loss"] = entry["model_loss"]
        shape = (rec["groups"] * rec["rows"], rec["cols"])
        common = dict(name=n, type=rec["type"], shape=shape, tokens=rec["tokens"], info=info)
        if lid == "dense" and n in by_group:  # written by its tied group's level
            info["level"] = info["tied_group"] = by_group[n]
            zero = 1.0 - float(adapter_for(model.get_submodule(n)).weight(0).any(0).float().mean())
            records.append(LayerRecord(**common, method="obc", sparsity=zero, pattern="channels"))
            continue
        if lid == "dense":
            records.append(
                LayerRecord(
                    **common, status="skipped", reason="the budget allocation keeps it dense"
                )
            )
            continue
        method = rec["solver"]
        if method == "fast":
            method = "sparsegpt" if lv.prunes else "gptq"
        records.append(
            LayerRecord(
                **common,
                method=method,
                sparsity=entry["sparsity"],
                bits=entry["bits"],
                pattern="channels"
                if lv.channels
                else lv.pattern or ("unstructured" if lv.sparsity else None),
                group_size=entry["group_size"],
                predicted_loss=entry["predicted"],
                measured_loss=entry["loss"],
            )
        )
    for n, reason in skipped.items():
        w = getattr(model.get_submodule(n), "weight", None)
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
        records.append(LayerRecord(name=n, shape=shape, status="skipped", reason=reason))
    sort_records(model, records)
    meta = alloc.to_dict()
    total = sum(achieved.values(), Fraction(0))
    meta["achieved_cost"] = float(total)
    meta["achieved_fraction"] = float(total / alloc.dense_cost) if alloc.dense_cost else None
    meta["within_budget"] = bool(total <= alloc.budget)
    meta["all_costs"] = {
        m: {"dense": float(d), "achieved": float(a), "fraction": float(a / d) if d else None}
        for m, (d, a) in totals.items()
    }
    recipe = {
        "budget": alloc.target.text,
        "objective": alloc.objective,
        "uniform": alloc.uniform,
        "levels": [lv.id for lv in db.levels],
        "settings": db.fingerprint["settings"],
    }
    return Report.create(
        records,
        model=name or type(model).__name__,
        recipe=recipe,
        calibration_mode="independent",
        allocation=meta,
    )
