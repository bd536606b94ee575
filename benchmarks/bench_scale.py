"""Beyond one machine and beyond its memory (issue #15): Ray workers and layer-by-layer offload.

``db``: the fashion-cnn budget database (the one ``optbrain compress --model fashion-cnn
--target flops=0.25`` builds: every layer at every level, model-level errors on 32 samples)
with the local executor and with a local Ray of ``--workers`` one-thread workers (the local
run also one thread, so the bytes can be equal): wall time, whether the database files and
the allocation are the same, and a scaling model from the per-layer solve times — on N
workers, ``T(N) = serial + LPT_N(per-layer times)``, ``serial`` the measured time outside the
solves (calibration forwards, model-level errors, writes) and ``LPT_N`` the makespan of the
per-layer times scheduled longest first on N workers (the database's unit is one layer)::

    .venv/bin/python benchmarks/bench_scale.py db --workers 2

``offload``: a synthetic Llama (``--layers`` × hidden ``--hidden``, FFN ``--ffn``, vocab
``--vocab``, fp32, saved in 500 MB shards) compressed with GPTQ 4-bit under offload in a
fresh process (its peak RSS), then in memory (sequential mode) in another; the weights of the
two compared tensor by tensor (never both models in memory)::

    .venv/bin/python benchmarks/bench_scale.py offload --layers 8 --hidden 2048 --ffn 5504
"""

from __future__ import annotations

import argparse
import copy
import heapq
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402

RECIPE = {
    "rules": [{"method": "gptq", "bits": 4}],
    "ignore": ["lm_head"],
    "calibration": {"mode": "sequential", "samples": 8},
}


def lpt(times: list[float], n: int) -> float:
    """Makespan of ``times`` scheduled longest first on ``n`` workers."""
    loads = [0.0] * n
    for t in sorted(times, reverse=True):
        heapq.heapreplace(loads, loads[0] + t)
    return max(loads)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.*"))}


def bench_db(args: argparse.Namespace) -> None:
    from optbrain.app import zoo
    from optbrain.budget.api import compress_to_budget
    from optbrain.pipeline.executor import RayExecutor

    torch.set_num_threads(1)
    entry = zoo.get(args.model)
    dense = entry.load()
    batches = entry.calibration(args.samples, 0)
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    t0 = time.perf_counter()
    ray = RayExecutor(workers=args.workers).start()
    t_ray = time.perf_counter() - t0
    runs = {}
    try:
        warm = f"ray x{args.workers}, warm workers"  # the same again: torch imported already
        for label, ex in (("local", None), (f"ray x{args.workers}", ray), (warm, ray)):
            t0 = time.perf_counter()
            report = compress_to_budget(
                copy.deepcopy(dense),
                batches,
                args.target,
                db_dir=root / label.replace(" ", "").replace(",", ""),
                inputs=entry.inputs,
                seed=0,
                model_level=True,
                model_level_samples=32,
                quiet=True,
                executor=ex,
            )
            runs[label] = (time.perf_counter() - t0, report)
    finally:
        ray.close()
    rep_loc = runs["local"][1]
    dirs = {label: root / label.replace(" ", "").replace(",", "") for label in runs}
    ref = _files(dirs["local"])
    alloc = rep_loc.metadata["allocation"]["levels"]
    per = rep_loc.metadata["database_layer_seconds"]
    solve = sum(per.values())
    serial = rep_loc.metadata["database_seconds"] - solve
    print(f"model {args.model}, target {args.target}, {len(per)} layers, {args.samples} samples")
    print(f"ray start ({args.workers} workers): {t_ray:.1f} s (not in the times below)")
    print("| executor | compress_to_budget s | database s | same files | same allocation |")
    print("|---|---:|---:|---|---|")
    for label, (t, rep) in runs.items():
        same = _files(dirs[label]) == ref
        alloc_same = rep.metadata["allocation"]["levels"] == alloc
        print(f"| {label} | {t:.1f} | {rep.metadata['database_seconds']:.1f} | "
              f"{same} ({len(ref)} files) | {alloc_same} |")  # fmt: skip
    print(f"\nper-layer solve seconds (local): sum {solve:.1f}, max {max(per.values()):.1f}; "
          f"serial part {serial:.1f} s")  # fmt: skip
    print("| N workers | modelled database s | speedup |")
    print("|---:|---:|---:|")
    for n in (1, 2, 4, 8, 16):
        t = serial + lpt(list(per.values()), n)
        print(f"| {n} | {t:.1f} | {(serial + solve) / t:.2f}x |")
    print(json.dumps({k: round(v, 3) for k, v in per.items()}))


