"""Measured latency of every (layer, level) of a database on this machine (SPDY-style table).

``latency_table(model, db)`` times, in torch eager at batch ``batch``, each layer's shape at
each level and returns ``{layer: {level id: ms}}`` for ``costs.level_cost("latency", ...)``:

* dense, unstructured, N:M and quantized levels: the dense layer's time (torch eager runs a
  weight with zeros in it, or dequantized low-bit weights, at the dense speed — honest, not
  assumed proportional to FLOPs);
* a channel level removing ``k`` of ``n`` input channels: the layer at ``n − k`` input
  channels PLUS, for each producer (``budget/channels.py``), the producer's time at ``k``
  fewer output channels minus its dense time (the producer's saving is attributed to the
  consumer's level; when the producer is itself channel-pruned the two savings are added
  although they overlap, so the prediction is then optimistic — the measured latency of the
  shrunk model is what the report gives). A depthwise producer (EfficientNet's MBConv: the
  project conv's input channels are the depthwise conv's channels) is timed as a depthwise
  conv of ``k`` fewer channels; other grouped convs only at their dense shape.

Each shape is timed once per machine: a fresh module of that shape (random weights) on a
random input of the layer's calibration input shape with the batch set to ``batch``; the
fastest of ``repeats`` repeats of ``inner`` calls each (``inner`` grows until one repeat takes
about ``MIN_REPEAT_S``), warm-up excluded. The minimum rather than the median: on a machine
shared with other jobs the median of a few-millisecond window is inflated by whatever else
runs (measured here at load 4–9: the same shape timed 0.13 and 0.78 ms in one table), the
minimum is the estimate least disturbed (``timeit``'s advice). A channel level never costs
more than one keeping more channels of the same layer (the running minimum over the levels,
so that timing noise cannot make removing channels look slower). Times are cached in
``$XDG_CACHE_HOME/optbrain/latency/<machine key>.json`` (default ``~/.cache``; the key: CPU
model, torch threads, torch version); the file is written atomically, and a corrupt one is
rebuilt with a warning. Biases, activations, batch norms and other operations are not timed:
a relative latency target is a fraction of the compressible layers' summed time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import atomic_write
from ..pipeline.shrink_rules import is_depthwise
from .groups import group_records
from .levels import Level
from .store import Database

MIN_REPEAT_S = 2e-3
DEFAULT_REPEATS = 15

__all__ = ["LatencyCache", "latency_table", "machine_key", "time_module", "time_shape"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def machine_key() -> str:
    """``<cpu>-t<threads>-torch<version>-<hash>``: what a timing depends on besides the shape."""
    raw = f"{_cpu_model()}|{torch.get_num_threads()}|{torch.__version__}"
    slug = re.sub(r"[^a-z0-9]+", "-", _cpu_model().lower()).strip("-")[:40] or "cpu"
    digest = hashlib.sha256(raw.encode()).hexdigest()[:10]
    return f"{slug}-t{torch.get_num_threads()}-torch{torch.__version__.split('+')[0]}-{digest}"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optbrain" / "latency"


class LatencyCache:
    """Shape → milliseconds, kept in one JSON file per machine (``path``; None: in memory)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.times: dict[str, float] = {}
        self.dirty = False
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("times"), dict):
                raise ValueError("no 'times' table")
            self.times = {str(k): float(v) for k, v in data["times"].items()}
        except (OSError, ValueError, TypeError) as e:
            warnings.warn(
                f"latency cache {path} is unreadable ({e}); re-timing and rewriting it",
                stacklevel=2,
            )
            self.times, self.dirty = {}, True

    @classmethod
    def default(cls) -> LatencyCache:
        return cls(cache_dir() / f"{machine_key()}.json")

    def get(self, key: str, measure: Callable[[], float]) -> float:
        if key not in self.times:
            self.times[key] = float(measure())
            self.dirty = True
        return self.times[key]

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"machine": machine_key(), "times": self.times}))
        self.dirty = False


def _shape_spec(
    module: nn.Module, cin: int, cout: int, shape: list[int], batch: int, groups: int = 1
) -> dict:
    x = [batch, *shape[1:]]
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        x[1] = cin
        spec = {
            "op": type(module).__name__, "cin": cin, "cout": cout,
            "kernel": list(module.kernel_size), "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation), "bias": module.bias is not None, "x": x,
        }  # fmt: skip
        if groups > 1:  # a depthwise conv (groups == cin == cout); keys of others unchanged
            spec["groups"] = groups
        return spec
    x[-1] = cin
    return {"op": "Linear", "cin": cin, "cout": cout, "bias": _has_bias(module), "x": x}


def _csize(module: nn.Module) -> int:
    """Columns per input channel (``kh·kw`` of a conv, 1 for a Linear)."""
    return math.prod(getattr(module, "kernel_size", (1,)))


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def _build(spec: dict) -> nn.Module:
    if spec["op"] == "Linear":
        return nn.Linear(spec["cin"], spec["cout"], bias=spec["bias"])
    cls = nn.Conv1d if spec["op"] == "Conv1d" else nn.Conv2d
    pad = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
    return cls(spec["cin"], spec["cout"], tuple(spec["kernel"]), tuple(spec["stride"]), pad,
               tuple(spec["dilation"]), spec.get("groups", 1), spec["bias"])  # fmt: skip


def time_shape(spec: dict, repeats: int = DEFAULT_REPEATS, warmup: int = 2) -> float:
    """Milliseconds of one call of a fresh module of ``spec`` (``_shape_spec``, ``time_module``)."""
    return time_module(_build(spec), spec["x"], repeats, warmup)


