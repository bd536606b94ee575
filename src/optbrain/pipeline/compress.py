"""The one traversal of a model: plan the recipe per layer, calibrate and solve, finish.

``compress`` (public as ``optbrain.compress``) runs three steps:

1. ``plan_layers``: every compressible layer (``optbrain.adapters.find_layers``) gets the
   recipe's ``LayerPlan``, or a skip record saying why not (uncompressible, not asked for,
   a setting that does not fit the layer).
2. ``solve``: the planned layers' Hessians are collected from the calibration data and each
   layer is solved by a ``LayerCompressor``: ``independent`` mode, all layers from the dense
   model in one pass (as OBC); ``sequential`` mode, block by block from the compressed blocks
   before (as GPTQ), or layer by layer in a model without a block list, layers outside the
   blocks from one pass at the end; then batch norms are re-estimated if asked.
3. ``finish``: the records are sorted in module order into a ``Report`` and a ``ModelState``
   (``optbrain.pipeline.state``) is attached to the model for ``optbrain.save``.

If anything fails part-way, ``WeightBackup`` puts back the dense weights written so far (the
budget stitcher uses it too).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter, adapter_for, find_layers, head_dim_of
from ..core import ticks
from ..core.hessian import HessianAccumulator, row_losses
from ..core.layer import compress_layer
from ..core.methods import check_spec
from ..core.methods.auto import predicted_seconds
from ..core.patterns import parse_pattern
from ..core.result import LayerResult
from ..core.spec import make_spec
from ..core.targets import CrossAccumulator, compress_to_dense, target_loss
from ..recipe import LayerPlan, Recipe
from ..recipe_rules import class_names
from ..report import LayerRecord, Report, peak_memory_tracker
from .batchnorm import recalibrate_batchnorm
from .data import Forward, take_samples
from .executor import Executor, check_executor_mode, using_executor
from .hessians import collect_hessians
from .journal import Journal, journal_key, replay_layer
from .owl import apply_owl, check_owl_plans
from .progress import Progress, level, reporting, seconds_text
from .refit import RefitReport, refit_to_dense
from .state import GroupState, LayerState, ModelState, WeightBackup
from .targets import dense_copy
from .visit import visit_sequential

Plans = dict[str, LayerPlan]
#: modelled seconds of exact solving above which a run says so before it starts
NOTE_SOLVING_OVER = 60.0
Adapters = dict[str, LayerAdapter]


def skip_record(name: str, module: nn.Module, reason: str) -> LayerRecord:
    """The record of a layer left as it is, and why."""
    w = getattr(module, "weight", None)
    shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
    return LayerRecord(
        name=name, type=type(module).__name__, shape=shape, status="skipped", reason=reason
    )


def layer_kwargs(model: nn.Module, adapter: LayerAdapter, plan: LayerPlan) -> dict[str, Any]:
    """``plan.spec_kwargs()`` plus what a ``channels`` / ``heads`` pattern needs to know of the
    layer: its kernel positions per input channel, its conv groups, and the head size (from
    the model config unless the recipe gives ``head_dim`` or a pattern like ``heads64``)."""
    kw = plan.spec_kwargs()
    pat = parse_pattern(plan.pattern)
    if not pat.structured:
        return kw
    kw["kernel_positions"] = math.prod(getattr(adapter, "kernel", (1,)))
    kw["layer_groups"] = adapter.groups
    if pat.kind == "heads" and pat.head_dim is None and kw.get("head_dim") is None:
        kw["head_dim"] = head_dim_of(model)
    return kw


def plan_layers(model: nn.Module, rec: Recipe) -> tuple[Plans, Adapters, list[LayerRecord]]:
    """Per compressible layer the recipe's plan and adapter; skip records for the others.

    Raises ``ValueError`` when the model has no compressible layer or a recipe target
    matches no layer (a typo).
    """
    layers, skipped = find_layers(model)
    if not layers:
        details = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:5])
        raise ValueError(
            "nothing to compress: the model has no compressible layer (Linear, Conv1d, Conv2d, "
            "transformers Conv1D)" + (f" [skipped: {details}]" if details else "")
        )
    mods = dict(model.named_modules())
    classes = {c for n in [*layers, *skipped] for c in class_names(mods[n])}
    typos = [u for u in rec.unmatched([*layers, *skipped], classes) if ".targets " in u]
    if typos:
        example = ", ".join(list(layers)[:4])
        raise ValueError(
            f"recipe {'; '.join(typos)} matches no layer of the model (a typo?); "
            f"layers are named like: {example}"
        )
    records = [skip_record(n, model.get_submodule(n), r) for n, r in skipped.items()]
    plans: Plans = {}
    adapters: Adapters = {}
    for lname, module in layers.items():
        plan = rec.plan(lname, class_names(module))
        if plan is None:
            records.append(skip_record(lname, module, "the recipe asks nothing of this layer"))
            continue
        adapter = adapter_for(module)
        try:
            spec = make_spec(adapter.cols, **layer_kwargs(model, adapter, plan))
        except ValueError as e:
            records.append(skip_record(lname, module, f"recipe does not fit this layer: {e}"))
            continue
        rules = ", ".join(f"rules[{i}]" for i in plan.rules)  # options: before calibration
        check_spec(plan.method, spec, f"recipe {rules} on layer {lname!r}")
        plans[lname] = plan
        adapters[lname] = adapter
    return plans, adapters, records


# ------------------------------------------------------------------------ solving a layer ----
def solve_layer(
    Ws: list[torch.Tensor], mats: list[tuple[torch.Tensor, ...]], method: str, kwargs: dict
) -> list[tuple[LayerResult, float, float | None]]:
    """One layer's unit of work (any executor, ``pipeline.executor``): per group ``g`` the
    solver's result for ``W_g (rows, cols)`` under ``mats[g]`` — ``(H,)``, or ``(H̃, C, H)``
    for dense targets (``core.targets``) — with its measured loss (``½ Σ_r δ_r H δ_rᵀ``, or
    ``‖X̃ Ŵᵀ − X Wᵀ‖² / N`` against the dense outputs) and peak memory (MB). The trace of other
    levels is dropped (not kept by a run, and large to ship)."""
    out = []
    G = len(Ws)
    for g, (W, m) in enumerate(zip(Ws, mats, strict=True)):
        with peak_memory_tracker(W.device) as mem, ticks.part(g / G, (g + 1) / G):
            if len(m) == 3:
                res = compress_to_dense(W, *m, method=method, **kwargs)
            else:
                res = compress_layer(W, m[0].to(W.device), method=method, **kwargs)
        if len(m) == 3:
            measured = float(target_loss(W, res.weight, *m).sum())
        else:
            measured = float(row_losses(W, res.weight, m[0].to(W.device)).sum())
        res.trace = None
        out.append((res, measured, mem.mb))
    return out


class LayerCompressor:
    """Compresses one layer from its per-group Hessians and keeps its records and state.

    Called (``comp(name, module, hessians)``) it solves the layer here; ``run`` solves many
    independent layers on an executor and applies each result in the driver as it arrives.
    """

    def __init__(
        self, plans: Plans, adapters: Adapters, progress: Progress, model: nn.Module | None = None
    ) -> None:
        self.plans = plans
        self.adapters = adapters
        self.model = model
        self.progress = progress
        self.records: list[LayerRecord] = []
        self.state: dict[str, LayerState] = {}
        self.backup = WeightBackup()  # sequential mode writes block by block
        self.journal: Journal | None = None  # solved layers kept on disk (pipeline.journal)
        # the cost model's seconds per layer (None: a fast solver), for ETAs
        self.predicted = {n: self._predict(n) for n in plans}
        self.actual: dict[str, float] = {}
        self.refit: RefitReport | None = None  # the refit to the dense outputs, if asked

    def _kwargs(self, name: str) -> dict[str, Any]:
        """The solver's keyword arguments for layer ``name`` (``layer_kwargs``)."""
        plan = self.plans[name]
        if self.model is None:
            return plan.spec_kwargs()
        return layer_kwargs(self.model, self.adapters[name], plan)

    def _predict(self, name: str) -> float | None:
        adapter, plan = self.adapters[name], self.plans[name]
        spec = make_spec(adapter.cols, **self._kwargs(name))
        secs = predicted_seconds(plan.method, adapter.rows, adapter.cols, spec)
        return None if secs is None else secs * adapter.groups

    def eta(self) -> float | None:
        """Modelled seconds of the layers still to solve, scaled by how the solved ones went
        (actual / predicted so far); None when no layer left has a model."""
        left = [p for n, p in self.predicted.items() if p is not None and n not in self.actual]
        if not left:
            return None
        done = [(self.actual[n], p) for n, p in self.predicted.items() if p and n in self.actual]
        ratio = sum(a for a, _ in done) / sum(p for _, p in done) if done else 1.0
        return sum(left) * ratio

    def job(self, name: str, hessians: list[HessianAccumulator], consume: bool = False) -> tuple:
        """The arguments of ``solve_layer`` for ``name``. ``consume``: plain accumulators hand
        their sums over (``take``, left empty) in the solver's compute dtype, which it casts H
        to anyway (the same weights; the measured loss is then taken under that H)."""
        adapter = self.adapters[name]
        kwargs = self._kwargs(name)
        dtype = make_spec(adapter.cols, **kwargs).dtype if consume else None
        Ws = [adapter.weight(g) for g in range(len(hessians))]
        mats = [
            (acc.hessian(), acc.cross(), acc.dense_hessian())
            if isinstance(acc, CrossAccumulator)  # dense targets (core.targets)
            else (acc.take().to(dtype) if consume else acc.hessian(),)
            for acc in hessians
        ]
        return Ws, mats, self.plans[name].method, kwargs

    def apply(
        self,
        name: str,
        module: nn.Module,
        tokens: int,
        solved: list[tuple[LayerResult, float, float | None]],
        seconds: float | None = None,
    ) -> None:
        """Write a solved layer into ``module``; keep its records and state; progress
        (``seconds``: the wall time of its solve here; default the solver's own times)."""
        adapter = self.adapters[name]
        entry = LayerState(plan=self.plans[name].to_dict())
        self.backup.keep(module.weight)
        for g, (res, measured, mb) in enumerate(solved):
            adapter.set_weight(g, res.weight.to(adapter.weight(g).device))
            rec = LayerRecord.from_result(
                res,
                name=name,
                type=type(module).__name__,
                tokens=tokens,
                group=g if adapter.groups > 1 else None,
                measured_loss=measured,
                peak_memory_mb=mb,
            )
            self.records.append(rec)
            entry.groups.append(GroupState.from_result(res))
        self.state[name] = entry
        if self.journal is not None:
            weights = [adapter.weight(g) for g in range(adapter.groups)]
            self.journal.write(name, weights, self.records[-len(solved) :], entry)
        secs = sum(r.seconds for r in self.records[-len(solved) :])
        self.actual[name] = secs if seconds is None else seconds
        eta = self.eta()
        rest = f"; solving left ~{seconds_text(eta)} by the cost model" if eta else ""
        self.progress.update(f"{name} ({self.records[-1].method}, {secs:.1f} s{rest})")

    def __call__(self, name: str, module: nn.Module, hessians: list[HessianAccumulator]) -> None:
        if replay_layer(self, name):
            return
        job = self.job(name, hessians)
        t0 = time.perf_counter()
        with self.progress.within(name, self.predicted.get(name)):
            solved = solve_layer(*job)
        self.apply(name, module, hessians[0].tokens, solved, time.perf_counter() - t0)

    def run(
        self, hessians: dict[str, list[HessianAccumulator]], executor: Executor | None = None
    ) -> None:
        """Solve the independent layers ``hessians`` (name -> per-group accumulators) on
        ``executor`` (None: here); records and state end in ``hessians``' order whatever
        order the units finish in."""
        hessians = {n: hs for n, hs in hessians.items() if not replay_layer(self, n)}
        if executor is None or executor.local:
            for n, hs in hessians.items():
                self(n, self.adapters[n].module, hs)
            return
        names = list(hessians)
        jobs = [self.job(n, hessians[n]) for n in names]
        for i, solved in executor.map(solve_layer, jobs):
            n = names[i]
            self.apply(n, self.adapters[n].module, hessians[n][0].tokens, solved)
        order = {n: k for k, n in enumerate(names)}
        new = [r for r in self.records if r.name in order]
        old = [r for r in self.records if r.name not in order]
        self.records = old + sorted(new, key=lambda r: (order[r.name], r.group or 0))
        self.state = {
            **{k: v for k, v in self.state.items() if k not in order},
            **{n: self.state[n] for n in names},
        }