def _child(args: argparse.Namespace) -> None:
    """One side of ``offload`` in its own process: prints a JSON line."""
    import optbrain
    from optbrain.report import peak_memory_tracker

    torch.set_num_threads(args.threads)
    src = Path(args.src)
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, args.vocab, (4, 128), generator=g)} for _ in range(2)]
    t0 = time.perf_counter()
    if args.child == "offload":
        report = optbrain.compress(src, calib, RECIPE, offload=args.out, quiet=True)
        peak = report.metadata["peak_rss_mb"]
    else:
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        with peak_memory_tracker("cpu") as mem:
            model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True).eval()
            optbrain.compress(model, calib, RECIPE, quiet=True)
        peak = mem.peak_mb
        Path(args.out).mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(sd, str(Path(args.out) / "weights.safetensors"))
    print(json.dumps({"peak_rss_mb": peak, "seconds": time.perf_counter() - t0}))


def bench_offload(args: argparse.Namespace) -> None:
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(args.root or tempfile.mkdtemp(prefix="bench-offload-"))
    src = root / "llama"
    if not (src / "config.json").is_file():
        cfg = LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
            num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
            max_position_embeddings=512, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(src, max_shard_size="500MB")
        del model
    shards = list(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    print(f"synthetic Llama: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, vocab "
          f"{args.vocab}: {size / 1e9:.2f} GB fp32 in {len(shards)} shards")  # fmt: skip
    res = {}
    for side in ("offload", "memory"):
        out = root / side
        cmd = [sys.executable, __file__, "child", side, "--src", str(src), "--out", str(out),
               "--vocab", str(args.vocab), "--threads", str(args.threads)]  # fmt: skip
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[side] = json.loads(line.strip().splitlines()[-1])
        print(f"{side}: peak RSS {res[side]['peak_rss_mb']:.0f} MB, {res[side]['seconds']:.0f} s")
    index = json.loads((root / "offload" / "model" / "model.safetensors.index.json").read_text())
    equal = True
    with safe_open(str(root / "memory" / "weights.safetensors"), "pt") as ref:
        names = list(ref.keys())
        for n in names:
            with safe_open(str(root / "offload" / "model" / index["weight_map"][n]), "pt") as f:
                equal &= torch.equal(f.get_tensor(n), ref.get_tensor(n))
    print(f"weights equal to the in-memory run: {equal} ({len(names)} tensors)")
    print(f"peak RSS offload / model size: {res['offload']['peak_rss_mb'] * 2**20 / size:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("db")
    d.add_argument("--model", default="fashion-cnn")
    d.add_argument("--target", default="flops=0.25")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--samples", type=int, default=128)
    o = sub.add_parser("offload")
    o.add_argument("--layers", type=int, default=8)
    o.add_argument("--hidden", type=int, default=2048)
    o.add_argument("--ffn", type=int, default=5504)
    o.add_argument("--vocab", type=int, default=32000)
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--root", help="work directory (default: a new temporary one)")
    c = sub.add_parser("child")
    c.add_argument("child", choices=["offload", "memory"])
    for flag in ("--src", "--out"):
        c.add_argument(flag, required=True)
    c.add_argument("--vocab", type=int, required=True)
    c.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    {"db": bench_db, "offload": bench_offload, "child": _child}[args.cmd](args)


if __name__ == "__main__":
    main()
