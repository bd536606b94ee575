"""Cost models of a layer at a compression level, and budget targets (``"flops=0.25"``).

All costs are per layer and summed over the layers in the database (layers that are not
compressible, biases, activations and non-weight operations are not counted: a relative budget
is a fraction of the compressible layers' dense cost). Costs are exact rationals
(``fractions.Fraction``) so that a budget check never suffers rounding.

With ``params = groups · rows · cols`` weights, ``nnz`` the weights the level keeps (its mask;
all of them when it does not prune), ``positions`` the output positions per sample seen during
calibration (``adapter.positions`` of the layer's input shape on the first calibration batch:
1 for a Linear on vectors, the sequence length for tokens, ``H_out · W_out`` for a Conv2d),
and ``b`` the weight bits
(``DENSE_BITS = 32`` when not quantized)::

    params   = nnz                                         kept weights
    flops    = 2 · positions · nnz                         per sample; dense = 2 · MACs
               (a Conv2d: 2 · out · in/groups · kh · kw · H_out · W_out · density)
    bops     = flops · b                                   weight bits only: activations are
               taken as fixed, so ratios equal those of bits_w · bits_a with a constant bits_a
               (the OBC paper's BOPs with unquantized activations)
    size     = (nnz · b + index + scales) / 8              bytes on disk
        index (unstructured): min(params, nnz · ⌈log2 cols⌉) bits — a bitmask, or a column
               index per kept weight, whichever is smaller; (N:M) nnz · ⌈log2 M⌉ bits (the
               position of each kept weight in its group of M, 2 bits for 2:4 as in sparse
               tensor cores); dense and channel levels (shrunk): none
        scales (quantized): one fp16 scale per row and quantization group (16 bits each) plus
               a b-bit zero point each when asymmetric
    latency  = timing[layer][level]                        ms: a user table (JSON), or measured
               on this machine for channel levels (``budget/latency.py``)

A channel level (``"c0.25"``) also removes its producers' matching output rows: the entry's
``producer_params`` / ``producer_flops`` (``budget/channels.py``) are subtracted from its
params / flops, and ``producer_flops · DENSE_BITS`` from its bops (the producer counted at
full precision); size counts the consumer only (conservative).

Worked example: ``Conv2d(4, 8, 3, padding=1)`` on 6×6 inputs has ``params = 8·4·3·3 = 288``,
``positions = 36``, dense ``flops = 2·36·288 = 20736``; at ``s0.75`` (72 kept) ``flops = 5184``,
``bops`` at ``s0.75+b4`` = ``5184 · 4``; dense ``size = 288·32/8 = 1152`` bytes.

Targets: ``"metric=value"``. ``value`` in (0, 1] is a fraction of the dense cost (``0.25``,
``1/12``, ``25%``, or ``4x`` = a 4× reduction); a value above 1 is absolute, in the metric's
unit (weights, FLOPs or BOPs per sample, bytes, milliseconds), e.g. ``flops=1.2e9``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

METRICS = ("params", "flops", "bops", "size", "latency")
DENSE_BITS = 32
SCALE_BITS = 16

__all__ = ["DENSE_BITS", "METRICS", "Target", "level_cost", "parse_target"]


def _index_bits(layer: Mapping[str, Any], entry: Mapping[str, Any]) -> int:
    nnz, params = int(entry["nnz"]), int(layer["params"])
    if entry.get("channels"):  # shrunk for real: a smaller dense matrix, no index
        return 0
    if entry.get("pattern"):
        m = int(str(entry["pattern"]).split(":")[1])
        return nnz * math.ceil(math.log2(m))
    if nnz < params:
        return min(params, nnz * max(1, math.ceil(math.log2(int(layer["cols"])))))
    return 0


def level_cost(
    metric: str,
    layer: Mapping[str, Any],
    entry: Mapping[str, Any],
    level_id: str | None = None,
    timing: Mapping[str, Mapping[str, float]] | None = None,
) -> Fraction:
    """Cost of one layer at one level (see the module docstring).

    layer: ``{"name", "params", "cols", "positions", ...}`` (a database layer record);
    entry: ``{"nnz", "bits", "pattern", "scales", "sym"}`` (a database level record).
    """
    nnz = int(entry["nnz"])
    bits = DENSE_BITS if entry.get("bits") is None else int(entry["bits"])
    p_params, p_flops = int(entry.get("producer_params", 0)), int(entry.get("producer_flops", 0))
    if metric == "params":
        return Fraction(nnz - p_params)
    if metric == "flops":
        return Fraction(2 * int(layer["positions"]) * nnz - p_flops)
    if metric == "bops":
        return Fraction(2 * int(layer["positions"]) * nnz * bits - p_flops * DENSE_BITS)
    if metric == "size":
        total = nnz * bits + _index_bits(layer, entry)
        if entry.get("bits") is not None:
            per_scale = SCALE_BITS + (0 if entry.get("sym", True) else bits)
            total += int(entry["scales"]) * per_scale
        return Fraction(total, 8)
    if metric == "latency":
        if timing is None:
            raise ValueError("the latency cost needs a timing table (layer -> level -> ms)")
        name = layer["name"]
        row = timing.get(name)
        if row is None or level_id not in row:
            raise ValueError(
                f"the timing table has no entry for layer {name!r} at level {level_id!r}; "
                "it needs every (layer, level) of the database, 'dense' included"
            )
        return Fraction(float(row[level_id]))
    raise ValueError(f"unknown cost metric {metric!r}; one of {', '.join(METRICS)}")


@dataclass(frozen=True)
class Target:
    """A budget: ``metric`` and ``value``, relative (a fraction of the dense cost) or absolute."""

    metric: str
    value: Fraction
    relative: bool
    text: str

    def budget(self, dense: Fraction) -> Fraction:
        """The absolute budget for a model whose dense cost is ``dense``."""
        return self.value * dense if self.relative else self.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "metric": self.metric,
            "value": float(self.value),
            "relative": self.relative,
        }


def _number(text: str, what: str) -> Fraction:
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return Fraction(_number(a, what)) / Fraction(_number(b, what))
        return Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{what}: cannot read the number {text!r}") from None


def parse_target(target: str | Target) -> Target:
    """``"flops=0.25"``, ``"bops=1/12"``, ``"size=30%"``, ``"flops=4x"``, ``"flops=1.2e9"``."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, str) or "=" not in target:
        raise ValueError(
            f"a target is 'metric=value' (metric one of {', '.join(METRICS)}), e.g. "
            f"'flops=0.25', 'bops=1/12', 'size=30%', 'flops=4x' or 'flops=1.2e9'; got {target!r}"
        )
    metric, raw = (s.strip() for s in target.split("=", 1))
    metric = metric.lower()
    if metric not in METRICS:
        raise ValueError(f"target {target!r}: unknown metric {metric!r}; one of {METRICS}")
    what = f"target {target!r}"
    raw_l = raw.lower().replace(" ", "")
    if raw_l.endswith("%"):
        value, relative = _number(raw_l[:-1], what) / 100, True
    elif raw_l.endswith("x"):
        factor = _number(raw_l[:-1], what)
        if factor < 1:
            raise ValueError(f"{what}: a reduction factor must be >= 1 (e.g. 4x)")
        value, relative = 1 / factor, True
    else:
        if not re.fullmatch(r"[0-9eE+\-./]+", raw_l):
            raise ValueError(f"{what}: cannot read the value {raw!r}")
        value = _number(raw_l, what)
        relative = value <= 1
    if value <= 0:
        raise ValueError(f"{what}: the budget must be positive")
    if relative and value > 1:
        raise ValueError(f"{what}: a fraction of the dense cost must be at most 1")
    return Target(metric, value, relative, f"{metric}={raw.strip()}")
