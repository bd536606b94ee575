"""``optbrain export RUN`` and ``optbrain bench RUN``: deployable files of a run and their speed.

Both read the zoo model a run directory was written for (``report.json``'s ``model``), check
everything they can before loading it (the run directory, the format against the model, the
runtime), apply the run to a fresh dense copy (``optbrain.load``) and record what they measured
in the run's report under ``metadata["deployment"]``::

    {"exports": {FORMAT: {path, files, total_bytes, layer_bytes, layer_fp32_bytes, ratio,
                          dense, seconds}},
     "bench":   {"RUNTIME-bBATCH-tTHREADS": {runtime, batch, threads, repeats,
                 dense: {median_ms, throughput}, compressed: {...}, speedup,
                 bytes: {dense, compressed}}}}

``optbrain report`` prints it (``deploy_text.deployment_table``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RUNTIMES = ("torch", "onnxruntime")


# ------------------------------------------------------------------------------ the run
def run_model_name(run: Path, model: str | None = None) -> str:
    """The zoo model ``run`` was written for (checked against ``model`` when given); raises
    ValueError when ``run`` is not a run directory or names no zoo model."""
    from ..io.checkpoint import REPORT, read_manifest
    from . import zoo

    read_manifest(run)  # a CheckpointError (ValueError) unless an optbrain run directory
    try:
        name = json.loads((run / REPORT).read_text()).get("model")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{run / REPORT} cannot be read ({e}); which model is this run?") from None
    if not name:
        raise ValueError(f"{run / REPORT} names no model; pass --model with the zoo model's name")
    if model is not None and model != name:
        raise ValueError(
            f"{run} was written for model {name!r}, not {model!r}; pass the run of {model!r}"
        )
    zoo.get(name)  # ValueError listing the zoo when unknown
    return name


def load_run(run: Path, name: str) -> tuple[Any, Any, Any]:
    """(zoo entry, dense model, compressed model = the run applied to a copy)."""
    from ..io import load
    from . import zoo

    entry = zoo.get(name)
    dense = entry.load()
    return entry, dense, load(copy.deepcopy(dense), run)


def example_batch(entry: Any, batch: int, seed: int = 0, seq_len: int | None = None) -> Any:
    """``batch`` inputs of ``entry``'s calibration data (a tensor or a dict of tensors).
    ``seq_len`` (token models, for timing): every ``(batch, length)`` tensor of the dict made
    ``seq_len`` long by laying further calibration windows after it along the sequence axis."""
    import torch

    reps = 1
    if seq_len is not None:
        if seq_len < 1:
            raise ValueError("--seq-len must be at least 1")
        first = entry.calibration(batch, seed)[0]
        if not isinstance(first, dict):
            raise ValueError(f"--seq-len is for token models; {entry.name!r} takes tensors")
        reps = -(-seq_len // int(next(iter(first.values())).shape[1]))
    batches = entry.calibration(batch * reps, seed)
    if not batches:
        raise ValueError(f"model {entry.name!r} gave no calibration inputs")
    first = batches[0]
    if isinstance(first, dict):
        rows = {k: torch.cat([b[k] for b in batches]) for k in first}
        return {
            k: torch.cat(v[: batch * reps].chunk(reps), 1)[:, :seq_len] for k, v in rows.items()
        }
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))[:batch]
    raise ValueError(f"model {entry.name!r}: calibration inputs are {type(first).__name__}")


def positional(model: Any, x: Any) -> tuple[Any, ...]:
    """The model's positional inputs for ``x``: a tensor, or a dict laid out in the order of
    ``model.forward``'s parameters (None for the ones it leaves out, up to the last given)."""
    import inspect

    if not isinstance(x, dict):
        return (x,)
    params = list(inspect.signature(model.forward).parameters)
    unknown = [k for k in x if k not in params]
    if unknown:
        raise ValueError(f"inputs {unknown} are not parameters of {type(model).__name__}.forward")
    last = max(params.index(k) for k in x)
    return tuple(x.get(p) for p in params[: last + 1])


def with_mask(model: Any, x: Any) -> Any:
    """``x``, and for a dict of token ids without an ``attention_mask`` an all-ones one when
    ``model.forward`` takes it (a causal LM's outputs are the same; transformers' mask code
    without one is not traceable to ONNX)."""
    import torch

    if (
        isinstance(x, dict)
        and "input_ids" in x
        and "attention_mask" not in x
        and "attention_mask" in _names(model)
    ):
        return {**x, "attention_mask": torch.ones_like(x["input_ids"])}
    return x


def onnx_inputs(model: Any, x: Any) -> tuple[Any, ...]:
    """``positional(model, with_mask(model, x))``: the inputs to trace or run an ONNX graph."""
    return positional(model, with_mask(model, x))


