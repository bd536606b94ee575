"""Channel levels of the budget database: where they apply, their solve, their producer savings.

A channel level ``"c0.25"`` removes 25% of a layer's input channels (a conv input channel is
its ``kh·kw`` columns, a Linear input feature one column) with structured OBS
(``core/structured.py``): ONE greedy trace per layer (group) gives every channel level
(``StructuredTrace.solve``), quantization on top for compounds (``"c0.25+b8"``) as the
unstructured path does it (OBQ of the kept weights under the same mask, exact solver; GPTQ on
the kept columns, fast solver).

Where: only layers whose input channels ``optbrain.shrink`` removes on their own
(``pipeline.shrink_sites.channel_sites``: one consumer, per-channel ops between it and its
producers, one producer channel per input channel). Others (grouped / depthwise convs, inputs
tied by a residual add or read by another layer, the model's input, a flatten in between) get
no channel level; the database record says why (``channel_reason``).

Producer savings: removing ``k`` input channels of a layer also removes ``k`` output channels
(rows) of each producer. They are attributed to the consumer's level: ``producer_params =
k · Σ_p cols_p`` and ``producer_flops = 2 · k · Σ_p positions_p · cols_p`` (stored in the level
entry, subtracted by ``costs.level_cost``). This is exact unless a producer is itself pruned by
a channel level: then the rows removed from it are shorter than counted, and the saving is
over-counted by at most ``k_c/n_c · k_p/n_p`` of the producer's dense cost (the achieved cost
after ``shrink`` is measured in the report).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter
from ..core.layer import compress_layer
from ..core.methods.obc import exact_quantize
from ..core.spec import make_spec
from ..core.structured import group_columns, removed_count, structured_obs
from ..pipeline.data import take_samples
from ..pipeline.shrink_sites import channel_sites
from .levels import Level

__all__ = ["channel_size", "layer_sites", "producer_savings", "solve_channel_levels"]


def channel_size(adapter: LayerAdapter) -> int:
    """Columns per input channel: ``kh·kw`` for a conv, 1 for a Linear."""
    return math.prod(getattr(adapter, "kernel", (1,)))


def layer_sites(
    model: nn.Module, batch: Any, inputs: str, forward: Any = None
) -> dict[str, list[str] | str]:
    """``channel_sites`` of ``model`` on the first sample of a calibration ``batch``."""
    if forward is not None:
        return {
            n: "channel levels need the model's plain call (a custom forward was given)"
            for n, _ in model.named_modules()
        }
    one = take_samples([batch], 1)[0]
    example = one[0] if inputs == "first" and isinstance(one, tuple | list) else one
    return channel_sites(model, example)


def producer_savings(removed: int, producers: Sequence[dict[str, Any]]) -> dict[str, int]:
    """``{"producer_params", "producer_flops"}`` of removing ``removed`` rows of each producer
    (``{"cols", "positions"}`` records; see the module docstring)."""
    return {
        "producer_params": removed * sum(int(p["cols"]) for p in producers),
        "producer_flops": 2
        * removed
        * sum(int(p["cols"]) * int(p["positions"]) for p in producers),
    }


def _keep_mask(keep_groups: torch.Tensor, g: int, rows: int) -> torch.Tensor:
    return group_columns(keep_groups, g).unsqueeze(0).expand(rows, -1).clone()


def solve_channel_levels(
    W: torch.Tensor,
    H: torch.Tensor,
    levels: Sequence[Level],
    g: int,
    *,
    damp: float,
    sym: bool,
    group_size: int | None,
    exact: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, Any, float]]:
    """Every channel level of one group: ``{id: (weight, keep (rows, cols), grid, predicted)}``.

    One structured-OBS trace up to the largest fraction; each level is the trace's
    least-squares optimum for its kept channels (``StructuredTrace.solve``, the arithmetic of
    ``solve_structured(method="obc")``). Bits on top: ``exact`` → OBQ of the kept weights under
    the mask (``exact_quantize``, as ``solve_obc_levels``); else GPTQ on the kept columns with
    ``H`` restricted to them (per-row grids only: ``group_size`` must be None).
    """
    todo = [lv for lv in levels if lv.channels]
    if not todo:
        return {}
    n = W.shape[1] // g
    top = max(lv.channels for lv in todo)
    removed_count(top, n)  # at least one channel must stay
    trace = structured_obs(W, H, g, damp=damp, max_fraction=top)
    rows = W.shape[0]
    out: dict[str, tuple[torch.Tensor, torch.Tensor, Any, float]] = {}
    for lv in todo:
        weight, keep_g, loss, _ = trace.solve(lv.channels)
        keep = _keep_mask(keep_g.to(W.device), g, rows)
        grid = None
        if lv.bits is not None:
            if exact:
                qspec = make_spec(
                    W.shape[1], bits=lv.bits, sym=sym, group_size=group_size, damp=damp,
                    dtype=torch.float32,
                )  # fmt: skip
                weight, grid, step = exact_quantize(weight, keep, trace.prepared, qspec)
                loss += float(step.sum())
            else:
                weight, grid, qloss = _gptq_kept(weight, H, keep[0], lv.bits, sym, group_size, damp)
                loss += qloss
        out[lv.id] = (weight, keep, grid, float(loss))
    return out


def _gptq_kept(
    weight: torch.Tensor,
    H: torch.Tensor,
    cols: torch.Tensor,
    bits: int,
    sym: bool,
    group_size: int | None,
    damp: float,
) -> tuple[torch.Tensor, Any, float]:
    """GPTQ of the kept columns ``cols (C,)`` of ``weight`` with ``H[cols][:, cols]``."""
    if group_size is not None:  # build_database refuses it first
        raise ValueError("channel levels with bits need per-row grids (group_size=None)")
    F = cols.nonzero().squeeze(1)
    res = compress_layer(
        weight.index_select(1, F), H[F][:, F], bits=bits, sym=sym, damp=damp, method="gptq"
    )
    out = torch.zeros_like(weight)
    out[:, F] = res.weight.to(out.dtype)
    return out, res.grid, float(res.loss)
