"""Reports: per-layer records as data (lossless JSON/CSV), rendered as text, markdown and HTML."""

from .memory import PeakMemory, peak_memory_tracker
from .records import CSV_COLUMNS, LayerRecord, Report
from .text import render_table

__all__ = [
    "CSV_COLUMNS",
    "LayerRecord",
    "PeakMemory",
    "Report",
    "peak_memory_tracker",
    "render_table",
]
