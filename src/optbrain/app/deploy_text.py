"""The deployment section of a run's report: ``update_deployment`` writes an entry into it,
``optbrain export`` / ``bench`` print it and ``optbrain report`` shows it (``deployment_table``);
``export_key`` names an export in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def update_deployment(run: Path, section: str, key: str, value: dict[str, Any]) -> None:
    """Put ``value`` at ``metadata.deployment[section][key]`` of the run's report.json."""
    from .._files import atomic_write
    from ..io.checkpoint import REPORT

    path = run / REPORT
    report = json.loads(path.read_text())
    dep = report.setdefault("metadata", {}).setdefault("deployment", {})
    dep.setdefault(section, {})[key] = value
    atomic_write(path, json.dumps(report, indent=1))


def bench_table(dep: dict[str, Any]) -> str:
    """Markdown: the exports (bytes) and benchmarks (latency, throughput) of a deployment
    section."""
    lines: list[str] = []
    exports = dep.get("exports") or {}
    if exports:
        lines += [
            "| export | total MB | layers MB | ratio vs fp32 layers | seconds |",
            "|---|---:|---:|---:|---:|",
        ]
        for fmt, e in exports.items():
            lines.append(
                f"| {fmt} | {e['total_bytes'] / 1e6:.3f} | {e['layer_bytes'] / 1e6:.3f} | "
                f"{e['ratio']:.4f} | {e['seconds']:.1f} |"
            )
    benches = dep.get("bench") or {}
    if benches:
        if lines:
            lines.append("")
        lines += [
            "| runtime | batch | threads | dense ms | compressed ms | speedup | "
            "dense items/s | compressed items/s | dense MB | compressed MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in benches.values():
            d, c = b["dense"], b["compressed"]
            lines.append(
                f"| {_runtime_label(b)} | {b['batch']} | {b['threads']} | {d['median_ms']:.3f} | "
                f"{c['median_ms']:.3f} | {b['speedup']:.2f}x | {d['throughput']:.1f} | "
                f"{c['throughput']:.1f} | {b['bytes']['dense'] / 1e6:.3f} | "
                f"{b['bytes']['compressed'] / 1e6:.3f} |"
            )
    return "\n".join(lines)


def export_key(fmt: str, act: str, info: dict[str, Any]) -> str:
    """The key of an export in the deployment section: the format, then ``-ACTIVATIONS`` for
    integer activations or ``-nbitsLEVEL`` for MatMulNBits layers."""
    if act != "float":
        return f"{fmt}-{act}"
    if "accuracy_level" in info:
        return f"{fmt}-nbits{info['accuracy_level']}"
    return fmt


def _runtime_label(b: dict[str, Any]) -> str:
    """``onnxruntime``, ``onnxruntime int8 activations`` for a graph with int8 ones, or
    ``onnxruntime MatMulNBits (accuracy level L)``."""
    act = b.get("activations")
    if act:
        return f"{b['runtime']} {act} activations"
    if "accuracy_level" in b:
        return f"{b['runtime']} MatMulNBits (accuracy level {b['accuracy_level']})"
    return b["runtime"]


def deployment_table(report: Any) -> str:
    """``bench_table`` of a report's ``metadata["deployment"]`` ("" when it has none)."""
    dep = (getattr(report, "metadata", None) or {}).get("deployment")
    return bench_table(dep) if dep else ""