# ---------------------------------------------------------------------- calibrate + solve ----
def _solve_sequential(
    model: nn.Module,
    batches: list[Any],
    comp: LayerCompressor,
    forward: Forward | None,
    inputs: str,
    dense: nn.Module | None = None,
) -> list[str]:
    """Block by block (or layer by layer without blocks); returns the layers left for one
    independent pass (those outside the blocks). ``dense``: a dense copy of the model runs
    beside it and every layer (also those outside the blocks, one by one) is fitted to the
    dense outputs (``optbrain.core.targets``, recipe ``targets: dense``)."""
    adapters = {n: comp.adapters[n] for n in comp.plans}
    return visit_sequential(
        model, batches, adapters, comp, forward=forward, inputs=inputs, dense=dense
    )


def solve(
    model: nn.Module,
    batches: list[Any],
    rec: Recipe,
    comp: LayerCompressor,
    forward: Forward | None = None,
    inputs: str = "all",
    executor: Executor | None = None,
) -> None:
    """Calibrate and solve every planned layer of ``comp`` following ``rec.calibration.mode``
    (the independent layers' units on ``executor``, default here), then re-estimate batch
    norms if ``rec.bn_recalibration``. The model is left as it was if anything fails."""
    with comp.backup.restoring():
        sequential = rec.calibration.mode == "sequential"
        dense_targets = sequential and rec.calibration.targets == "dense"
        # the dense reference of dense targets and of the refit (one copy for both)
        dense = dense_copy(model) if rec.refit or dense_targets else None
        if sequential:
            paired = dense if dense_targets else None
            rest = _solve_sequential(model, batches, comp, forward, inputs, paired)
        else:
            rest = list(comp.plans)
        if rest:
            hess = collect_hessians(
                model, {n: comp.adapters[n] for n in rest}, batches, forward, inputs=inputs
            )
            comp.run(hess, executor)
        if rec.refit:
            assert dense is not None
            comp.refit = refit_to_dense(
                model,
                dense,
                batches,
                forward=forward,
                inputs=inputs,
                state=comp.state,
                ignore=rec.ignore,
                backup=comp.backup,
            )
            comp.progress.note(comp.refit.summary())
        if rec.bn_recalibration:
            recalibrate_batchnorm(model, batches, forward, inputs=inputs)


