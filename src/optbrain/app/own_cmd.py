"""``optbrain compress`` / ``optbrain eval`` for your own model (not a zoo name).

``precheck`` finds bad input from the files alone (a missing path, a directory without
config.json, text calibration for a model without a tokenizer, an image folder with no
images, ``--seq-len`` over the model's context) before any weight is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ..pipeline.calibration import image_files
from .sources import _read_config, context_length, has_tokenizer, model_kind

_TENSOR_SUFFIXES = (".npy", ".safetensors")


def _is_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()


def precheck(model: str, data: str | None, flag: str, seq_len: int | None) -> None:
    """The checks that need no weights (see the module docstring); ``flag`` names ``data``."""
    model_kind(model)
    if data is None:
        raise ValueError(
            f"{flag} FILE|DIR is needed for your own model (a text / .jsonl file, an image "
            "folder, a .npy / .safetensors file or a datasets folder)"
        )
    d = Path(data).expanduser()
    if not d.exists():
        raise ValueError(f"{flag} {d}: no such file or directory")
    if d.is_dir() and not _is_dataset(d) and not image_files(d):
        raise ValueError(
            f"{flag} {d}: a folder with no images in it (and not a datasets save_to_disk folder)"
        )
    m = Path(model).expanduser()
    if not m.is_dir():  # module:factory declares no context; load_model checks the rest
        return
    config = _read_config(m)
    ctx = context_length(config)
    if seq_len is not None and ctx is not None and seq_len > ctx:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context ({ctx} tokens)")
    is_text = d.is_file() and d.suffix not in _TENSOR_SUFFIXES
    if is_text and not has_tokenizer(m):
        raise ValueError(
            f"{flag} {d} is text, but the model directory {m} has no tokenizer (no "
            "tokenizer.json / vocab files): save it there with tokenizer.save_pretrained, or "
            "pass token ids as a .npy / .safetensors file"
        )


def _load(args: argparse.Namespace) -> Any:
    from .sources import load_model

    t0 = time.perf_counter()
    loaded = load_model(args.model, task=args.task, weights=args.weights)
    if not args.quiet:
        secs = time.perf_counter() - t0
        print(f"loaded {args.model} ({loaded.kind}, task {loaded.task}) in {secs:.1f} s",
              file=sys.stderr)  # fmt: skip
    return loaded


def _level(args: argparse.Namespace) -> str:
    if getattr(args, "quiet", False):
        return "quiet"
    return "verbose" if getattr(args, "verbose", False) else "normal"


def cmd_compress_own(args: argparse.Namespace, recipe: Any) -> int:
    """Compress a local HF directory or ``module:factory`` model on ``--calibration``."""
    from ..pipeline.progress import reporting

    with reporting(_level(args)):
        return _compress_own(args, recipe)


def _compress_own(args: argparse.Namespace, recipe: Any) -> int:
    from ..report import render_table
    from .own import calibration_for, compress_own, obc_warnings

    if getattr(args, "target", None):
        raise ValueError("--target (a global budget) works with zoo models only for now")
    precheck(args.model, args.calibration, "--calibration", args.seq_len)
    if args.out:  # before the model loads (the default, runs/NAME, needs its name)
        from .paths import check_out

        check_out(Path(args.out))
    loaded = _load(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = calibration_for(
            loaded,
            args.calibration,
            samples=recipe.calibration.samples,
            seq_len=args.seq_len,
            seed=args.seed,
            text_key=args.text_key,
            image_size=args.image_size,
        )
    for w in caught:  # "only N samples available": a note, not a Python warning trace
        print(f"note: {w.message}", file=sys.stderr)
    for line in obc_warnings(loaded.model, recipe):  # printed even with --quiet
        print(line, file=sys.stderr)
    out = Path(args.out) if args.out else Path("runs") / loaded.name
    where = {"model": args.model, "weights": args.weights}
    if loaded.kind == "hf":
        where["model"] = str(Path(args.model).expanduser().resolve())
    if args.weights:
        where["weights"] = str(Path(args.weights).expanduser().resolve())
    report = compress_own(
        loaded, batches, recipe, out, quiet=args.quiet,
        executor=getattr(args, "executor_obj", None), source=where,
    )  # fmt: skip
    print(render_table(report))
    print(f"\nrun written to {out}/ (report: {out / 'report.html'})")
    return 0


def cmd_eval_own(args: argparse.Namespace) -> int:
    """Dense (and ``--compressed RUN``) metrics of your own model on ``--data``."""
    from ..pipeline.progress import reporting

    with reporting(_level(args)):
        return _eval_own(args)


def _eval_own(args: argparse.Namespace) -> int:
    from .own import evaluate_own
    from .text import eval_table

    precheck(args.model, args.data, "--data", args.seq_len)
    if args.compressed and not Path(args.compressed).is_dir():
        raise ValueError(f"--compressed {args.compressed}: no such run directory")
    loaded = _load(args)
    m = evaluate_own(
        loaded,
        args.compressed,
        args.data,
        limit=args.limit,
        seq_len=args.seq_len,
        text_key=args.text_key,
        image_size=args.image_size,
    )
    metrics = {
        "dense": {k: v["dense"] for k, v in m.items()},
        **({"compressed": {k: v["compressed"] for k, v in m.items()}} if args.compressed else {}),
    }
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        print(eval_table(metrics))
    return 0


def add_source_flags(p: argparse.ArgumentParser, data_flag: bool) -> None:
    """The flags of your own model and its data, shared by compress and eval."""
    p.add_argument(
        "--task",
        help="Hugging Face task when config.json does not say: causal-lm, masked-lm, "
        "seq-classification, image-classification, base",
    )
    p.add_argument("--weights", help="state dict for --model module:factory (.safetensors/.pt)")
    if data_flag:
        p.add_argument("--calibration", help="text/.jsonl file, image folder, .npy/.safetensors, "
                       "or a datasets save_to_disk folder")  # fmt: skip
    p.add_argument("--text-key", dest="text_key", default="text", help="JSON-lines text field")
    p.add_argument("--image-size", dest="image_size", type=int, help="resize images to this")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per text window")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the calibration data")