def time_module(
    module: nn.Module, shape: list[int], repeats: int = DEFAULT_REPEATS, warmup: int = 2
) -> float:
    """Fastest milliseconds per call of ``module(x)`` over ``repeats`` repeats, on a random ``x``
    of ``shape`` (eval, no grad; see the module docstring)."""
    module.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        module(x)
        inner, t = 1, 0.0
        while True:  # calls per repeat: enough for the timer's resolution
            t0 = time.perf_counter()
            for _ in range(inner):
                module(x)
            t = time.perf_counter() - t0
            if t >= MIN_REPEAT_S or inner >= 1 << 14:
                break
            inner *= 2
        times = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                module(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) / inner)
    return 1000.0 * min(times)


def latency_table(
    model: nn.Module,
    db: Database,
    *,
    batch: int = 1,
    repeats: int = DEFAULT_REPEATS,
    cache: LatencyCache | None = None,
) -> dict[str, dict[str, float]]:
    """``{layer: {level id: ms}}`` for every layer and level of ``db`` (module docstring).

    model: the model the database was built from (for the layers' hyper-parameters).
    cache: where shapes' times are kept (default: this machine's file, ``LatencyCache.default``).
    """
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise ValueError(f"the latency batch must be a positive integer, got {batch!r}")
    cache = LatencyCache.default() if cache is None else cache
    records = {n: db.record(n) for n in db.layers}

    def ms(name: str, cin: int | None = None, cout: int | None = None) -> float:
        rec = records[name]
        module = model.get_submodule(name)
        if rec.get("input_shape") is None:
            raise ValueError(f"layer {name!r} was never called on calibration: no shape to time")
        c_in = int(rec["cols"]) * int(rec["groups"]) // _csize(module)
        c_out = int(rec["rows"]) * int(rec["groups"])
        if is_depthwise(module):  # a producer of a channel level: time it at ``cout`` channels
            c = cout or c_out
            spec = _shape_spec(module, c, c, rec["input_shape"], batch, groups=c)
            return cache.get(json.dumps(spec, sort_keys=True), lambda: time_shape(spec, repeats))
        if int(rec["groups"]) > 1:
            return _grouped_ms(module, rec, batch, repeats, cache)
        spec = _shape_spec(module, cin or c_in, cout or c_out, rec["input_shape"], batch)
        key = json.dumps(spec, sort_keys=True)
        return cache.get(key, lambda: time_shape(spec, repeats))

    table: dict[str, dict[str, float]] = {}
    try:
        for name, rec in records.items():
            dense = ms(name)
            row = {}
            n_in = int(rec["cols"]) // _csize(model.get_submodule(name))
            for lid, entry in rec["levels"].items():
                if not Level.parse(lid).channels:
                    row[lid] = dense
                    continue
                k = int(entry["removed_channels"])
                t = ms(name, cin=n_in - k)
                for p in rec.get("channel_producers", []):
                    if p["name"] in records:
                        rp = records[p["name"]]
                        rows_p = int(rp["rows"]) * int(rp["groups"])  # a depthwise: 1 per group
                        t += ms(p["name"], cout=rows_p - k) - ms(p["name"])
                row[lid] = t
            table[name] = _monotone(row, rec["levels"])
        for grec in group_records(db):
            table[grec["name"]] = _group_row(grec, records, ms)
    finally:
        cache.save()
    return table


def _group_row(grec: dict, records: dict, ms: Callable[..., float]) -> dict[str, float]:
    """A tied group's saving per level (``budget/groups.py``; negative ms, dense 0): every
    consumer at ``k`` fewer input channels, every producer at ``k`` fewer output rows."""
    row, best = {}, 0.0
    levels = sorted(grec["levels"].items(), key=lambda kv: kv[1]["removed_channels"])
    for lid, entry in levels:
        k = int(entry["removed_channels"])
        t = 0.0
        for c in grec["consumers"] if k else ():
            n_in = int(records[c]["cols"]) // int(records[c]["channel_size"])
            t += ms(c, cin=n_in - k) - ms(c)
        for p in grec["producers"] if k else ():
            if p in records:
                t += ms(p, cout=int(records[p]["rows"]) * int(records[p]["groups"]) - k) - ms(p)
        best = min(best, t)  # removing more channels never looks slower (timing noise)
        row[lid] = best
    return row


def _monotone(row: dict[str, float], entries: dict[str, Any]) -> dict[str, float]:
    """Each channel level at most as slow as any level of the layer removing fewer channels
    (dense included), compounds with bits as their channel level."""
    removed = {lid: int(e.get("removed_channels", 0)) for lid, e in entries.items()}
    best: dict[int, float] = {}
    for k in sorted(set(removed.values())):
        here = min(row[lid] for lid in row if removed[lid] == k)
        best[k] = min(here, *(best[j] for j in best)) if best else here
    return {lid: (best[removed[lid]] if removed[lid] else t) for lid, t in row.items()}


def _grouped_ms(module: nn.Module, rec: dict, batch: int, repeats: int, cache: Any) -> float:
    """A grouped convolution has no channel level: its dense time, timed as the module is."""
    x = [batch, *rec["input_shape"][1:]]
    key = json.dumps({"op": repr(module), "x": x}, sort_keys=True)
    return cache.get(key, lambda: time_module(copy.deepcopy(module), x, repeats))
