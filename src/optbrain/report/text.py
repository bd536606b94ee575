"""Text renderings of a ``Report``: the aligned terminal table (``render_table``) and markdown.

Also the value formatters, summary lines, metric rows and table columns that the HTML page
(``report.html``) shares, so every rendering shows the same numbers the same way.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .jsonlike import _plain
from .records import LayerRecord

if TYPE_CHECKING:
    from .records import ReportData as Report

__all__ = ["markdown", "render_table"]

# --------------------------------------------------------------------------- formatting


def _fmt_float(x: float | None, spec: str) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return format(x, spec)


def _fmt_loss(x: float | None) -> str:
    return _fmt_float(x, ".4g")


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else _fmt_float(100.0 * x, ".2f") + "%"


def _fmt_secs(x: float | None) -> str:
    return _fmt_float(x, ".3f")


def _fmt_mb(x: float | None) -> str:
    return _fmt_float(x, ".1f")


def _fmt_opt(x: Any) -> str:
    return "-" if x is None else str(x)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return _fmt_float(v, ".6g")
    if isinstance(v, (dict, list)):
        return json.dumps(_plain(v), ensure_ascii=False)
    return _fmt_opt(v)


def _summary_lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    methods = ", ".join(f"{m} × {n}" for m, n in s["methods"].items()) or "-"
    return [
        ("layers", f"{s['layers']} ({s['compressed']} compressed, {s['skipped']} skipped)"),
        ("parameters", f"{s['params']:,} ({s['params_compressed']:,} in compressed layers)"),
        ("overall sparsity", _fmt_pct(s["sparsity"])),
        ("sparsity of compressed layers", _fmt_pct(s["sparsity_compressed"])),
        ("mean bits (quantized layers)", _fmt_float(s["mean_bits"], ".3g")),
        ("total predicted loss", _fmt_loss(s["predicted_loss"])),
        ("total measured loss", _fmt_loss(s["measured_loss"])),
        ("total time (s)", _fmt_secs(s["seconds"])),
        ("of which solving (s)", _fmt_secs(s["solve_seconds"])),
        ("peak memory (MB)", _fmt_mb(s["peak_memory_mb"])),
        ("methods", methods),
        ("fallbacks", str(s["fallbacks"])),
    ]


def _metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(name, dense, compressed, change)`` strings; plain values go in the compressed column."""
    rows = []
    for name, v in metrics.items():
        if isinstance(v, dict) and ("dense" in v or "compressed" in v):
            d, c = v.get("dense"), v.get("compressed")
            change = "-"
            num = (int, float)
            if isinstance(d, num) and isinstance(c, num) and not isinstance(d, bool):
                delta = float(c) - float(d)
                change = f"{delta:+.4g}"
                if d != 0 and math.isfinite(delta):
                    change += f" ({100.0 * delta / abs(float(d)):+.2f}%)"
            rows.append((str(name), _fmt_value(d), _fmt_value(c), change))
        else:
            rows.append((str(name), "-", _fmt_value(v), "-"))
    return rows


@dataclass(frozen=True)
class _Col:
    key: str
    title: str
    right: bool
    fn: Any  # (index, record) -> str

    def get(self, i: int, r: LayerRecord) -> str:
        return str(self.fn(i, r))


def _status_text(r: LayerRecord) -> str:
    if r.compressed:
        return "compressed"
    return "skipped" + (f": {r.reason}" if r.reason else "")


def _table_columns(layers: list[LayerRecord]) -> list[_Col]:
    """Columns shown in the text / markdown tables; optional ones only when some layer has data."""
    cols = [
        _Col("index", "#", True, lambda i, r: i),
        _Col("layer", "layer", False, lambda i, r: r.label),
        _Col("type", "type", False, lambda i, r: r.type),
        _Col("shape", "shape", False, lambda i, r: "x".join(map(str, r.shape))),
        _Col("method", "method", False, lambda i, r: r.method),
        _Col("sparsity", "sparsity", True, lambda i, r: _fmt_pct(r.sparsity)),
    ]
    if any(r.pattern not in (None, "unstructured") for r in layers):
        cols.append(_Col("pattern", "pattern", False, lambda i, r: _fmt_opt(r.pattern)))
    cols.append(_Col("bits", "bits", True, lambda i, r: _fmt_opt(r.bits)))
    if any(r.group_size is not None for r in layers):
        cols.append(_Col("group_size", "group size", True, lambda i, r: _fmt_opt(r.group_size)))
    cols.append(_Col("tokens", "tokens", True, lambda i, r: r.tokens))
    cols.append(
        _Col("predicted_loss", "pred. loss", True, lambda i, r: _fmt_loss(r.predicted_loss))
    )
    if any(r.measured_loss is not None for r in layers):
        cols.append(
            _Col("measured_loss", "meas. loss", True, lambda i, r: _fmt_loss(r.measured_loss))
        )
    cols.append(_Col("seconds", "time (s)", True, lambda i, r: _fmt_secs(r.seconds)))
    if any(r.peak_memory_mb is not None for r in layers):
        cols.append(
            _Col("peak_memory_mb", "mem (MB)", True, lambda i, r: _fmt_mb(r.peak_memory_mb))
        )
    if any(r.fallback is not None for r in layers):
        cols.append(_Col("fallback", "fallback", False, lambda i, r: _fmt_opt(r.fallback)))
    cols.append(_Col("status", "status", False, lambda i, r: _status_text(r)))
    return cols