# ------------------------------------------------------------------------------ export
def cmd_export(args: argparse.Namespace) -> int:
    from ..io import export
    from ..io.formats import check_options

    run = Path(args.run)
    fmt = args.format
    act = check_options(
        fmt,
        activations=args.activations,
        dtype=args.dtype,
        matmul_nbits=args.matmul_nbits,
        accuracy_level=args.accuracy_level,
    )
    if args.samples < 1:
        raise ValueError("--samples must be at least 1")
    if not run.is_dir():
        raise ValueError(f"{run}: no such run directory")
    out = Path(args.out)
    from .own_export import own_export_model, own_source

    src = own_source(run)
    if src is not None:
        model, batches = own_export_model(args, run, src)
        example = onnx_inputs(model, batches[0]) if batches else None
        calib = [positional(model, b) for b in batches] if batches else None
    else:
        name = run_model_name(run, args.model)
        from . import zoo

        entry = zoo.get(name)
        if fmt == "compressed-tensors" and "transformers" not in entry.requires:
            raise ValueError(
                f"format 'compressed-tensors' writes Hugging Face transformers models; {name!r} "
                "is not one (use --format onnx or --format safetensors)"
            )
        _, _, model = load_run(run, name)
        example = onnx_inputs(model, example_batch(entry, 1)) if fmt == "onnx" else None
        calib = calibration_args(entry, model, args.samples) if act != "float" else None
    kw: dict[str, Any] = {}
    if act != "float":
        kw = {"activations": act, "calibration": calib}
    if args.dtype is not None:
        kw["dtype"] = args.dtype
    if args.matmul_nbits:
        kw.update(matmul_nbits=True, accuracy_level=args.accuracy_level)
    t0 = time.perf_counter()
    res = export(model, out, format=fmt, example_inputs=example, **kw)
    seconds = time.perf_counter() - t0
    info = {
        "path": str(out.resolve()),
        "files": res.files,
        "total_bytes": res.total_bytes,
        "layer_bytes": res.layer_bytes,
        "layer_fp32_bytes": res.layer_fp32_bytes,
        "ratio": res.ratio,
        "dense": res.dense,
        "seconds": seconds,
        "info": res.info,
    }
    from .deploy_text import export_key, update_deployment

    update_deployment(run, "exports", export_key(fmt, act, res.info), info)
    print(
        f"{fmt}: {out} ({res.total_bytes / 1e6:.2f} MB; compressed layers "
        f"{res.layer_bytes / 1e6:.3f} MB = {res.ratio:.4f}x their float32 "
        f"{res.layer_fp32_bytes / 1e6:.3f} MB) in {seconds:.1f} s"
    )
    for layer, why in res.dense.items():
        print(f"  kept dense: {layer}: {why}")
    if "calibration_agreement" in res.info:
        print(
            f"  int8 graph vs torch compressed model on the calibration inputs: top-1 agreement "
            f"{res.info['calibration_agreement']:.2f}%, relative error "
            f"{res.info['calibration_rel_error']:.4f}"
        )
    return 0


def calibration_args(entry: Any, model: Any, samples: int, seed: int = 0) -> list[Any]:
    """``samples`` calibration inputs of ``entry`` as positional-argument tuples of ``model``
    (the activation ranges of ``activations="int8"``)."""
    return [positional(model, b) for b in entry.calibration(samples, seed)]


# ------------------------------------------------------------------------------ bench
def _stats(times: list[float], batch: int) -> dict[str, float]:
    med = statistics.median(times)
    return {"median_ms": med * 1e3, "throughput": batch / med}


