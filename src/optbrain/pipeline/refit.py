"""Refit a compressed model to its dense original: every layer's kept weights re-solved, layer by
layer in forward order, so that fed by the compressed model it reproduces the dense outputs
(``optbrain.core.refit``; zeros stay zeros, so masks and ``shrink`` are unchanged).

This is the pass after the solvers: structured levels (whole channels removed) and the budget
stitcher compress each layer against its own dense inputs, and the errors add up along the
network; the refit lets every layer — the compressed ones and the dense ones between them —
compensate for what the layers before it changed. It runs the dense copy beside the model
(``pipeline.targets.PairedHooks``) through the one sequential traversal
(``pipeline.visit.visit_sequential``): each layer's ``H̃ = 2X̃ᵀX̃/N`` and ``C = 2X̃ᵀX/N`` come
from the model with the layers before it already refitted.

Left alone (and reported with the reason): quantized layers (a refit would leave their grid),
layers ``find_layers`` skips (tied weights, ...), layers not named in ``layers`` and layers
named in ``ignore`` (a recipe's top-level ``ignore``: never changed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter, adapter_for, find_layers
from ..core.hessian import HessianAccumulator
from ..core.refit import masked_refit, refit_losses
from ..core.spec import DEFAULT_DAMP, check_damp
from ..core.targets import CrossAccumulator
from ..recipe_rules import _check_patterns, _matches, class_names
from .data import Forward
from .progress import phase
from .state import STATE_ATTR, GroupState, LayerState, ModelState, WeightBackup
from .visit import visit_sequential

#: The plan recorded for a layer the solvers left dense and the refit changed.
REFIT_PLAN = {"method": "refit"}


@dataclass
class RefitLayer:
    """One refitted layer: measured ``‖X̃ŵ − Xw_d‖²/N`` summed over rows and groups before
    and after, the calibration tokens, the mask kind (``"none"`` | ``"columns"`` | ``"rows"``)
    and seconds."""

    name: str
    loss_before: float
    loss_after: float
    tokens: int
    mask: str
    seconds: float


@dataclass
class RefitReport:
    """What ``refit_to_dense`` did: the refitted layers in order, the layers left alone with
    their reason, λ's relative ``damp`` and the wall time."""

    damp: float
    layers: list[RefitLayer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        before = sum(r.loss_before for r in self.layers)
        after = sum(r.loss_after for r in self.layers)
        ratio = f"{after / before:.3f}" if before > 0 else "n/a"
        return (
            f"refit {len(self.layers)} layer(s) to the dense outputs in {self.seconds:.1f} s: "
            f"summed layer error {before:.4g} → {after:.4g} ({ratio}×); "
            f"{len(self.skipped)} left alone"
        )


def _mask_kind(masks: list[torch.Tensor | None]) -> str:
    kinds = {
        "none" if m is None else "columns" if bool((m == m[:1]).all()) else "rows" for m in masks
    }
    return "rows" if "rows" in kinds else "columns" if "columns" in kinds else "none"


def plan_refit(
    model: nn.Module,
    dense: nn.Module,
    layers: Sequence[str] | str | None = None,
    state: dict[str, LayerState] | None = None,
    ignore: Sequence[str] | str = (),
) -> tuple[dict[str, LayerAdapter], dict[str, str]]:
    """The layers to refit ``{name: adapter}`` and those left alone ``{name: reason}``
    (``state``: the compressed layers' states; ``layers`` / ``ignore``: module-name patterns,
    globs or ``re:``, or class names, as in a recipe); raises ValueError when ``dense`` is not
    the model's dense original (the model itself, a layer missing, of another shape, device or
    dtype) or a pattern is malformed — before any calibration."""
    if dense is model:
        raise ValueError(
            "the dense model is the model itself: pass a dense copy made before compression"
        )
    if layers is not None:
        layers = _check_patterns(layers, (), "layers", "refit", False)
    ignore = _check_patterns(ignore, (), "ignore", "refit", True)
    targets, skipped = find_layers(model)
    dense_mods = dict(dense.named_modules())
    out: dict[str, LayerAdapter] = {}
    for name, module in targets.items():
        d = dense_mods.get(name)
        if d is None or getattr(d, "weight", None) is None:
            raise ValueError(f"the dense model has no layer {name!r}: pass the model's original")
        if tuple(d.weight.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"layer {name!r} is {tuple(module.weight.shape)} here but "
                f"{tuple(d.weight.shape)} in the dense model: refit before shrink, with the "
                "model's dense original"
            )
        if (d.weight.device, d.weight.dtype) != (module.weight.device, module.weight.dtype):
            raise ValueError(
                f"layer {name!r} is {module.weight.dtype} on {module.weight.device} here but "
                f"{d.weight.dtype} on {d.weight.device} in the dense model: move the dense "
                "model to the model's device and dtype"
            )
        classes = class_names(module)
        if layers is not None and not _matches(name, layers, classes):
            skipped[name] = "not in the refit's layers"
            continue
        if _matches(name, ignore, classes):
            skipped[name] = "ignored (never changed)"
            continue
        entry = None if state is None else state.get(name)
        if entry is not None and any(g.bits is not None for g in entry.groups):
            skipped[name] = "quantized: a refit would leave its grid"
            continue
        out[name] = adapter_for(module)
    if layers is not None:
        unknown = [
            p
            for p in layers
            if not any(_matches(n, [p], class_names(m)) for n, m in targets.items())
        ]
        if unknown:
            raise ValueError(f"refit layers {unknown} match no compressible layer of the model")
    return out, skipped


def refit_to_dense(
    model: nn.Module,
    dense: nn.Module,
    calibration: list[Any],
    *,
    forward: Forward | None = None,
    inputs: str = "all",
    damp: float = DEFAULT_DAMP,
    layers: Sequence[str] | str | None = None,
    state: dict[str, LayerState] | None = None,
    ignore: Sequence[str] | str = (),
    backup: WeightBackup | None = None,
) -> RefitReport:
    """Refit ``model`` (compressed, not yet shrunk) in place to the outputs of ``dense`` (its
    dense original, same module names) on the ``calibration`` batches (the batch convention of
    ``optbrain.pipeline.data``). damp: λ relative to mean(diag H̃) (``core.refit``).
    layers: names or patterns (glob, ``re:``, class names) to refit (None: every layer that
    can be); ignore: patterns of layers never changed.

    state: the compressed layers' states (masks and grids; None: the model's ``ModelState``
    layers, when it has one); it gets the layers the refit changed that were not compressed
    (plan ``{"method": "refit"}``, no mask or grid) so ``optbrain.save`` keeps them. If
    anything fails, the weights are put back: the model is left as it was. backup: the
    caller's ``WeightBackup`` to keep the original weights in (a caller with later steps that
    may fail restores them all; default: one of its own).
    """
    check_damp(damp)
    t0 = time.perf_counter()
    if state is None:
        attached: ModelState | None = model.__dict__.get(STATE_ATTR)
        state = None if attached is None else attached.layers
    adapters, skipped = plan_refit(model, dense, layers, state, ignore)
    report = RefitReport(damp=damp, skipped=skipped)
    dense_adapters = {n: adapter_for(dense.get_submodule(n)) for n in adapters}

    def masks(name: str, a: LayerAdapter) -> list[torch.Tensor | None]:
        """The recorded masks. A layer without one keeps the zeros it has: on a model from
        optbrain (a state) the layer was not compressed, so only whole zero input columns
        count (removed by hand or an earlier run: ``shrink`` must still find them zero; an
        exact zero inside a dense layer is not a mask, and would cost a solve per row); on a
        model pruned elsewhere (no state) every zero weight stays zero."""
        entry = None if state is None else state.get(name)
        if entry is not None and any(g.mask is not None for g in entry.groups):
            return [g.mask for g in entry.groups]
        out: list[torch.Tensor | None] = []
        for g in range(a.groups):
            live = a.weight(g).detach().ne(0)
            if state is not None:
                live = live.any(0).expand_as(live)
            out.append(None if bool(live.all()) else live.clone())
        return out

    def visit(name: str, module: nn.Module, hessians: list[HessianAccumulator]) -> None:
        s0 = time.perf_counter()
        a, d = adapters[name], dense_adapters[name]
        ms = masks(name, a)
        before = after = 0.0
        backup.keep(module.weight)
        for g, acc in enumerate(hessians):
            assert isinstance(acc, CrossAccumulator)
            Ht, C, H = acc.hessian(), acc.cross(), acc.dense_hessian()
            W, Wd = a.weight(g), d.weight(g).to(a.weight(g).device)
            new = masked_refit(W, Wd, Ht, C, ms[g], damp=damp)
            b, f = refit_losses(Wd, W, new, Ht, C, H)
            if f <= b:  # never worse on the calibration set (equal up to rounding otherwise)
                a.set_weight(g, new)
            else:
                f = b
            before, after = before + b, after + f
        secs = time.perf_counter() - s0
        kind = _mask_kind(ms)
        report.layers.append(RefitLayer(name, before, after, hessians[0].tokens, kind, secs))
        ratio = f"{after / before:.3f}×" if before > 0 else "–"
        bar.update(f"{name}: error {ratio}")

    backup = WeightBackup() if backup is None else backup
    with backup.restoring():
        if adapters:
            bar = phase(len(adapters), "refit", unit="layer")  # a line per layer when verbose
            try:
                visit_sequential(
                    model,
                    calibration,
                    adapters,
                    visit,
                    forward=forward,
                    inputs=inputs,
                    dense=dense,
                )
            finally:
                bar.close()
    if state is not None:
        for r in report.layers:
            if r.name not in state:
                groups = [GroupState() for _ in range(adapters[r.name].groups)]
                state[r.name] = LayerState(plan=dict(REFIT_PLAN), groups=groups)
    report.seconds = time.perf_counter() - t0
    return report
