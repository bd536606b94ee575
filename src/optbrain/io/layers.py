"""What ``optbrain.compress`` did to a model, as the exporters read it (the one place they do).

``compressed_layers(model)`` returns, per compressed layer, its module, its adapter kind and one
``GroupState`` per weight group (grouped convolutions have several) with the mask and the
quantization grid. Everything else in the packed formats of ``optbrain.export`` goes through it, so
a change of how the state is kept on the model touches this file only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter, adapter_for
from ..core.grid import QuantGrid


@dataclass(frozen=True)
class GroupState:
    """One weight group of a compressed layer: mask (True = kept) and grid, each or both None."""

    mask: torch.Tensor | None
    grid: QuantGrid | None

    @property
    def bits(self) -> int | None:
        return None if self.grid is None else self.grid.bits


@dataclass(frozen=True)
class CompressedLayer:
    """A compressed layer: ``adapter.weight(g)`` is group ``g``'s 2-D weight ``(rows, cols)``."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    groups: list[GroupState]

    @property
    def kind(self) -> str:
        return self.adapter.kind

    @property
    def quantized(self) -> bool:
        return all(g.grid is not None for g in self.groups)

    @property
    def pruned(self) -> bool:
        return any(g.mask is not None for g in self.groups)


@dataclass
class ExportResult:
    """What an exporter wrote: files with their sizes, and the bytes of the compressed layers.

    ``layer_bytes``: bytes on disk of the compressed layers' weights with their scales and
    zero points; ``layer_fp32_bytes``: the same layers' weights at 4 bytes each;
    ``dense``: layers written as plain float weights, with the reason.
    """

    path: str
    format: str
    files: dict[str, int] = field(default_factory=dict)
    layer_bytes: int = 0
    layer_fp32_bytes: int = 0
    dense: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``layer_bytes / layer_fp32_bytes`` (0 when nothing was compressed)."""
        return self.layer_bytes / self.layer_fp32_bytes if self.layer_fp32_bytes else 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def _grid(group: dict[str, Any]) -> QuantGrid | None:
    if group.get("scale") is None or group.get("bits") is None:
        return None
    return QuantGrid(
        scale=group["scale"],
        zero=group["zero"],
        bits=int(group["bits"]),
        sym=bool(group["sym"]),
        group_size=group["group_size"],
    )


def compressed_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """The compressed layers of ``model`` (after ``optbrain.compress`` or ``optbrain.load``),
    in the order of ``named_modules``; raises ValueError if it was not compressed."""
    from ..api import compressed_state

    state = compressed_state(model)
    modules = dict(model.named_modules())
    out: dict[str, CompressedLayer] = {}
    for name in (n for n in modules if n in state["layers"]):
        entry = state["layers"][name]
        module = modules[name]
        adapter = adapter_for(module)
        if adapter is None or len(entry["groups"]) != adapter.groups:
            raise ValueError(f"layer {name!r} no longer matches what optbrain.compress did to it")
        groups = [
            GroupState(
                mask=None if g.get("mask") is None else g["mask"].bool(),
                grid=_grid(g),
            )
            for g in entry["groups"]
        ]
        out[name] = CompressedLayer(name=name, module=module, adapter=adapter, groups=groups)
    missing = [n for n in state["layers"] if n not in out]
    if missing:
        raise ValueError(f"layer {missing[0]!r} was compressed but is no longer in the model")
    return out
