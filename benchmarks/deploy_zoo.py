"""Deployable artefacts of zoo models: export time and sizes per format, ONNX Runtime latency.

    python benchmarks/deploy_zoo.py --model fashion-cnn --method gptq --bits 8 \
        --formats safetensors onnx --batches 1 32 --threads 2

    python benchmarks/deploy_zoo.py --model fashion-cnn --recipe recipe.yaml \
        --formats onnx --activations int8 --batches 1 32 --threads 2
    python benchmarks/deploy_zoo.py --model efficientnet-lite0 --run RUN_DIR \
        --formats onnx --activations int8 --batches 1 32 --threads 2
    python benchmarks/deploy_zoo.py --model smollm2-135m --method gptq --bits 4 \
        --formats compressed-tensors --dtype bfloat16 --batches --limit 2

    python benchmarks/deploy_zoo.py --model smollm2-135m --method gptq --bits 4 \
        --formats onnx --activations float nbits0 nbits4 --batches 1 --seq-len 128

Per model: compress with the recipe (``--recipe`` YAML path or text, ``--method``..., or the
entry's default; or take the saved run ``--run``), evaluate, then for each format
``optbrain.export`` with its wall time, the bytes of the compressed layers against their float32
bytes and the files (compressed-tensors: also the bytes of the dense model's own
``save_pretrained`` directory, and the metric of the directory loaded back with plain
``transformers``; onnx: one file per ``--activations`` value, its output's relative error
against the torch compressed model and the entry's metrics computed from the ONNX Runtime
outputs, ``deploy.ort_model``); then ``optbrain.app.deploy.bench`` on ONNX Runtime (dense fp32
graph vs the compressed graph with those activations, alternated call by call in this one
process, median of the repeats after warm-up) for each activations value and batch size
(``--seq-len``: token models timed at that length). Prints one JSON object per model and
markdown tables.

    python benchmarks/deploy_zoo.py --model minilm \
        --recipe benchmarks/recipes/minilm_heads_ffn_0.5.yaml --formats onnx \
        --activations float int8-dynamic --batches 1 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402

from optbrain.app import deploy, zoo  # noqa: E402
from optbrain.app.runs import run_zoo  # noqa: E402
from optbrain.io import export  # noqa: E402
from optbrain.recipe import Recipe  # noqa: E402


def rel_error(entry, model, path: Path, act: str) -> float:
    """Relative L2 error of the ONNX graph's output against the torch model's on 8 inputs."""
    from optbrain.pipeline.shrink import first_tensor

    args = deploy.onnx_inputs(model, deploy.example_batch(entry, 8, seed=1))
    with torch.no_grad():
        ref = first_tensor(model(*args))
        got = first_tensor(deploy.ort_model(path, model, qdq=act.startswith("int8"))(*args))
    return float((got - ref).norm() / ref.norm())


def _nbits(act: str) -> dict:
    """``nbitsL`` -> the export / bench options of MatMulNBits layers at accuracy level L."""
    level = act.removeprefix("nbits")
    if not level.isdigit():
        raise SystemExit(f"--activations {act}: write nbits0 or nbits4 (the accuracy level)")
    return {"matmul_nbits": True, "accuracy_level": int(level)}


def hf_directory(entry, path: Path, total: int, limit: int | None) -> dict:
    """The dense model's ``save_pretrained`` bytes, the export's ratio to them, and the metric
    of the exported directory loaded by plain transformers (``from_pretrained``)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        entry.load().save_pretrained(tmp)
        dense = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    metrics = entry.evaluate(loaded, limit=limit)
    return {"dense_dir_bytes": dense, "dir_ratio": total / dense, "loaded_metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", required=True, help="zoo model name(s)")
    ap.add_argument("--method", help="solver (default: the entry's recipe)")
    ap.add_argument("--sparsity", type=float)
    ap.add_argument("--pattern")
    ap.add_argument("--bits", type=int)
    ap.add_argument("--group-size", type=int, dest="group_size")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--limit", type=int, help="evaluate on the first N examples only")
    ap.add_argument("--recipe", help="recipe YAML path or text (instead of --method ...)")
    ap.add_argument("--run", help="an existing run directory of --model (e.g. a budget run "
                    "saved by latency_budget.py --out) instead of compressing here")  # fmt: skip
    ap.add_argument("--formats", nargs="+", default=["safetensors", "onnx"])
    ap.add_argument(
        "--activations", nargs="+", default=["float"],
        help="onnx: float, int8, int8-dynamic, or nbitsL (float activations, MatMulNBits "
        "layers at accuracy level L: nbits0, nbits4)",
    )  # fmt: skip
    ap.add_argument("--seq-len", type=int, help="token models: sequence length to time")
    ap.add_argument("--dtype", help="compressed-tensors: float16 / bfloat16 for the rest")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", help="keep the runs and files here (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="deploy_zoo_"))
    rows = []
    for name in args.model:
        entry = zoo.get(name)
        recipe = dict(entry.recipe)
        if args.recipe:
            recipe = Recipe.coerce(args.recipe).to_dict()
        elif args.method:
            rule = {"method": args.method}
            for k in ("sparsity", "pattern", "bits", "group_size"):
                if getattr(args, k) is not None:
                    rule[k] = getattr(args, k)
            recipe = {"rules": [rule], "calibration": {"samples": args.samples}}
        run = root / name
        t0 = time.perf_counter()
        if args.run:  # the run as saved, applied to a fresh dense copy
            run = Path(args.run)
            _, dense, model = deploy.load_run(run, deploy.run_model_name(run, name))
            comp, dm = entry.evaluate(model, dense=dense, limit=args.limit), entry.evaluate(dense)
            metrics = {k: {"dense": dm.get(k), "compressed": v} for k, v in comp.items()}
            recipe = {"run": str(run)}
        else:
            model, report = run_zoo(name, recipe, run, quiet=True, limit=args.limit)
            metrics = report.metrics
        res: dict = {"model": name, "recipe": recipe, "compress_s": time.perf_counter() - t0}
        res["metrics"] = metrics
        exports = [(f, "float") for f in args.formats if f != "onnx"]
        exports += [("onnx", a) for a in args.activations] if "onnx" in args.formats else []
        for fmt, act in exports:
            kw: dict = {}
            if fmt == "onnx":
                kw["example_inputs"] = deploy.onnx_inputs(model, deploy.example_batch(entry, 1))
                if act.startswith("nbits"):
                    kw.update(_nbits(act))
                elif act != "float":
                    kw["activations"] = act
                    kw["calibration"] = deploy.calibration_args(entry, model, args.samples)
            if fmt == "compressed-tensors" and args.dtype:
                kw["dtype"] = args.dtype
            key = fmt if act == "float" else f"{fmt}-{act}"
            path = root / f"{name}.{fmt}" if fmt != "onnx" else root / f"{name}.{key}.onnx"
            t0 = time.perf_counter()
            e = export(model, path, format=fmt, **kw)
            res[key] = {
                "seconds": time.perf_counter() - t0,
                "total_bytes": e.total_bytes,
                "layer_bytes": e.layer_bytes,
                "layer_fp32_bytes": e.layer_fp32_bytes,
                "ratio": e.ratio,
                "dense_layers": len(e.dense),
                "dense_why": sorted(set(e.dense.values())),
                "info": e.info,
            }
            if fmt == "compressed-tensors":
                res[key].update(hf_directory(entry, path, e.total_bytes, args.limit))
            if fmt == "onnx":  # the metric of what is deployed: the graph run by ONNX Runtime
                res[key]["rel_error_vs_torch"] = rel_error(entry, model, path, act)
                ort = deploy.ort_model(path, model, qdq=act.startswith("int8"))
                res[key]["ort_metrics"] = entry.evaluate(ort, dense=entry.load(), limit=args.limit)
        for act in args.activations:
            for b in args.batches:
                nb = _nbits(act) if act.startswith("nbits") else {}
                res[f"ort_b{b}_{act}"] = deploy.bench(
                    run, "onnxruntime", b, args.threads, args.repeats, 5,
                    "float" if nb else act, args.samples, seq_len=args.seq_len, **nb,
                )  # fmt: skip
        print(json.dumps(res, default=str), flush=True)
        rows.append(res)
    print("\n| model | export | MB | layer ratio | export s | metric: dense / torch / ONNX Runtime "
          "| ORT vs torch rel. error |")  # fmt: skip
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        key = zoo.get(r["model"]).primary
        m = r["metrics"].get(key, {})
        for name, f in r.items():
            if isinstance(f, dict) and "total_bytes" in f:
                ort = f.get("ort_metrics", {}).get(key)
                err = f.get("rel_error_vs_torch")
                print(
                    f"| {r['model']} | {name} | {f['total_bytes'] / 1e6:.2f} | {f['ratio']:.4f} | "
                    f"{f['seconds']:.1f} | {key} {m.get('dense'):.4f} / {m.get('compressed'):.4f}"
                    f" / {'—' if ort is None else f'{ort:.4f}'} | "
                    f"{'—' if err is None else f'{err:.2e}'} |"
                )
    print(
        "\n| model | activations | batch | threads | ORT dense ms | ORT compressed ms | speedup |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for act in args.activations:
            for b in args.batches:
                x = r[f"ort_b{b}_{act}"]
                print(
                    f"| {r['model']} | {act} | {b} | {x['threads']} | "
                    f"{x['dense']['median_ms']:.3f} | {x['compressed']['median_ms']:.3f} | "
                    f"{x['speedup']:.2f}x |"
                )


if __name__ == "__main__":
    main()
