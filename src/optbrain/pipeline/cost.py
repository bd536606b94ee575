"""What a model costs to run: parameters, multiply-accumulates, and measured torch latency.

``count_params`` / ``count_macs`` count (MACs of every Linear / Conv through its adapter, on
one forward); ``latency_ms`` times ``model(inputs)`` in torch eager (warm-up runs excluded,
the median of the repeats); ``model_costs`` gives all of them at batch 1 and at a throughput
batch; ``compare_costs`` does it for a dense and a compressed model together, their calls
alternated one by one (``time_pair``, the one timing loop of a comparison), so that load on a
shared machine falls on both alike — as ``optbrain eval`` / ``compress`` put them side by side.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a dict as keywords, a tuple / list as positional arguments."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def map_tensors(inputs: Any, fn: Any) -> Any:
    """``inputs`` with ``fn`` applied to every tensor in it (tensor, tuple / list, dict)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: map_tensors(v, fn) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(map_tensors(v, fn) for v in inputs)
    return inputs


def batch_of(inputs: Any, n: int) -> Any:
    """A batch of ``n`` samples: the first sample of ``inputs`` repeated ``n`` times."""
    return map_tensors(inputs, lambda t: t[:1].expand(n, *t.shape[1:]).contiguous())


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (tied ones once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, inputs: Any) -> int:
    """Multiply-accumulates of the Linear / Conv layers in one forward on ``inputs``
    (``LayerAdapter.macs`` of each layer's input, by forward hooks)."""
    from ..adapters import adapter_for

    total = [0]
    hooks = []
    for m in model.modules():
        a = adapter_for(m)
        if a is None:
            continue

        def hook(mod: nn.Module, args: tuple, _out: Any, a: Any = a) -> None:
            total[0] += a.macs(args[0].shape)

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def latency_ms(model: nn.Module, inputs: Any, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``model(inputs)`` in milliseconds (torch eager, no grad, eval)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                call(model, inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return 1000.0 * statistics.median(times)


def time_pair(
    a: Callable[[], Any], b: Callable[[], Any], repeats: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Seconds per call of ``a`` and ``b``, alternated call by call (so load on the machine
    falls on both alike), after ``warmup`` untimed calls of each."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return ta, tb


#: Multiply-accumulates one timed throughput forward may take (bounds the automatic batch).
THROUGHPUT_MACS = 4e9


def throughput_batch_for(macs_per_sample: float, most: int = 32) -> int:
    """The automatic throughput batch: ``most`` samples, fewer (at least 1) when a forward
    would take more than ``THROUGHPUT_MACS`` multiply-accumulates."""
    return max(1, min(most, int(THROUGHPUT_MACS // max(macs_per_sample, 1.0))))


def _timed_inputs(
    example: Any, macs: float, throughput_batch: int | None, repeats: int | None
) -> list[tuple[str, Any, int, int]]:
    """What a cost table times: ``(key, inputs, repeats, warmup)`` at batch 1 and at the
    throughput batch N (default ``throughput_batch_for(macs)``); ``repeats`` defaults to 20 for
    a forward under 1 GMAC, 5 above, and the big batch is timed a quarter as often (at least 3)."""
    n = throughput_batch or throughput_batch_for(macs)
    r = repeats or (20 if macs < 1e9 else 5)
    return [
        ("latency_b1_ms", batch_of(example, 1), r, 3 if macs < 1e9 else 1),
        (f"latency_b{n}_ms", batch_of(example, n), max(3, r // 4), 1),
    ]


def model_costs(
    model: nn.Module,
    example: Any,
    *,
    throughput_batch: int | None = None,
    repeats: int | None = None,
) -> dict[str, float]:
    """``params``, ``macs`` (per sample), ``latency_b1_ms`` and ``latency_b{N}_ms`` (median of
    the repeats, warm-up excluded; ``_timed_inputs``) of ``model`` on the first sample of
    ``example``."""
    macs = float(count_macs(model, batch_of(example, 1)))
    out = {"params": float(count_params(model)), "macs": macs}
    for key, x, reps, warm in _timed_inputs(example, macs, throughput_batch, repeats):
        out[key] = latency_ms(model, x, repeats=reps, warmup=warm)
    return out


def compare_costs(
    dense: nn.Module,
    model: nn.Module,
    example: Any,
    *,
    throughput_batch: int | None = None,
    repeats: int | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """``model_costs`` of ``dense`` and of ``model`` (the same keys, the throughput batch of
    the dense model), their latencies timed alternated call by call (``time_pair``)."""
    one = batch_of(example, 1)
    out = []
    for m in (dense, model):
        out.append({"params": float(count_params(m)), "macs": float(count_macs(m, one))})
    timed = _timed_inputs(example, out[0]["macs"], throughput_batch, repeats)
    modes = [(m, m.training) for m in (dense, model)]
    try:
        for m, _ in modes:
            m.eval()
        with torch.inference_mode():
            for key, x, reps, warm in timed:
                td, tc = time_pair(
                    lambda x=x: call(dense, x), lambda x=x: call(model, x), reps, warm
                )
                out[0][key] = 1000.0 * statistics.median(td)
                out[1][key] = 1000.0 * statistics.median(tc)
    finally:
        for m, was in modes:
            m.train(was)
    return out[0], out[1]
