"""Calibration batches: how an item becomes a forward call, device moves, errors, the
calibration context (eval mode, no grad, hooks always removed) and THE calibration forward
loop (``forward_batch`` / ``forward_batches``) every pass over the data goes through.

Batch convention (shared by every function in ``optbrain.pipeline``):

* ``calibration`` is any iterable of batches (a list, a generator, a ``DataLoader``). A single
  tensor or dict passed as ``calibration`` is ONE batch (not iterated over its first dim).
* a batch is called as ``model(batch)`` for a tensor, ``model(*batch)`` for a tuple/list
  (positional arguments), ``model(**batch)`` for a mapping (keyword arguments, as
  transformers models take them; ``BatchEncoding`` works too).
* ``inputs="first"``: for labelled data such as ``(x, y)`` from a ``DataLoader`` over a
  ``TensorDataset(x, y)``, only ``batch[0]`` is passed: ``model(batch[0])``.
* ``forward=fn``: full control, ``fn(model, batch)`` is called instead (its result ignored).
* tensors anywhere in a batch (nested tuples/lists/dicts) are moved to the model's device
  (the device of its first parameter); dtypes are left alone.

Errors: a forward that raises is re-raised as ``CalibrationError("calibration batch 3 failed
in forward: TypeError: ...")`` (out-of-memory errors pass through unchanged); NaN/Inf in a
layer's input raises ``NonFiniteActivationError`` naming the layer and the batch; an empty
calibration raises ``ValueError``. ``take_samples`` keeps the batches holding the first N
samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], Any]
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
INPUTS = ("all", "first")


class CalibrationError(RuntimeError):
    """A calibration forward failed; ``batch`` is the index of the failing batch (or None)."""

    def __init__(self, message: str, batch: int | None = None) -> None:
        super().__init__(message)
        self.batch = batch


class NonFiniteActivationError(CalibrationError, ValueError):
    """A layer received NaN or Inf inputs; ``layer`` is its name."""

    def __init__(self, layer: str, batch: int | None = None) -> None:
        super().__init__(f"layer {layer!r} received NaN or Inf inputs", batch)
        self.layer = layer


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a hook to end a forward early; never escapes ``optbrain.pipeline``."""


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (else buffer) of ``model``; CPU when it has none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device | str | None) -> Any:
    """``obj`` with every tensor (in nested tuples / lists / mappings) moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(o, device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def check_inputs_option(inputs: str) -> str:
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    return inputs


def _batches(calibration: Any, what: str, not_iterable: type[Exception]) -> Iterable[Any]:
    """``calibration`` as an iterable of batches, a lone tensor / mapping being one batch."""
    if calibration is None:
        raise ValueError(f"calibration is None; pass an iterable of {what}")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [calibration]
    if not isinstance(calibration, Iterable):
        raise not_iterable(
            f"calibration must be an iterable of {what}, got {type(calibration).__name__}"
        )
    return calibration


def iter_batches(calibration: Any) -> Iterator[tuple[int, Any]]:
    """``enumerate(calibration)``, a lone tensor / mapping being one batch."""
    return enumerate(_batches(calibration, "batches", TypeError))


def empty_error() -> ValueError:
    return ValueError(
        "calibration is empty: it yielded no batches (an exhausted generator? an empty "
        "DataLoader?); at least one batch is needed to estimate layer Hessians"
    )


def call_model(model: nn.Module, batch: Any, forward: Forward | None, inputs: str) -> Any:
    """Run ``model`` on one (already device-moved) batch following the batch convention."""
    if forward is not None:
        return forward(model, batch)
    if inputs == "first":
        if not isinstance(batch, (tuple, list)) or len(batch) == 0:
            raise TypeError(f"inputs='first' needs tuple/list batches, got {type(batch).__name__}")
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        f"a calibration batch of type {type(batch).__name__} cannot be passed to the model; "
        "use tensors, tuples/lists (positional), dicts (keyword) or pass forward=fn"
    )


def run_batch(
    i: int,
    fn: Callable[[], Any],
    *,
    where: str = "in forward",
    batch: Any = None,
    inputs: str = "all",
    forward: Forward | None = None,
) -> bool:
    """Run ``fn()`` for calibration batch ``i``; True if it completed, False if stopped early.

    Wraps errors as described in the module docstring.
    """
    try:
        fn()
    except StopForward:
        return False
    except CalibrationError as e:
        if e.batch is None:
            e.batch = i
            e.args = (f"calibration batch {i}: {e.args[0]}",)
        raise
    except _OOM:
        raise
    except Exception as e:
        hint = ""
        if (
            isinstance(e, TypeError)
            and forward is None
            and inputs == "all"
            and isinstance(batch, (tuple, list))
            and len(batch) >= 2
        ):
            hint = (
                f" (the batch is a {type(batch).__name__} of {len(batch)} items passed as "
                "positional arguments; for (inputs, labels) batches pass inputs='first' or a "
                "forward=fn)"
            )
        raise CalibrationError(
            f"calibration batch {i} failed {where}: {type(e).__name__}: {e}{hint}", batch=i
        ) from e
    return True


def forward_batch(
    model: nn.Module,
    i: int,
    batch: Any,
    forward: Forward | None = None,
    inputs: str = "all",
    device: torch.device | None = None,
) -> bool:
    """Run ``model`` on calibration batch ``i`` (moved to ``device``, default the model's).

    True if the forward completed, False if a hook stopped it (``StopForward``); a failure is
    a ``CalibrationError`` naming the batch (see the module docstring).
    """
    b = to_device(batch, model_device(model) if device is None else device)
    return run_batch(
        i,
        lambda: call_model(model, b, forward, inputs),
        batch=b,
        inputs=inputs,
        forward=forward,
    )


def forward_batches(
    model: nn.Module, calibration: Any, forward: Forward | None = None, inputs: str = "all"
) -> int:
    """Run ``model`` on every calibration batch (``forward_batch``); returns how many.

    Call it inside ``calibration_mode`` (or a mode of the caller's); hooks attached before
    see every batch. Raises ``ValueError`` when the calibration yields no batch.
    """
    from .progress import phase

    dev = model_device(model)
    n = 0
    total = len(calibration) if isinstance(calibration, (list, tuple)) else None
    bar = phase(total, "calibration forwards")
    try:
        for i, batch in iter_batches(calibration):
            forward_batch(model, i, batch, forward, inputs, dev)
            n += 1
            bar.update()
    finally:
        bar.close()
    if n == 0:
        raise empty_error()
    return n


@contextlib.contextmanager
def calibration_mode(model: nn.Module) -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    """Eval mode, no grad, ``config.use_cache = False`` (transformers), and a list in which
    callers put hook handles; everything is restored / removed on exit, also on errors.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    modes = [(m, m.training) for m in model.modules()]
    config = getattr(model, "config", None)
    had_cache = config is not None and hasattr(config, "use_cache")
    old_cache = config.use_cache if had_cache else None
    try:
        model.eval()
        if had_cache:
            config.use_cache = False
        with torch.no_grad():
            yield handles
    finally:
        for h in handles:
            h.remove()
        handles.clear()
        for m, mode in modes:
            m.training = mode
        if had_cache:
            config.use_cache = old_cache


def layer_input(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    """The input tensor of a layer call (first positional argument or ``input=``)."""
    if args:
        x = args[0]
    elif "input" in kwargs:
        x = kwargs["input"]
    elif len(kwargs) == 1:
        x = next(iter(kwargs.values()))
    else:
        raise CalibrationError(f"layer {name!r} was called without an input tensor")
    if not isinstance(x, torch.Tensor):
        raise CalibrationError(f"layer {name!r} was called with a {type(x).__name__} input")
    return x


# ------------------------------------------------------------------------------- samples ----
def batch_samples(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor with one (1 if none)."""
    return _leading_dim(batch) or 1


def _leading_dim(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = _leading_dim(v)
            if n is not None:
                return n
    if isinstance(batch, (tuple, list)):
        for v in batch:
            n = _leading_dim(v)
            if n is not None:
                return n
    return None


def _trim(batch: Any, n: int, full: int) -> Any:
    """The first ``n`` samples of a batch whose tensors share the leading dimension ``full``."""
    if isinstance(batch, torch.Tensor):
        return batch[:n] if batch.dim() and batch.shape[0] == full else batch
    if isinstance(batch, Mapping):
        return (
            type(batch)({k: _trim(v, n, full) for k, v in batch.items()})
            if not hasattr(batch, "data")
            else {k: _trim(v, n, full) for k, v in batch.items()}
        )
    if isinstance(batch, tuple):
        return tuple(_trim(v, n, full) for v in batch)
    if isinstance(batch, list):
        return [_trim(v, n, full) for v in batch]
    return batch


def take_samples(calibration: Any, samples: int | None) -> list[Any]:
    """The calibration batches holding the first ``samples`` samples (a sample is one entry of
    a batch's leading dimension; the last batch is cut to fit; None: all of them). Materialised
    as a list, since calibration may be iterated more than once."""
    out, seen = [], 0
    for batch in _batches(calibration, "model inputs", ValueError):
        n = _leading_dim(batch) or 1
        if samples is None:
            out.append(batch)
            continue
        if seen + n > samples:
            batch = _trim(batch, samples - seen, n)
            n = samples - seen
        out.append(batch)
        seen += n
        if seen >= samples:
            break
    if not out:
        raise ValueError("calibration is empty: it yielded no batches")
    return out
