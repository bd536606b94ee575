"""Reports: per-layer records as data (lossless JSON/CSV), rendered as text, markdown and HTML."""

from .records import CSV_COLUMNS, LayerRecord, PeakMemory, Report, peak_memory_tracker, render_table

__all__ = [
    "CSV_COLUMNS",
    "LayerRecord",
    "PeakMemory",
    "Report",
    "peak_memory_tracker",
    "render_table",
]
