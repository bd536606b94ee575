"""``optbrain compress --model HF_DIR --calibration DATA --offload DIR``: a causal LM larger than
memory compressed block by block (``optbrain.pipeline.offload``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def cmd_compress_offload(args: argparse.Namespace, recipe: Any) -> int:
    """Check the flags (before any weight is read), calibrate from the tokenizer alone, run."""
    from ..api import compress
    from ..pipeline.calibration import calibration_from
    from ..report import render_table
    from .own_cmd import precheck
    from .sources import load_tokenizer, model_kind

    if getattr(args, "target", None) or getattr(args, "executor_obj", None) is not None:
        raise ValueError("--offload runs one block at a time here: no --target, no --executor ray")
    if getattr(args, "out", None):
        raise ValueError("--offload DIR is where the run is written (DIR/model); drop --out")
    try:
        kind = model_kind(args.model, getattr(args, "weights", None))
    except ValueError:
        kind = "zoo"
    if kind != "hf":
        raise ValueError("--offload needs --model to be a local Hugging Face causal LM directory")
    precheck(args.model, args.calibration, "--calibration", args.seq_len)
    model_dir = Path(args.model).expanduser()
    batches = calibration_from(
        args.calibration,
        tokenizer=load_tokenizer(model_dir),
        samples=recipe.calibration.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        text_key=args.text_key,
    )
    report = compress(model_dir, batches, recipe, offload=args.offload, quiet=args.quiet)
    print(render_table(report))
    peak = report.metadata.get("peak_rss_mb")
    if peak is not None:
        print(f"\npeak resident memory: {peak:.0f} MB", file=sys.stderr)
    print(f"\ncompressed model written to {Path(args.offload) / 'model'}/")
    return 0
