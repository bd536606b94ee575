"""Reports: per-layer records as data (lossless JSON/CSV), rendered as text, markdown and HTML.

``Report`` is the data (``records.ReportData``) plus its renderings; the data module imports no
renderer and the renderers import only the data, so the room has no import circle.
"""

from __future__ import annotations

from pathlib import Path

from .memory import PeakMemory, peak_memory_tracker
from .records import CSV_COLUMNS, LayerRecord, ReportData, _write
from .text import markdown, render_table


class Report(ReportData):
    """A compression run: per-layer records plus model-level data, with its renderings."""

    def to_markdown(self) -> str:
        """Markdown: summary bullets, metrics, the layer table, skipped layers with reasons and
        layers where a fallback policy fired. Layer names are code spans (``report.text``)."""
        return markdown(self)

    def to_html(self, path: str | Path | None = None, *, log_loss: bool | None = None) -> str:
        """A self-contained HTML page (no network): summary, metrics, four inline-SVG plots
        (per-layer loss, sparsity, bits, time), the layer table (click a header to sort),
        skipped layers, recipe and metadata. All text is HTML-escaped.

        log_loss: initial scale of the loss plot (a checkbox on the page switches it);
        None = log when the positive losses span more than two decades.
        """
        from .html import report_html  # jinja2 is loaded only when a page is rendered

        page = report_html(self, log_loss)
        _write(path, page)
        return page


__all__ = [
    "CSV_COLUMNS",
    "LayerRecord",
    "PeakMemory",
    "Report",
    "ReportData",
    "peak_memory_tracker",
    "render_table",
]
