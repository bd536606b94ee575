"""The method registry: every layer solver ``solve(W, H, spec) -> LayerResult`` under its name.

The solvers are imported here explicitly (nothing registers itself from below); ``register``
adds a user's own solver. ``solve`` runs one by name on a validated ``CompressSpec``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..result import LayerResult
from ..spec import DEFAULT_METHOD, CompressSpec, SettingError, check_weight_hessian
from .auto import solve_auto
from .baselines import solve_magnitude, solve_obd, solve_rtn
from .gptq import solve_gptq
from .obc import solve_obc
from .sparsegpt import solve_sparsegpt

Solver = Callable[[torch.Tensor, torch.Tensor, CompressSpec], LayerResult]

#: name -> solver; the built-ins, plus anything added with ``register``.
METHODS: dict[str, Solver] = {
    "obc": solve_obc,
    "gptq": solve_gptq,
    "sparsegpt": solve_sparsegpt,
    "magnitude": solve_magnitude,
    "obd": solve_obd,
    "rtn": solve_rtn,
    "auto": solve_auto,
}


def register(name: str) -> Callable[[Solver], Solver]:
    """Decorator adding a user's solver under ``name`` (then usable as ``method=name``)."""

    def deco(fn: Solver) -> Solver:
        METHODS[name] = fn
        return fn

    return deco


def check_method(method: str) -> str:
    """A registered method name, else a ValueError listing them."""
    if not isinstance(method, str) or method not in METHODS:
        raise SettingError("method", f"one of {sorted(METHODS)}", method)
    return method


def solve(
    W: torch.Tensor, H: torch.Tensor, spec: CompressSpec, method: str = DEFAULT_METHOD
) -> LayerResult:
    """Run a registered solver on a validated spec; the result is in W's dtype and device."""
    check_method(method)
    check_weight_hessian(W, H)
    t0 = time.perf_counter()
    res = METHODS[method](W, H, spec)
    res.seconds = time.perf_counter() - t0
    res.weight = res.weight.to(dtype=W.dtype, device=W.device)
    if res.mask is not None:
        res.mask = res.mask.to(W.device)
        res.sparsity = float(1.0 - res.mask.float().mean())
    return res


__all__ = ["METHODS", "Solver", "check_method", "register", "solve"]
