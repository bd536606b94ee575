"""Terminal text of the application floor: metrics and budget-allocation tables (markdown)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..report import Report

__all__ = ["allocation_table", "eval_table", "print_metrics"]


def print_metrics(report: Report) -> None:
    """Print the report's metrics (dense vs compressed) as a markdown table, if it has any,
    and what the refit to the dense outputs did, if it ran."""
    refit = report.metadata.get("refit")
    if refit:
        before = sum(r["loss_before"] for r in refit["layers"])
        after = sum(r["loss_after"] for r in refit["layers"])
        print(
            f"\nrefit to the dense outputs: {len(refit['layers'])} layer(s), summed layer error "
            f"{before:.4g} → {after:.4g} in {refit['seconds']:.1f} s; left alone: "
            + (", ".join(f"{k} ({v})" for k, v in refit["skipped"].items()) or "none")
        )
    if not report.metrics:
        return
    print("\n| metric | dense | compressed |\n|---|---:|---:|")
    for k, v in report.metrics.items():
        if isinstance(v, dict):
            d, c = v.get("dense"), v.get("compressed")
            fd = "—" if d is None else f"{d:.4f}"
            fc = "—" if c is None else f"{c:.4f}"
            print(f"| {k} | {fd} | {fc} |")
        else:
            print(f"| {k} | {v} | |")


def eval_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per metric, one column per evaluated model (``dense``, ``compressed``)."""
    keys = sorted({k for m in metrics.values() for k in m})
    cols = list(metrics)
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for k in keys:
        vals = [metrics[c].get(k) for c in cols]
        lines.append(
            f"| {k} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in vals) + " |"
        )
    return "\n".join(lines)


def allocation_table(report: Report) -> str:
    """Markdown: layer, level, cost fraction of the layer, error; then the totals."""
    a = report.metadata["allocation"]
    lines = ["| layer | level | cost / dense | error |", "|---|---|---:|---:|"]
    for n, lid in a["levels"].items():
        d = a["layer_dense_costs"].get(n) or 0.0
        frac = a["layer_costs"][n] / d if d else 0.0
        lines.append(f"| {n} | {lid} | {frac:.3f} | {a['layer_errors'][n]:.4g} |")
    lines.append("")
    lines.append(
        f"target {a['target']['text']}: budget {a['budget']:.6g} of dense {a['dense_cost']:.6g} "
        f"({a['metric']}); predicted {a['predicted_cost']:.6g} "
        f"({a['predicted_fraction']:.4f}), achieved {a['achieved_cost']:.6g} "
        f"({a['achieved_fraction']:.4f}), objective {a['objective']}"
    )
    others = ", ".join(
        f"{m} {v['fraction']:.4f}" for m, v in a["all_costs"].items() if v["fraction"] is not None
    )
    lines.append(f"all costs as a fraction of dense: {others}")
    return "\n".join(lines)