def _md_code(s: str) -> str:
    """``s`` as a markdown code span, safe inside a table cell."""
    s = s.replace("\n", " ").replace("|", "\\|")
    run = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (run + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _md_text(s: str) -> str:
    """Prose for markdown: HTML-significant characters escaped, ``|`` escaped for tables."""
    return html.escape(str(s).replace("\n", " "), quote=False).replace("|", "\\|")


def render_table(report: Report, *, max_name_width: int | None = None) -> str:
    """Plain-text table for the terminal: one aligned row per record, then summary lines.

    max_name_width: truncate layer names longer than this (with ``…``); None keeps them whole.
    """
    cols = _table_columns(report.layers)
    rows = []
    for i, r in enumerate(report.layers):
        row = [c.get(i, r) for c in cols]
        if max_name_width is not None:
            j = [c.key for c in cols].index("layer")
            if len(row[j]) > max_name_width:
                row[j] = row[j][: max(max_name_width - 1, 0)] + "…"
        rows.append(row)
    widths = [max([len(c.title)] + [len(row[j]) for row in rows]) for j, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        parts = []
        for j, (c, cell) in enumerate(zip(cols, cells, strict=True)):
            last = j == len(cols) - 1
            parts.append(
                cell.rjust(widths[j]) if c.right else (cell if last else cell.ljust(widths[j]))
            )
        return "  ".join(parts).rstrip()

    out = [line([c.title for c in cols]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    out.append("")
    if report.model:
        out.append(f"model: {report.model}")
    out += [f"{k}: {v}" for k, v in _summary_lines(report.summary())]
    for name, dense, comp, change in _metric_rows(report.metrics):
        out.append(f"{name}: {comp}" if dense == "-" else f"{name}: {dense} → {comp} ({change})")
    return "\n".join(out) + "\n"


def markdown(report: Report) -> str:
    """Markdown: summary bullets, metrics, the layer table, skipped layers with reasons and
    layers where a fallback policy fired. Layer names are code spans."""
    s = report.summary()
    out = [f"# optbrain report{': ' + _md_text(report.model) if report.model else ''}", ""]
    out += [f"- {k}: {v}" for k, v in _summary_lines(s)]
    out.append("")
    if report.metrics:
        out += [
            "## Metrics",
            "",
            "| metric | dense | compressed | change |",
            "|---|---|---|---|",
        ]
        for name, dense, comp, change in _metric_rows(report.metrics):
            cells = [_md_code(name), _md_text(dense), _md_text(comp), _md_text(change)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    cols = _table_columns(report.layers)
    out += ["## Layers", ""]
    out.append("| " + " | ".join(c.title for c in cols) + " |")
    out.append("|" + "|".join("---:" if c.right else "---" for c in cols) + "|")
    for i, r in enumerate(report.layers):
        cells = [_md_code(c.get(i, r)) if c.key == "layer" else _md_text(c.get(i, r)) for c in cols]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    skipped = [r for r in report.layers if not r.compressed]
    if skipped:
        out += ["## Skipped layers", ""]
        out += [
            f"- {_md_code(r.label)}: {_md_text(r.reason or 'no reason given')}" for r in skipped
        ]
        out.append("")
    fell = [r for r in report.layers if r.fallback is not None]
    if fell:
        out += ["## Fallbacks", ""]
        out += [f"- {_md_code(r.label)}: {_md_text(r.fallback or '')}" for r in fell]
        out.append("")
    return "\n".join(out)
