"""The typed compressed-layer state kept on a model: what was done to it, for save and load.

``optbrain.compress``, ``optbrain.budget.compress_to_budget`` and ``optbrain.load``
attach a ``ModelState`` to the model (``model._optbrain``); ``optbrain.save`` reads it.
Per layer a ``LayerState`` (the plan that was applied and one ``GroupState`` per group of a
grouped convolution, 1 otherwise), per group the mask and quantization grid that describe the
written weight::

    ModelState(recipe, layers={name: LayerState(plan, groups=[GroupState(mask, scale, zero,
               bits, sym, group_size)]}, report, bn_recalibrated, loaded_from)

The states read like the dicts they replace (``state["layers"]["fc"]["groups"][0]["mask"]``,
``state["report"] = ...``), and convert to / from exactly the tensor and manifest layout of a
run directory (``GroupState.to_manifest`` / ``from_manifest``), so run directories written
before the state was typed still load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..core.result import LayerResult

STATE_ATTR = "_optbrain"
GROUP_PARTS = ("mask", "scale", "zero")


class _Fields:
    """Read (and set) the dataclass fields by name, as the untyped dicts were."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.keys():
            raise KeyError(key)
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]  # type: ignore[arg-type]


@dataclass
class GroupState(_Fields):
    """One group's written weight: mask (bool, True = kept; None when not pruned) and grid
    (``scale`` / ``zero`` tensors, ``bits``, ``sym``, ``group_size``; None when not quantized).
    """

    mask: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    bits: int | None = None
    sym: bool | None = None
    group_size: int | None = None

    @classmethod
    def from_result(cls, res: LayerResult) -> GroupState:
        """The state of a solver's result (tensors copied to the CPU)."""
        grid = res.grid
        return cls(
            mask=None if res.mask is None else res.mask.cpu(),
            scale=None if grid is None else grid.scale.cpu(),
            zero=None if grid is None else grid.zero.cpu(),
            bits=res.bits,
            sym=None if grid is None else grid.sym,
            group_size=None if grid is None else grid.group_size,
        )

    def to_manifest(self, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The manifest entry of this group; its tensors are put in ``tensors`` under
        ``{prefix}.{mask|scale|zero}`` (the mask as uint8)."""
        info: dict[str, Any] = {"bits": self.bits, "sym": self.sym, "group_size": self.group_size}
        for part in GROUP_PARTS:
            t = getattr(self, part)
            if t is None:
                continue
            key = f"{prefix}.{part}"
            tensors[key] = (t.to(torch.uint8) if part == "mask" else t).contiguous()
            info[part] = key
        return info

    @classmethod
    def from_manifest(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> GroupState:
        """The group written by ``to_manifest`` (the mask back as bool)."""
        parts = {p: tensors.get(info[p]) if p in info else None for p in GROUP_PARTS}
        if parts["mask"] is not None:
            parts["mask"] = parts["mask"].bool()
        return cls(
            **parts, bits=info.get("bits"), sym=info.get("sym"), group_size=info.get("group_size")
        )


@dataclass
class LayerState(_Fields):
    """One compressed layer: the plan applied (``LayerPlan.to_dict()`` or a budget level's
    plan, as written to the manifest) and one ``GroupState`` per group."""

    plan: dict[str, Any]
    groups: list[GroupState] = field(default_factory=list)


@dataclass
class ModelState(_Fields):
    """What was done to a model: the recipe (as a dict), the compressed layers by qualified
    name, the report (``Report.to_dict()``, or None until known), whether batch-norm statistics
    were re-estimated, and the run directory it was loaded from (None when compressed here)."""

    recipe: dict[str, Any]
    layers: dict[str, LayerState] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    bn_recalibrated: bool = False
    loaded_from: str | None = None
    shrink: dict[str, Any] | None = None  # optbrain.shrink's report and replayable ops
    shrink_example: Any = None  # the example inputs shrink traced (tensor, tuple or dict)

    def attach(self, model: nn.Module) -> ModelState:
        """Keep this state on ``model`` (replacing any earlier one); returns it."""
        model.__dict__[STATE_ATTR] = self
        return self


def compressed_state(model: nn.Module) -> ModelState:
    """What ``compress`` did to ``model`` (raises if it was not compressed)."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise ValueError("this model was not compressed by optbrain.compress (nothing to save)")
    return state


class WeightBackup:
    """CPU copies of the dense weights written so far; ``restore`` puts them back."""

    def __init__(self) -> None:
        self.originals: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(self, weight: torch.Tensor) -> None:
        """Copy ``weight`` before it is first overwritten."""
        self.originals.append((weight, weight.detach().to("cpu", copy=True)))

    def restore(self) -> None:
        """Put back the dense weights kept so far (latest first)."""
        with torch.no_grad():
            for p, dense in reversed(self.originals):
                p.copy_(dense.to(p.device))
        self.originals.clear()

    @contextmanager
    def restoring(self) -> Iterator[WeightBackup]:
        """On any failure inside, ``restore`` and re-raise: no half-compressed model."""
        try:
            yield self
        except BaseException:
            self.restore()
            raise


# ------------------------------------------------------------------------------ planning ----
