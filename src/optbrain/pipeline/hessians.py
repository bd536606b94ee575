"""Independent (OBC) mode: every target layer's per-group Hessian from the dense model in one
pass over the calibration data, captured by forward pre-hooks.

For a target with ``G`` groups the result is ``G`` ``HessianAccumulator`` objects, accumulator
``g`` holding ``H_g = 2 X_gᵀ X_g / N`` over all calls of the layer (a layer called several
times per forward, e.g. shared weights, contributes every call), ``X_g`` from
``LayerAdapter.input_rows``. H does not depend on how the calibration data is batched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter, adapter_for, skip_reason
from ..core.hessian import HessianAccumulator
from .data import (
    CalibrationError,
    Forward,
    NonFiniteActivationError,
    StopForward,
    calibration_mode,
    check_inputs_option,
    forward_batch,
    forward_batches,
    layer_input,
)

# a conv input is unfolded in chunks of samples so one chunk holds at most this many numbers
MAX_UNFOLD_NUMEL = 1 << 24


def as_adapter(name: str, target: nn.Module | LayerAdapter) -> LayerAdapter:
    """``target`` as an adapter, or ``ValueError`` saying why it cannot be compressed."""
    if isinstance(target, LayerAdapter):
        return target
    adapter = adapter_for(target)
    if adapter is None:
        reason = skip_reason(target) or f"no layer adapter for {type(target).__name__}"
        raise ValueError(f"target {name!r} cannot be compressed: {reason}")
    return adapter


def _chunks(adapter: LayerAdapter, x: torch.Tensor) -> Iterable[torch.Tensor]:
    nd = getattr(adapter, "nd", None)
    if adapter.kind not in ("conv1d", "conv2d") or nd is None or x.dim() != nd + 2:
        return (x,)
    n = x.shape[0]
    per_sample = max(1, adapter.positions(x) * adapter.cols * adapter.groups)
    step = max(1, MAX_UNFOLD_NUMEL // per_sample)
    return x.split(step) if n > step else (x,)


class HessianHooks:
    """Forward pre-hooks adding each target's input rows to its per-group accumulators.

    ``stop_after``: name of a target after whose hook the forward is stopped (``StopForward``).
    """

    def __init__(
        self,
        targets: Mapping[str, nn.Module | LayerAdapter],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        stop_after: str | None = None,
    ) -> None:
        self.adapters = {n: as_adapter(n, t) for n, t in targets.items()}
        self.hessians: dict[str, list[HessianAccumulator]] = {}
        for n, a in self.adapters.items():
            dev = device if device is not None else a.module.weight.device
            self.hessians[n] = [
                HessianAccumulator(a.cols, device=dev, dtype=dtype) for _ in range(a.groups)
            ]
        self.stop_after = stop_after

    def attach(self, handles: list) -> None:
        for n, a in self.adapters.items():
            handles.append(a.module.register_forward_pre_hook(self._hook(n, a), with_kwargs=True))

    def _hook(self, name: str, adapter: LayerAdapter):
        accs = self.hessians[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = layer_input(args, kwargs, name)
            if not torch.isfinite(x).all():
                raise NonFiniteActivationError(name)
            for chunk in _chunks(adapter, x):
                for acc, rows in zip(accs, adapter.input_rows(chunk), strict=True):
                    acc.add(rows)
            if name == self.stop_after:
                raise StopForward

        return hook

    def check_seen(self, where: str = "") -> None:
        missing = [n for n, accs in self.hessians.items() if accs[0].tokens == 0]
        if missing:
            raise CalibrationError(
                f"target layer(s) {missing} received no inputs during calibration{where}: "
                "they are not called through their forward (functional use of the weight, "
                "an unused branch, or a module outside the model)"
            )


def collect_hessians(
    model: nn.Module,
    targets: Mapping[str, nn.Module | LayerAdapter],
    calibration: Any,
    forward: Forward | None = None,
    *,
    inputs: str = "all",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, list[HessianAccumulator]]:
    """Per-group Hessians of every target from one pass of the dense model over calibration.

    model: the model, run in eval mode under ``torch.no_grad`` (modes restored afterwards).
    targets: ``{name: module or LayerAdapter}`` (e.g. ``find_layers(model)[0]``); the names
      are only labels for results and errors.
    calibration / forward / inputs: the batch convention of ``optbrain.pipeline.data``;
      batches are moved to the model's device.
    device / dtype: where and in what precision ``Xᵀ X`` is accumulated (default: each layer's
      weight device, float64).

    Returns ``{name: [HessianAccumulator] * groups}``; ``acc.hessian()`` is
    ``H_g = 2 X_gᵀ X_g / N (cols, cols)`` and ``acc.tokens`` is ``N``.
    Raises ``ValueError`` for empty calibration or an uncompressible target,
    ``CalibrationError`` naming the batch when a forward fails or a target is never called,
    ``NonFiniteActivationError`` naming the layer on NaN/Inf inputs. Hooks are always removed.
    """
    check_inputs_option(inputs)
    if not targets:
        raise ValueError("no target layers given")
    hooks = HessianHooks(targets, device=device, dtype=dtype)
    with calibration_mode(model) as handles:
        hooks.attach(handles)
        forward_batches(model, calibration, forward, inputs)
    hooks.check_seen()
    return hooks.hessians


def trace_input_shapes(
    model: nn.Module,
    targets: Mapping[str, nn.Module | LayerAdapter],
    batch: Any,
    forward: Forward | None = None,
    *,
    inputs: str = "all",
) -> dict[str, tuple[int, ...]]:
    """Input shape of every target's first call on one batch (for cost models:
    ``adapter.macs(shape)``, ``adapter.output_shape(shape)``). Targets never called are absent.
    """
    check_inputs_option(inputs)
    shapes: dict[str, tuple[int, ...]] = {}
    with calibration_mode(model) as handles:
        for name, t in targets.items():
            module = t.module if isinstance(t, LayerAdapter) else t

            def hook(m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                if name not in shapes:
                    shapes[name] = tuple(layer_input(args, kwargs, name).shape)

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        forward_batch(model, 0, batch, forward, inputs)
    return shapes
