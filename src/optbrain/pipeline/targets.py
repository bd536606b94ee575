"""Dense targets in sequential mode: each layer's inputs from the compressed model, paired
token by token with the dense model's inputs, accumulated into ``CrossAccumulator`` objects
(``H̃``, the cross term ``C`` and the dense ``H``; see ``optbrain.core.targets``).

The dense model is a copy of the model taken before anything is compressed (``dense_copy``;
the same module names). For every calibration batch the dense model (or block) runs first and
its hooks keep each target call's input; the compressed model then runs on the same batch and
its hooks pair each call's input with the kept dense one, call by call.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter
from ..core.targets import CrossAccumulator
from .data import (
    CalibrationError,
    Forward,
    NonFiniteActivationError,
    StopForward,
    calibration_mode,
    forward_batch,
    layer_input,
)
from .hessians import _chunks, as_adapter


def dense_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the dense ``model`` (weights copied; eval mode)."""
    dense = copy.deepcopy(model)
    for p in dense.parameters():
        p.requires_grad_(False)
    return dense.eval()


class PairedHooks:
    """Hooks on ``targets`` (compressed modules) and the same layers in ``dense`` (the dense
    copy of the model or block the names are relative to) filling one ``CrossAccumulator``
    per group of each target.

    Run the dense side first for a batch, then the compressed side (``stop_after``: the
    compressed target after whose call the forward stops; the dense side stops there too).
    """

    def __init__(
        self,
        targets: Mapping[str, nn.Module | LayerAdapter],
        dense: nn.Module,
        *,
        dtype: torch.dtype = torch.float64,
        stop_after: str | None = None,
    ) -> None:
        self.adapters = {n: as_adapter(n, t) for n, t in targets.items()}
        self.dense = {n: dense.get_submodule(n) for n in self.adapters}
        self.stop_after = stop_after
        self.kept: dict[str, list[torch.Tensor]] = {n: [] for n in self.adapters}
        self.hessians: dict[str, list[CrossAccumulator]] = {
            n: [
                CrossAccumulator(a.cols, device=a.module.weight.device, dtype=dtype)
                for _ in range(a.groups)
            ]
            for n, a in self.adapters.items()
        }

    def attach_dense(self, handles: list) -> None:
        for n in self.adapters:
            handles.append(self.dense[n].register_forward_pre_hook(self._keep(n), with_kwargs=True))

    def attach(self, handles: list) -> None:
        for n, a in self.adapters.items():
            handles.append(a.module.register_forward_pre_hook(self._pair(n, a), with_kwargs=True))

    def _keep(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = layer_input(args, kwargs, name)
            if not torch.isfinite(x).all():
                raise NonFiniteActivationError(name)
            self.kept[name].append(x.detach())
            if name == self.stop_after:
                raise StopForward

        return hook

    def _pair(self, name: str, adapter: LayerAdapter):
        accs = self.hessians[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = layer_input(args, kwargs, name)
            if not torch.isfinite(x).all():
                raise NonFiniteActivationError(name)
            if not self.kept[name]:
                raise CalibrationError(
                    f"layer {name!r} was called more often in the compressed model than in the "
                    "dense copy; dense targets need both to run the same calls"
                )
            xd = self.kept[name].pop(0).to(x.device)
            for cx, dx in zip(_chunks(adapter, x), _chunks(adapter, xd), strict=True):
                rows = zip(adapter.input_rows(cx), adapter.input_rows(dx), strict=True)
                for acc, (rc, rd) in zip(accs, rows, strict=True):
                    acc.add_pair(rc, rd)
            if name == self.stop_after:
                raise StopForward

        return hook

    def end_batch(self) -> None:
        """After both sides of a batch ran: every dense call must have been paired."""
        left = [n for n, k in self.kept.items() if k]
        for n in left:
            self.kept[n].clear()
        if left:
            raise CalibrationError(
                f"layer(s) {left} were called more often in the dense copy than in the "
                "compressed model; dense targets need both to run the same calls"
            )

    def check_seen(self, where: str = "") -> None:
        missing = [n for n, accs in self.hessians.items() if accs[0].tokens == 0]
        if missing:
            raise CalibrationError(
                f"target layer(s) {missing} received no inputs during calibration{where}"
            )


def check_dense_blocks(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> None:
    """Blocks must carry their names in ``model`` (the dense copy is looked up by name)."""
    named = dict(model.named_modules())
    for bn, blk in blocks:
        if named.get(bn) is not blk:
            raise ValueError(f"dense targets need blocks named as in the model; {bn!r} is not")


def paired_pass(
    run: Callable[[nn.Module, str, int, Any, torch.device], Any],
    blocks: tuple[nn.Module, nn.Module],
    bname: str,
    inputs: tuple[list[Any], list[Any]],
    device: torch.device,
    hooks: PairedHooks,
) -> None:
    """Per stored input ``i``: ``run(dense block, bname, i, dense input, device)``, then the
    compressed block on its own input, ``hooks`` pairing the layer inputs (removed after)."""
    block, dblock = blocks
    cur, dcur = inputs
    handles: list = []
    try:
        hooks.attach_dense(handles)
        hooks.attach(handles)
        for i, (inp, dinp) in enumerate(zip(cur, dcur, strict=True)):
            run(dblock, bname, i, dinp, device)
            run(block, bname, i, inp, device)
            hooks.end_batch()
    finally:
        for h in handles:
            h.remove()
    hooks.check_seen(f" of block {bname!r}")


def collect_paired(
    model: nn.Module,
    dense: nn.Module,
    targets: Mapping[str, LayerAdapter],
    calibration: list[Any],
    forward: Forward | None = None,
    *,
    inputs: str = "all",
) -> dict[str, list[CrossAccumulator]]:
    """``{name: [CrossAccumulator] * groups}`` for layers of ``model`` (named as in ``dense``):
    compressed-model inputs paired with the dense copy's, one forward of each per batch."""
    hooks = PairedHooks(targets, dense)
    with calibration_mode(dense) as dh, calibration_mode(model) as handles:
        hooks.attach_dense(dh)
        hooks.attach(handles)
        for i, batch in enumerate(calibration):
            forward_batch(dense, i, batch, forward, inputs)
            forward_batch(model, i, batch, forward, inputs)
            hooks.end_batch()
    hooks.check_seen()
    return hooks.hessians