def _state_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _ort_session(path: Path, threads: int, qdq: bool = False) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads. ``qdq=False`` (weight-only
    graphs): ``session.disable_quant_qdq``, the ``DequantizeLinear`` of every constant integer
    weight is folded once when the graph is loaded, so Conv / MatMul run on prepacked float
    weights; with QDQ handling on, ONNX Runtime keeps those nodes and dequantizes on every call
    (digits-cnn 4-bit, batch 32: 15 ms instead of 0.6 ms). ``qdq=True`` (int8 activations):
    QDQ handling on, so Q/DQ groups fuse into integer kernels (QLinearConv, ...)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_feed(sess: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    tensors = [a for a in args if a is not None]
    names = [i.name for i in sess.get_inputs()]
    return {n: t.numpy() for n, t in zip(names, tensors, strict=False)}


def ort_model(path: Path, like: Any, qdq: bool, threads: int = 1) -> Any:
    """An exported ONNX file run by ONNX Runtime, called like the torch model ``like`` it was
    exported from, so that a zoo entry's ``evaluate`` scores the deployed graph itself: the
    same positional or keyword inputs (keywords laid out by ``positional``), and for a Hugging
    Face model ``like.config`` and an output with ``last_hidden_state`` (a base model, e.g.
    BertModel) or ``logits``. ``qdq``: as ``_ort_session`` (True for int8 activations)."""
    import torch
    from torch import nn

    sess = _ort_session(path, threads, qdq=qdq)
    graph_inputs = [i.name for i in sess.get_inputs()]
    hf = getattr(like, "config", None) is not None
    key = "last_hidden_state" if getattr(like, "base_model", None) is like else "logits"

    class OrtModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = getattr(like, "config", None)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            given = {**dict(zip(_names(like), args, strict=False)), **kwargs}
            tensors = {k: v for k, v in given.items() if torch.is_tensor(v)}
            if "attention_mask" in graph_inputs:
                tensors = with_mask(like, tensors)
            if all(n in tensors for n in graph_inputs):  # by name: the graph's own inputs
                feed = {n: tensors[n].numpy() for n in graph_inputs}
            else:  # a graph with generic names (input_0, ...): the forward's order
                feed = _ort_feed(sess, positional(like, tensors))
            out = torch.from_numpy(sess.run(None, feed)[0])
            if not hf:
                return out
            from transformers import modeling_outputs as mo

            if key == "logits":
                return mo.CausalLMOutput(logits=out)
            return mo.BaseModelOutput(last_hidden_state=out)

    return OrtModel().eval()


def _names(model: Any) -> list[str]:
    import inspect

    return list(inspect.signature(model.forward).parameters)


def bench(
    run: Path,
    runtime: str,
    batch: int,
    threads: int,
    repeats: int,
    warmup: int,
    activations: str | None = None,
    samples: int = 128,
    seq_len: int | None = None,
    matmul_nbits: bool = False,
    accuracy_level: int | None = None,
    models: Any = None,
) -> dict[str, Any]:
    """Dense fp32 vs the compressed run on ``runtime``, in one process, on ``batch`` inputs.
    ``models``: for a run of your own model, a function returning ``(dense, compressed, input
    batch, () -> int8 calibration batches)`` (``own_export.own_bench_models``), called once
    the options are checked; None: the zoo run's.
    ``activations="int8"`` (onnxruntime only): the compressed graph has static int8
    activations calibrated on ``samples`` calibration inputs, ``"int8-dynamic"``: int8
    activations quantized at run time (``optbrain.io.onnx_int8``); ``matmul_nbits``: linear
    layers of up to 4 bits as ``MatMulNBits`` at ``accuracy_level`` (``optbrain.io.onnx_nbits``).
    ``seq_len``: token models timed on sequences that long (default: the calibration windows')."""
    import torch

    from ..io.formats import check_options
    from ..pipeline.cost import time_pair

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}")
    if batch < 1 or threads < 1 or repeats < 1 or samples < 1:
        raise ValueError("--batch, --threads, --repeats and --samples must be at least 1")
    act = check_options(
        "onnx", activations=activations, matmul_nbits=matmul_nbits, accuracy_level=accuracy_level
    )
    if act != "float" and runtime != "onnxruntime":
        raise ValueError(f"--activations {act} needs --runtime onnxruntime (torch runs float)")
    if matmul_nbits and runtime != "onnxruntime":
        raise ValueError("--matmul-nbits needs --runtime onnxruntime (an ONNX Runtime kernel)")
    if models is None:
        entry, dense, model = load_run(run, run_model_name(run))
        x = example_batch(entry, batch, seq_len=seq_len)

        def calibrate() -> list[Any]:
            return calibration_args(entry, model, samples)
    else:
        dense, model, x, batches = models()

        def calibrate() -> list[Any]:
            return [positional(model, b) for b in batches()]

    args = onnx_inputs(model, x) if runtime == "onnxruntime" else positional(model, x)
    out: dict[str, Any] = {"runtime": runtime, "batch": batch, "threads": threads}
    if seq_len is not None:
        out["seq_len"] = seq_len
    if act != "float":
        out["activations"] = act
    if runtime == "torch":
        torch.set_num_threads(threads)
        with torch.inference_mode():
            td, tc = time_pair(lambda: dense(*args), lambda: model(*args), repeats, warmup)
        nbytes = {"dense": _state_bytes(dense), "compressed": _state_bytes(model)}
        out["note"] = "torch runs the compressed weights as dense float tensors"
    else:
        from ..io.onnx import export_dense_onnx, export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            pd = export_dense_onnx(dense, Path(tmp) / "dense.onnx", example_inputs=args)
            pc = Path(tmp) / "compressed.onnx"
            if act != "float":
                from ..io.onnx_int8 import export_onnx_int8

                cal = calibrate()
                res = export_onnx_int8(
                    model, pc, example_inputs=args, calibration=cal, dynamic=act == "int8-dynamic"
                )
                out["calibration_agreement"] = res.info["calibration_agreement"]
            else:
                res = export_onnx(
                    model,
                    pc,
                    example_inputs=args,
                    matmul_nbits=matmul_nbits,
                    accuracy_level=accuracy_level or 0,
                )
                if matmul_nbits:
                    out["matmul_nbits"] = len(res.info["matmul_nbits"])
                    out["accuracy_level"] = res.info["accuracy_level"]
            sd, sc = _ort_session(pd, threads), _ort_session(pc, threads, qdq=act != "float")
            fd, fc = _ort_feed(sd, args), _ort_feed(sc, args)
            nbytes = {"dense": pd.stat().st_size, "compressed": pc.stat().st_size}
            td, tc = time_pair(lambda: sd.run(None, fd), lambda: sc.run(None, fc), repeats, warmup)
    out.update(
        repeats=repeats,
        warmup=warmup,
        dense=_stats(td, batch),
        compressed=_stats(tc, batch),
        bytes=nbytes,
    )
    out["speedup"] = out["dense"]["median_ms"] / out["compressed"]["median_ms"]
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    run = Path(args.run)
    from .own_export import own_bench_models, own_source

    src = own_source(run) if run.is_dir() else None
    models = None if src is None else (lambda: own_bench_models(args, run, src, args.batch))
    if src is None and args.model:
        run_model_name(run, args.model)  # a zoo run: --model must name its model
    own = [f for f in ("calibration", "weights", "task") if src is None and getattr(args, f)]
    if own:
        raise ValueError(f"--{own[0]} is for runs of your own model; {run} is a zoo run")
    res = bench(
        run,
        args.runtime,
        args.batch,
        args.threads,
        args.repeats,
        args.warmup,
        activations=args.activations,
        samples=args.samples,
        seq_len=args.seq_len,
        matmul_nbits=args.matmul_nbits,
        accuracy_level=args.accuracy_level,
        models=models,
    )
    key = f"{args.runtime}-b{args.batch}-t{args.threads}"
    if args.seq_len is not None:
        key += f"-s{args.seq_len}"
    if res.get("activations"):
        key += f"-{res['activations']}"
    if "accuracy_level" in res:
        key += f"-nbits{res['accuracy_level']}"
    from .deploy_text import bench_table, update_deployment

    update_deployment(run, "bench", key, res)

    print(bench_table({"bench": {key: res}}))
    return 0


