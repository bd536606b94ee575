"""Whole-model API: ``compress(model, calibration, recipe) -> Report`` (``save``/``load``: export).

``compress`` finds every compressible layer (``optbrain.adapters``), asks the recipe what to do
with each, collects Hessians from the calibration data (``independent``: all layers from the
dense model in one pass, as OBC; ``sequential``: block by block from the compressed blocks
before, as GPTQ, or layer by layer in a model without a block list), solves each layer (per
group for grouped convolutions) with ``optbrain.core.layer.compress_layer``, writes the weights
back in place, and returns a ``Report``. What was done is kept on the model
(``model._optbrain``) so that ``save`` can write it and ``load`` can apply it to a fresh copy
without recompressing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .adapters import LayerAdapter, adapter_for, find_layers
from .core.hessian import HessianAccumulator, row_losses
from .core.layer import compress_layer
from .pipeline import collect_hessians, find_blocks, recalibrate_batchnorm, sequential_compress
from .pipeline.data import Forward
from .pipeline.progress import Progress
from .recipe import LayerPlan, Recipe
from .report import LayerRecord, Report, peak_memory_tracker

STATE_ATTR = "_optbrain"


def _leading_dim(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = _leading_dim(v)
            if n is not None:
                return n
    if isinstance(batch, (tuple, list)):
        for v in batch:
            n = _leading_dim(v)
            if n is not None:
                return n
    return None


def _trim(batch: Any, n: int, full: int) -> Any:
    """The first ``n`` samples of a batch whose tensors share the leading dimension ``full``."""
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() and batch.shape[0] == full else batch
    if isinstance(batch, Mapping):
        return (
            type(batch)({k: _trim(v, n, full) for k, v in batch.items()})
            if not hasattr(batch, "data")
            else {k: _trim(v, n, full) for k, v in batch.items()}
        )
    if isinstance(batch, tuple):
        return tuple(_trim(v, n, full) for v in batch)
    if isinstance(batch, list):
        return [_trim(v, n, full) for v in batch]
    return batch


def take_samples(calibration: Any, samples: int) -> list[Any]:
    """The calibration batches holding the first ``samples`` samples (a sample is one entry of
    a batch's leading dimension; the last batch is cut to fit). Materialised as a list, since
    calibration may be iterated more than once."""
    if calibration is None:
        raise ValueError("calibration is None; pass an iterable of model inputs")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise ValueError(
            f"calibration must be an iterable of model inputs, got {type(calibration).__name__}"
        )
    out, seen = [], 0
    for batch in calibration:
        n = _leading_dim(batch) or 1
        if seen + n > samples:
            batch = _trim(batch, samples - seen, n)
            n = samples - seen
        out.append(batch)
        seen += n
        if seen >= samples:
            break
    if not out:
        raise ValueError("calibration is empty: it yielded no batches")
    return out


def _record_skip(name: str, module: nn.Module, reason: str) -> LayerRecord:
    w = getattr(module, "weight", None)
    shape = tuple(w.shape) if isinstance(w, torch.Tensor) else ()
    return LayerRecord(
        name=name, type=type(module).__name__, shape=shape, status="skipped", reason=reason
    )


class _Compressor:
    """Compresses one layer from its per-group Hessians and keeps what is needed to save it."""

    def __init__(
        self, plans: dict[str, LayerPlan], adapters: dict[str, LayerAdapter], progress: Progress
    ) -> None:
        self.plans = plans
        self.adapters = adapters
        self.progress = progress
        self.records: list[LayerRecord] = []
        self.state: dict[str, dict[str, Any]] = {}
        # (parameter, CPU copy of its dense value) for every weight written so far: ``restore``
        # puts them back when compression fails part-way (sequential mode writes block by block)
        self.originals: list[tuple[torch.Tensor, torch.Tensor]] = []

    def restore(self) -> None:
        """Put back the dense weights of the layers compressed so far."""
        with torch.no_grad():
            for p, dense in reversed(self.originals):
                p.copy_(dense.to(p.device))
        self.originals.clear()

    def __call__(self, name: str, module: nn.Module, hessians: list[HessianAccumulator]) -> None:
        plan = self.plans[name]
        adapter = self.adapters[name]
        entry: dict[str, Any] = {"plan": plan.to_dict(), "groups": []}
        self.originals.append((module.weight, module.weight.detach().to("cpu", copy=True)))
        for g, acc in enumerate(hessians):
            W = adapter.weight(g)
            H = acc.hessian()
            with peak_memory_tracker(W.device) as mem:
                res = compress_layer(W, H.to(W.device), method=plan.method, **plan.spec_kwargs())
            adapter.set_weight(g, res.weight)
            measured = float(row_losses(W, res.weight, H.to(W.device)).sum())
            rec = LayerRecord.from_result(
                res,
                name=name,
                type=type(module).__name__,
                tokens=acc.tokens,
                group=g if adapter.groups > 1 else None,
                measured_loss=measured,
                peak_memory_mb=mem.mb,
            )
            self.records.append(rec)
            entry["groups"].append(
                {
                    "mask": None if res.mask is None else res.mask.cpu(),
                    "scale": None if res.grid is None else res.grid.scale.cpu(),
                    "zero": None if res.grid is None else res.grid.zero.cpu(),
                    "bits": res.bits,
                    "sym": None if res.grid is None else res.grid.sym,
                    "group_size": None if res.grid is None else res.grid.group_size,
                }
            )
        self.state[name] = entry
        self.progress.update(name)


def compress(
    model: nn.Module,
    calibration: Any,
    recipe: Recipe | Mapping | str,
    *,
    forward: Forward | None = None,
    inputs: str = "all",
    quiet: bool = False,
    name: str | None = None,
) -> Report:
    """Compress ``model`` in place following ``recipe``; returns the per-layer ``Report``.

    calibration: an iterable of model inputs — tensors, tuples (positional arguments), dicts
      (keyword arguments, as transformers models take them) or a DataLoader of those; for
      labelled ``(x, y)`` batches pass ``inputs="first"``, or ``forward=fn(model, batch)``.
      At most ``recipe.calibration.samples`` samples are used.
    recipe: a ``Recipe``, a dict (shortest form ``{"method": "obc", "sparsity": 0.5}``) or a
      YAML path.
    quiet: no progress line.
    If anything fails (a calibration forward, a solver), no hook is left behind and the
    weights written so far are put back: the model is left as it was.
    """
    rec = Recipe.coerce(recipe)
    torch.manual_seed(rec.seed)
    t0 = time.perf_counter()
    layers, skipped = find_layers(model)
    if not layers:
        details = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:5])
        raise ValueError(
            "nothing to compress: the model has no compressible layer (Linear, Conv1d, Conv2d, "
            "transformers Conv1D)" + (f" [skipped: {details}]" if details else "")
        )
    typos = [u for u in rec.unmatched([*layers, *skipped]) if ".targets " in u]
    if typos:
        example = ", ".join(list(layers)[:4])
        raise ValueError(
            f"recipe {'; '.join(typos)} matches no layer of the model (a typo?); "
            f"layers are named like: {example}"
        )
    records: list[LayerRecord] = [
        _record_skip(n, model.get_submodule(n), r) for n, r in skipped.items()
    ]
    plans: dict[str, LayerPlan] = {}
    adapters: dict[str, LayerAdapter] = {}
    for lname, module in layers.items():
        plan = rec.plan(lname)
        if plan is None:
            records.append(_record_skip(lname, module, "the recipe asks nothing of this layer"))
            continue
        adapter = adapter_for(module)
        try:
            plan.spec(adapter.cols)
        except ValueError as e:
            records.append(_record_skip(lname, module, f"recipe does not fit this layer: {e}"))
            continue
        plans[lname] = plan
        adapters[lname] = adapter
    if not plans:  # a no-op recipe: nothing to calibrate, the model is left as it is
        model.__dict__[STATE_ATTR] = {
            "recipe": rec.to_dict(),
            "layers": {},
            "report": None,
            "bn_recalibrated": False,
        }
        report = _finish(model, records, rec, name, t0, 0)
        return report

    batches = take_samples(calibration, rec.calibration.samples)
    progress = Progress(len(plans), "compress", enabled=not quiet)
    comp = _Compressor(plans, adapters, progress)
    try:
        if rec.calibration.mode == "sequential":
            try:
                blocks = find_blocks(model)
            except ValueError:  # no block list (an MLP, a plain CNN): layer by layer below
                blocks = []
            inside = {f"{b}.{n}" for b, blk in blocks for n, _ in blk.named_modules()}
            in_blocks = [n for n in plans if n in inside]
            if in_blocks:
                prefix = {b: blk for b, blk in blocks}

                def targets_in_block(block: nn.Module) -> dict[str, nn.Module]:
                    bname = next(b for b, blk in prefix.items() if blk is block)
                    return {
                        n[len(bname) + 1 :]: adapters[n].module
                        for n in in_blocks
                        if n.startswith(bname + ".")
                    }

                sequential_compress(
                    model, batches, blocks, targets_in_block, comp, forward=forward, inputs=inputs
                )
            rest = [n for n in plans if n not in comp.state]
            if not blocks:
                for n in rest:  # each layer's H from the model with the layers before compressed
                    hess = collect_hessians(
                        model, {n: adapters[n]}, batches, forward, inputs=inputs
                    )
                    comp(n, adapters[n].module, hess[n])
                rest = []
        else:
            rest = list(plans)
        if rest:
            hess = collect_hessians(
                model, {n: adapters[n] for n in rest}, batches, forward, inputs=inputs
            )
            for n in rest:
                comp(n, adapters[n].module, hess[n])
        if rec.bn_recalibration:
            recalibrate_batchnorm(model, batches, forward, inputs=inputs)
    except BaseException:
        comp.restore()  # a failure part-way leaves the model as it was, not half compressed
        raise
    finally:
        progress.close()

    records.extend(comp.records)
    state = {
        "recipe": rec.to_dict(),
        "layers": comp.state,
        "report": None,
        "bn_recalibrated": bool(rec.bn_recalibration),
    }
    model.__dict__[STATE_ATTR] = state
    return _finish(model, records, rec, name, t0, len(batches))


def _finish(
    model: nn.Module,
    records: list[LayerRecord],
    rec: Recipe,
    name: str | None,
    t0: float,
    batches: int,
) -> Report:
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    records.sort(key=lambda r: (order.get(r.name, len(order)), r.group or 0))
    report = Report.create(
        records,
        model=name or type(model).__name__,
        recipe=rec.to_dict(),
        seconds=time.perf_counter() - t0,
        calibration_batches=batches,
        calibration_mode=rec.calibration.mode,
    )
    model.__dict__[STATE_ATTR]["report"] = report.to_dict()
    return report


def compressed_state(model: nn.Module) -> dict[str, Any]:
    """What ``compress`` did to ``model`` (raises if it was not compressed)."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError("this model was not compressed by optbrain.compress (nothing to save)")
    return state