# ----------------------------------------------------------------------------- finishing ----
def sort_records(model: nn.Module, records: list[LayerRecord]) -> list[LayerRecord]:
    """``records`` in module order (groups of one layer in group order), in place."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    records.sort(key=lambda r: (order.get(r.name, len(order)), r.group or 0))
    return records


def finish(
    model: nn.Module,
    records: list[LayerRecord],
    rec: Recipe,
    state: ModelState,
    name: str | None,
    t0: float,
    batches: int,
) -> Report:
    """The ``Report`` of a run; ``state`` (with the report) is attached to ``model``."""
    report = Report.create(
        sort_records(model, records),
        model=name or type(model).__name__,
        recipe=rec.to_dict(),
        seconds=time.perf_counter() - t0,
        calibration_batches=batches,
        calibration_mode=rec.calibration.mode,
    )
    state.report = report.to_dict()
    state.attach(model)
    return report


def compress(
    model: nn.Module,
    calibration: Any,
    recipe: Recipe | Mapping | str,
    *,
    forward: Forward | None = None,
    inputs: str = "all",
    quiet: bool = False,
    name: str | None = None,
    executor: str | Executor | None = None,
    journal: str | os.PathLike | None = None,
) -> Report:
    """Compress ``model`` in place following ``recipe``; returns the per-layer ``Report``.

    calibration: an iterable of model inputs — tensors, tuples (positional arguments), dicts
      (keyword arguments, as transformers models take them) or a DataLoader of those; for
      labelled ``(x, y)`` batches pass ``inputs="first"``, or ``forward=fn(model, batch)``.
      At most ``recipe.calibration.samples`` samples are used.
    recipe: a ``Recipe``, a dict (shortest form ``{"method": "obc", "sparsity": 0.5}``) or a
      YAML path.
    quiet: no progress line.
    executor: where the per-layer solves run (``optbrain.pipeline.executor``): ``"local"``
      (default), ``"ray"`` (a local Ray for the run, or ``RAY_ADDRESS``) or an ``Executor``
      such as ``RayExecutor(address="head:6379")``; the same weights and report either way.
      Independent mode only: in sequential mode a layer's Hessian depends on the layers
      compressed before it, so Ray is refused there.
    journal: a directory where each solved layer is kept as it finishes
      (``optbrain.pipeline.journal``): rerun the same call after a kill or an interrupt and
      the layers solved before are replayed, not solved again (same weights and report). It
      is left in place: ``report.metadata["journal"]`` names it for ``journal.discard`` once
      the result is saved.
    If anything fails (a calibration forward, a solver), no hook is left behind and the
    weights written so far are put back: the model is left as it was.
    """
    rec = Recipe.coerce(recipe)
    check_executor_mode(executor, rec.calibration.mode)
    torch.manual_seed(rec.seed)
    t0 = time.perf_counter()
    plans, adapters, records = plan_layers(model, rec)
    if not plans:  # a no-op recipe: nothing to calibrate, the model is left as it is
        return finish(model, records, rec, ModelState(recipe=rec.to_dict()), name, t0, 0)
    if rec.allocation.method == "owl":
        check_owl_plans(plans, rec.allocation)
    batches = take_samples(calibration, rec.calibration.samples)
    if rec.allocation.method == "owl":  # per-block sparsities from the dense model's outliers
        apply_owl(model, plans, adapters, batches, rec.allocation, forward, inputs)
    progress = Progress(len(plans), "compress", enabled=not quiet)
    comp = LayerCompressor(plans, adapters, progress, model)
    if journal is not None:
        key = journal_key(model, batches, rec.to_dict(), inputs, forward)
        comp.journal = Journal(journal, key)
        for line in comp.journal.notes:
            progress.note(line)
    slow = [n for n, p in comp.predicted.items() if p]
    total = comp.eta()
    if total is not None and total > NOTE_SOLVING_OVER:
        progress.note(
            f"exact solving of {len(slow)} layer(s) predicted ~{seconds_text(total)} "
            "(cost model, optbrain.core.methods.auto)"
        )
    try:
        with reporting("quiet" if quiet else level() or "normal"), using_executor(executor) as ex:
            solve(model, batches, rec, comp, forward, inputs, ex)
    finally:
        progress.close()
    records.extend(comp.records)
    state = ModelState(
        recipe=rec.to_dict(), layers=comp.state, bn_recalibrated=bool(rec.bn_recalibration)
    )
    report = finish(model, records, rec, state, name, t0, len(batches))
    if comp.refit is not None:
        report.metadata["refit"] = comp.refit.to_dict()
    if comp.journal is not None:  # for the caller to discard once the result is saved
        report.metadata["journal"] = str(comp.journal.root)
    return report