# ------------------------------------------------------------------------------ parsers
def add_parsers(sub: Any) -> None:
    """The ``export`` and ``bench`` subcommands on the CLI's subparsers."""
    from ..io.formats import FORMATS
    from ..io.hf import DTYPES

    x = sub.add_parser("export", help="write a run as a deployable file (ONNX, HF, packed)")
    x.add_argument("run", help="run directory written by 'optbrain compress'")
    x.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    x.add_argument("--out", required=True, help="file (onnx) or directory to write")
    x.add_argument(
        "--model",
        help="the zoo model the run must be of, or your own model's directory / module:factory "
        "(default: the run's)",
    )
    _activation_args(x)
    from .own_cmd import add_source_flags

    add_source_flags(x, data_flag=True)  # your own model: --weights, --calibration (onnx), ...
    x.add_argument(
        "--dtype",
        choices=DTYPES,
        help="compressed-tensors: float type of the tensors left unquantized (default: model's)",
    )
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="latency and throughput, dense vs compressed, one run")
    b.add_argument("run", help="run directory written by 'optbrain compress'")
    b.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    b.add_argument("--batch", type=int, default=1, help="inputs per call (default 1)")
    b.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    b.add_argument("--repeats", type=int, default=30, help="timed calls of each (default 30)")
    b.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    b.add_argument("--model", help="your own model's directory / module:factory (default: run's)")
    _activation_args(b)
    add_source_flags(b, data_flag=True)  # your own model: --calibration (the inputs), --seq-len
    b.set_defaults(func=cmd_bench)


def _activation_args(p: Any) -> None:
    from ..io.onnx_int8 import ACTIVATIONS

    p.add_argument(
        "--activations",
        choices=ACTIVATIONS,
        default="float",
        help="onnx: 'int8' = static int8 activations from the calibration set, 'int8-dynamic' "
        "= quantized at run time (integer kernels)",
    )
    p.add_argument(
        "--samples", type=int, default=128, help="calibration inputs for --activations int8"
    )
    p.add_argument(
        "--matmul-nbits",
        action="store_true",
        dest="matmul_nbits",
        help="onnx: linear layers of up to 4 bits as ONNX Runtime's fused MatMulNBits",
    )
    p.add_argument(
        "--accuracy-level",
        type=int,
        dest="accuracy_level",
        help="with --matmul-nbits: 0 = float32 (default), 4 = int8 activations in the kernel",
    )
