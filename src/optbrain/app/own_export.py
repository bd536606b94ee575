"""``optbrain export RUN`` for a run of your own model (``compress --model DIR|mod:fn``): the
model it was made from (``source.json``, or ``--model``), the run applied to it, and for ONNX
the inputs to trace read from ``--calibration``."""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def own_source(run: Path) -> dict[str, Any] | None:
    """The ``source.json`` of a run of your own model (``optbrain compress --model DIR|mod:fn``),
    else None (a zoo run)."""
    path = run / "source.json"
    if not path.is_file():
        return None
    try:
        src = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}); which model is this run?") from None
    if not isinstance(src, dict) or src.get("kind") not in ("hf", "module"):
        raise ValueError(f"{path} does not say which model the run is of (kind hf or module)")
    return src


def own_export_model(
    args: argparse.Namespace, run: Path, src: dict[str, Any]
) -> tuple[Any, list[Any] | None]:
    """(compressed model, ONNX example batches or None) of a run of your own model: the model
    from ``--model`` (default: the directory or factory the run recorded), freshly loaded, with
    the run applied to it in place; ``--calibration`` read for ONNX (the inputs to trace, and
    the activation ranges of int8)."""
    from ..io import load

    if args.format == "onnx" and not args.calibration:
        raise ValueError(
            "--format onnx of your own model needs --calibration FILE: inputs of the model "
            "to trace the graph with (the same kind of data as for compress)"
        )
    loaded = _load_source(args, run, src)
    if args.format == "compressed-tensors" and loaded.kind != "hf":
        raise ValueError(
            "format 'compressed-tensors' writes Hugging Face transformers models; "
            f"{loaded.name!r} is a module factory (use --format onnx or --format safetensors)"
        )
    model = load(loaded.model, run)  # a fresh load, used for nothing else: no copy
    batches = _batches(args, loaded, args.samples, 1) if args.format == "onnx" else None
    return model, batches


def own_bench_models(
    args: argparse.Namespace, run: Path, src: dict[str, Any], batch: int
) -> tuple[Any, Any, Any, Callable[[], list[Any]]]:
    """What ``optbrain bench`` times for a run of your own model: ``(dense, compressed, one
    input batch of `batch` samples from --calibration, a function giving the batches that
    calibrate int8 activations)``; the dense model freshly loaded from ``--model`` or the
    recorded source."""
    from ..io import load
    from ..pipeline.data import batch_samples

    if not args.calibration:
        raise ValueError(
            "optbrain bench of your own model needs --calibration FILE: inputs of the model to "
            "time it on (the same kind of data as for compress)"
        )
    loaded = _load_source(args, run, src)
    dense = loaded.model
    model = load(copy.deepcopy(dense), run)
    x = _batches(args, loaded, batch, batch)[0]
    got = batch_samples(x)
    if got != batch:
        raise ValueError(
            f"--calibration {args.calibration} gives {got} input(s); --batch {batch} needs at "
            "least as many"
        )

    def calibrate() -> list[Any]:
        return _batches(args, loaded, args.samples, 1)

    return dense, model, x, calibrate


def _load_source(args: argparse.Namespace, run: Path, src: dict[str, Any]) -> Any:
    """The model a run of your own model was made from (``--model`` overrides source.json)."""
    from .sources import load_model

    spec = args.model or src.get("model")
    if not spec:
        raise ValueError(
            f"{run} is a run of your own model {src.get('name')!r} that does not record where "
            "the model is; pass --model DIR (or module:factory with --weights)"
        )
    weights = args.weights or src.get("weights")
    return load_model(spec, task=args.task or src.get("task"), weights=weights)


def _batches(args: argparse.Namespace, loaded: Any, samples: int, batch_size: int) -> list[Any]:
    from .own import calibration_for

    return calibration_for(
        loaded, args.calibration, samples=samples, seq_len=args.seq_len, seed=args.seed,
        text_key=args.text_key, image_size=args.image_size, batch_size=batch_size,
    )  # fmt: skip
