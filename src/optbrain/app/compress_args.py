"""The flags of ``optbrain compress`` (the parser of ``app/cli.py``): one place for their
names, defaults and help."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def add_compress_args(c: argparse.ArgumentParser) -> None:
    """Add the flags of ``optbrain compress`` to its sub-parser ``c``."""
    from ..core.methods import METHODS
    from ..core.spec import DEFAULT_DAMP
    from .own_cmd import add_source_flags

    c.add_argument(
        "--model",
        required=True,
        help="zoo name (see 'optbrain models'), a local Hugging Face directory, or "
        "module:factory with --weights",
    )
    c.add_argument("--recipe", help="recipe YAML file (instead of the flags below)")
    c.add_argument("--method", choices=sorted(METHODS), help="solver (default: auto)")
    c.add_argument("--preset", help="w4a16, w8a16, 2:4, 2:4+w4 or N%% (e.g. 50%%)")
    c.add_argument("--sparsity", type=float, help="fraction of weights to prune, in [0, 1)")
    c.add_argument(
        "--pattern",
        help="'unstructured' (default), 'N:M' e.g. 2:4, 'blockB', or 'channels' / 'heads' "
        "(whole input channels / attention heads; the model is then shrunk for real)",
    )
    c.add_argument("--bits", type=int, help="quantize to this many bits")
    c.add_argument(
        "--group-size",
        type=int,
        dest="group_size",
        help="quantization group size (default: one grid per output channel)",
    )
    c.add_argument("--asym", action="store_true", help="asymmetric grid (default: symmetric)")
    c.add_argument("--damp", type=float, help=f"relative damping of H (default {DEFAULT_DAMP})")
    c.add_argument("--targets", nargs="+", help="module name patterns to compress (glob or re:)")
    c.add_argument("--ignore", nargs="+", help="module name patterns to leave alone")
    c.add_argument(
        "--mode",
        choices=["independent", "sequential"],
        help="calibration mode (default: independent, as OBC)",
    )
    c.add_argument("--samples", type=int, help="calibration samples (default 128)")
    c.add_argument(
        "--allocation",
        choices=["uniform", "owl"],
        help="spread of --sparsity over the layers: uniform (default) or owl (per block, "
        "from activation outliers)",
    )
    c.add_argument("--limit", type=positive_int, help="evaluate on the first N examples only")
    c.add_argument("--out", help="run directory (default: runs/MODEL)")
    c.add_argument("--quiet", action="store_true", help="no progress line")
    c.add_argument("--verbose", action="store_true", help="progress and details on stderr")
    add_source_flags(c, data_flag=True)
    c.add_argument(
        "--target",
        help="global budget instead of one setting for all layers, e.g. flops=0.25, "
        "bops=1/12, size=0.3, latency=0.6 (torch latency timed on this machine, channel "
        "levels, shrunk for real): a level per layer chosen by dynamic programming",
    )
    c.add_argument("--db", help="per-layer database directory for --target (default: OUT/db)")
    c.add_argument(
        "--levels",
        nargs="+",
        help="the level grid for --target: ids (s0.5, 2:4, b4, c0.25 = 25%% of the input "
        "channels removed, c0.25+b8, ...), or 'structured' (the channel grid) / 'default'; "
        "default: the default grid, the channel grid for latency=... (measured here)",
    )
    c.add_argument(
        "--bn-recalibration",
        action="store_true",
        dest="bn_recalibration",
        help="re-estimate the batch norms' running statistics on the calibration afterwards",
    )
    c.add_argument(
        "--refit",
        action="store_true",
        help="then refit every layer's kept weights to the dense model's outputs (least "
        "squares, zeros kept; quantized layers left alone): recovers much of what channel "
        "removal loses (optbrain.pipeline.refit)",
    )
    c.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="where the per-layer solves run: local (default) or ray (pip install optbrain[ray]; "
        "a local Ray for the run, or the cluster at --ray-address / RAY_ADDRESS)",
    )
    c.add_argument("--ray-address", dest="ray_address", help="Ray cluster HOST:PORT")
    c.add_argument(
        "--ray-workers",
        dest="ray_workers",
        type=positive_int,
        help="CPUs of the local Ray started for the run (default: all cores)",
    )
    c.add_argument(
        "--offload",
        metavar="DIR",
        help="a local HF causal LM larger than memory: read block by block from its safetensors "
        "shards, each compressed block written to DIR (resumable), the model assembled in "
        "DIR/model (sequential mode)",
    )
