"""Does int8 activation quantization speed a zoo CNN up on ONNX Runtime's CPU provider?

    python benchmarks/ort_static_int8.py --model fashion-cnn --batches 1 32 --threads 2
    python benchmarks/ort_static_int8.py --model fashion-cnn --reduce-range

Exports the dense model (``optbrain.io.onnx.export_dense_onnx``), quantizes it statically
with ONNX Runtime's own tool (``onnxruntime.quantization.quantize_static``: QDQ, int8 weights
per channel, uint8 activations with scales from the model's calibration set), and times both
graphs alternated call by call in one process (``optbrain.pipeline.cost.time_pair``); prints
latency, speedup, file sizes and the top-1 agreement of the int8 graph with the fp32 one on
held-out calibration-style inputs (another seed). ``--reduce-range``: 7-bit weights, which
avoids the int16 saturation of ONNX Runtime's u8×s8 kernels on AVX2 CPUs without VNNI (what
``optbrain.export(..., activations="int8")`` does). A probe for the README's claim of which
combinations speed up a CPU on the dense model; the library's own path is
``optbrain bench RUN --activations int8``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see optbrain/app/cli.py

import torch  # noqa: E402

from optbrain.app import deploy, zoo  # noqa: E402
from optbrain.io.onnx import export_dense_onnx  # noqa: E402
from optbrain.pipeline.cost import time_pair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fashion-cnn", help="zoo model with a tensor input")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--samples", type=int, default=128, help="calibration samples")
    ap.add_argument("--reduce-range", action="store_true", help="7-bit weights (AVX2 fix)")
    args = ap.parse_args()
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    entry = zoo.get(args.model)
    model = entry.load()
    d = Path(tempfile.mkdtemp(prefix="ort_int8_"))
    fp32 = export_dense_onnx(model, d / "fp32.onnx", example_inputs=deploy.example_batch(entry, 1))
    quant_pre_process(str(fp32), str(d / "pre.onnx"))
    batches = [b.numpy() for b in entry.calibration(args.samples, 0)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": b} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    int8 = d / "int8.onnx"
    quantize_static(
        str(d / "pre.onnx"),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=args.reduce_range,
    )

    def session(p: Path) -> ort.InferenceSession:
        o = ort.SessionOptions()
        o.intra_op_num_threads = args.threads
        return ort.InferenceSession(str(p), o, providers=["CPUExecutionProvider"])

    sd, sq = session(fp32), session(int8)
    print(
        f"{args.model}: fp32 {fp32.stat().st_size / 1e6:.3f} MB, "
        f"int8 {int8.stat().st_size / 1e6:.3f} MB"
    )
    print("| batch | threads | fp32 ms | int8 ms | speedup |\n|---:|---:|---:|---:|---:|")
    for b in args.batches:
        x = deploy.example_batch(entry, b).numpy()
        td, tq = time_pair(
            lambda x=x: sd.run(None, {"input": x}),
            lambda x=x: sq.run(None, {"input": x}),
            args.repeats,
            3,
        )
        md, mq = statistics.median(td) * 1e3, statistics.median(tq) * 1e3
        print(f"| {b} | {args.threads} | {md:.3f} | {mq:.3f} | {md / mq:.2f}x |")
    X = torch.cat(entry.calibration(512, 1))[:512].numpy()
    a = sd.run(None, {"input": X})[0].argmax(1)
    q = sq.run(None, {"input": X})[0].argmax(1)
    print(f"top-1 agreement int8 vs fp32 on 512 inputs (seed 1): {100 * (a == q).mean():.1f}%")


if __name__ == "__main__":
    main()
