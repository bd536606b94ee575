"""A deterministic stand-in for ``optbrain.budget.latency.time_shape`` in tests.

Real timings of the tests' tiny layers are noise on a shared machine (a level can time slower
than dense), so tests of how the latency table is assembled monkeypatch ``time_shape`` with
``modelled_ms``: a fixed call cost plus one proportional to the multiply-adds (a grouped or
depthwise conv: ``cin / groups`` inputs per output channel).
"""

from __future__ import annotations

import math


def modelled_ms(spec: dict, repeats: int = 1, warmup: int = 0) -> float:
    """``0.001 + 1e-6 · (cin / groups) · cout · prod(kernel) · prod(output positions)``."""
    conv = spec["op"] != "Linear"
    kernel = math.prod(spec.get("kernel", [1])) if conv else 1
    space = math.prod(spec["x"][2:]) if conv else 1
    return 0.001 + 1e-6 * (spec["cin"] // spec.get("groups", 1)) * spec["cout"] * kernel * space
