"""The method registry: every layer solver ``solve(W, H, spec) -> LayerResult`` under its name.

The solvers are imported here explicitly (nothing registers itself from below); ``register``
adds a user's own solver. ``solve`` runs one by name on a validated ``CompressSpec``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from ..result import Check, LayerResult, Solver
from ..spec import DEFAULT_METHOD, CompressSpec, SettingError, check_weight_hessian
from ..structured import STRUCTURED_METHODS
from .auto import check_auto, solve_auto
from .baselines import (
    check_magnitude,
    check_obd,
    check_rtn,
    check_wanda,
    solve_magnitude,
    solve_obd,
    solve_rtn,
    solve_wanda,
)
from .gptq import check_gptq, solve_gptq
from .obc import check_obc, solve_obc
from .sparsegpt import check_sparsegpt, solve_sparsegpt

#: name -> solver; the built-ins, plus anything added with ``register``.
METHODS: dict[str, Solver] = {
    "obc": solve_obc,
    "gptq": solve_gptq,
    "sparsegpt": solve_sparsegpt,
    "magnitude": solve_magnitude,
    "wanda": solve_wanda,
    "obd": solve_obd,
    "rtn": solve_rtn,
    "auto": solve_auto,
}


#: name -> the solver's check of a spec's options (no compute): what ``check_spec`` runs before
#: any work, the same check the solver itself starts with.
CHECKS: dict[str, Check] = {
    "obc": check_obc,
    "gptq": check_gptq,
    "sparsegpt": check_sparsegpt,
    "magnitude": check_magnitude,
    "wanda": check_wanda,
    "obd": check_obd,
    "rtn": check_rtn,
    "auto": check_auto,
}


def register(name: str, check: Check | None = None) -> Callable[[Solver], Solver]:
    """Decorator adding a user's solver under ``name`` (then usable as ``method=name``);
    ``check(spec)``: its option check, run by ``check_spec`` before any work."""

    def deco(fn: Solver) -> Solver:
        METHODS[name] = fn
        if check is not None:
            CHECKS[name] = check
        else:
            CHECKS.pop(name, None)
        return fn

    return deco


def check_method(method: str) -> str:
    """A registered method name, else a ValueError listing them."""
    if not isinstance(method, str) or method not in METHODS:
        raise SettingError("method", f"one of {sorted(METHODS)}", method)
    return method


def check_spec(method: str, spec: CompressSpec, where: str = "") -> None:
    """``method`` is registered and takes ``spec`` (its options, their values and the
    pattern/bits it needs): a ValueError naming what is wrong (after ``where: ``), before any
    work."""
    if where:
        try:
            return check_spec(method, spec)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    check_method(method)
    if spec.pattern.structured and method not in (*STRUCTURED_METHODS, "auto"):
        raise ValueError(
            f"pattern {spec.pattern} (whole channels / heads) is solved by methods "
            f"{list(STRUCTURED_METHODS)}, not {method!r}"
        )
    if method in CHECKS:
        CHECKS[method](spec)


def solve(
    W: torch.Tensor, H: torch.Tensor, spec: CompressSpec, method: str = DEFAULT_METHOD
) -> LayerResult:
    """Run a registered solver on a validated spec; the result is in W's dtype and device.

    The compute dtype is raised to float64 when float32 could overflow (``safe_dtype``), and
    recorded in ``info["dtype"]``. Inputs that are always zero (``H_pp == 0``) have their
    weights set to 0 by every solver; the mask then marks them pruned, so ``sparsity`` is the
    fraction actually zero, and ``info["dead_inputs"]`` counts those columns.
    """
    check_spec(method, spec)
    check_weight_hessian(W, H)
    dtype = safe_dtype(W, H, spec.dtype)
    if dtype != spec.dtype:
        spec = replace(spec, dtype=dtype)
    t0 = time.perf_counter()
    res = METHODS[method](W, H, spec)
    res.seconds = time.perf_counter() - t0
    weight = res.weight.to(dtype=W.dtype, device=W.device)
    if not bool(torch.isfinite(weight).all()):
        big = float(res.weight.double().abs().max())
        raise ValueError(
            f"the compressed weights reach |w| = {big:.3g}, beyond what W's dtype {W.dtype} "
            "holds; pass W as float32 (or scale the layer down)"
        )
    res.weight = weight
    res.info = {**res.info, "dtype": str(dtype).removeprefix("torch.")}
    dead = torch.diagonal(H) <= 0
    if bool(dead.any()):
        res.info["dead_inputs"] = int(dead.sum())
        if res.mask is not None:
            res.mask = res.mask.clone()
            res.mask[:, dead.to(res.mask.device)] = False
    if res.mask is not None:
        res.mask = res.mask.to(W.device)
        res.sparsity = float(1.0 - res.mask.float().mean())
    return res


#: the largest saliency / loss magnitude solved in float32 (its maximum is 3.4e38)
FLOAT32_LIMIT = 1e30


def safe_dtype(W: torch.Tensor, H: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The compute dtype for ``W (rows, cols)``, ``H (cols, cols)``: ``dtype``, or float64
    when in float32 the largest OBS saliency ``max|W|² · max H_pp · cols`` (or ``H`` itself)
    would pass ``FLOAT32_LIMIT``; a ``ValueError`` when even float64 would overflow.

    >>> safe_dtype(torch.full((2, 2), 1e19), torch.eye(2), torch.float32)
    torch.float64
    """
    wmax = float(W.detach().abs().max().double())
    hmax = float(torch.diagonal(H).detach().abs().max().double())
    bound = wmax * wmax * max(hmax, 1e-300) * W.shape[1]
    if bound > 1e290 or hmax > 1e290:
        raise ValueError(
            f"the layer is too large to solve even in float64 (max |W| = {wmax:.3g}, "
            f"max H_pp = {hmax:.3g}); scale the weights or the inputs down"
        )
    if dtype == torch.float64:
        return dtype
    if bound > FLOAT32_LIMIT or hmax > FLOAT32_LIMIT:
        return torch.float64
    return dtype


__all__ = [
    "CHECKS",
    "FLOAT32_LIMIT",
    "METHODS",
    "Solver",
    "check_method",
    "check_spec",
    "register",
    "safe_dtype",
    "solve",
]
