"""The self-contained HTML report page, rendered from jinja2 templates shipped as package data.

``report_html`` fills ``templates/report.html.j2`` (CSS and the table-sorting script are
included from ``templates/``; the plots come from ``report.charts``); ``insert_into_html`` adds
the budget allocation section (``templates/allocation.html.j2``) to such a page. Every value is
autoescaped by jinja2; only the SVG built by ``report.charts`` (which escapes its own text)
enters as markup.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
from markupsafe import Markup

from .charts import allocation_svg, layer_plots
from .jsonlike import _plain
from .records import LayerRecord
from .text import (
    _fmt_float,
    _fmt_loss,
    _fmt_mb,
    _fmt_opt,
    _fmt_pct,
    _fmt_secs,
    _fmt_value,
    _metric_rows,
    _status_text,
    _summary_lines,
)

if TYPE_CHECKING:
    from .records import ReportData as Report

__all__ = ["insert_into_html", "report_html", "section_html"]

_HEADS = (
    "#",
    "layer",
    "type",
    "shape",
    "method",
    "tokens",
    "damping",
    "fallback",
    "sparsity",
    "pattern",
    "bits",
    "group size",
    "pred. loss",
    "meas. loss",
    "time (s)",
    "mem (MB)",
    "status",
)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("optbrain.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def _num_attr(v: float | int | None) -> str:
    """``data-v`` for sorting: repr of the number; '' for None; NaN sorts as a string."""
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def _cell(text: str, *, sort: str | None = None, num: bool = False, code: bool = False) -> dict:
    return {"text": text, "sort": sort, "num": num, "code": code}


def _row(i: int, r: LayerRecord) -> dict[str, Any]:
    def num(v: float | int | None, text: str) -> dict:
        return _cell(text, sort=_num_attr(v), num=True)

    cells = [
        num(i, str(i)),
        _cell(r.label, code=True),
        _cell(r.type),
        _cell("x".join(map(str, r.shape)), sort=str(r.numel)),
        _cell(r.method),
        num(r.tokens, str(r.tokens)),
        num(r.damping, _fmt_float(r.damping, ".3g")),
        _cell(_fmt_opt(r.fallback)),
        num(r.sparsity, _fmt_pct(r.sparsity)),
        _cell(_fmt_opt(r.pattern)),
        num(r.bits, _fmt_opt(r.bits)),
        num(r.group_size, _fmt_opt(r.group_size)),
        num(r.predicted_loss, _fmt_loss(r.predicted_loss)),
        num(r.measured_loss, _fmt_loss(r.measured_loss)),
        num(r.seconds, _fmt_secs(r.seconds)),
        num(r.peak_memory_mb, _fmt_mb(r.peak_memory_mb)),
        _cell(_status_text(r)),
    ]
    return {"cells": cells, "skipped": not r.compressed}


def report_html(report: Report, log_loss: bool | None = None) -> str:
    """The page of ``Report.to_html`` (see there)."""
    plots = None
    if report.layers:
        p = layer_plots(report, log_loss)
        plots = {
            "loss": Markup(p.loss),
            "sparsity": Markup(p.sparsity),
            "bits": Markup(p.bits),
            "time": Markup(p.time),
            "log_loss": p.log_loss,
            "measured": p.measured,
        }
    recipe = None
    if report.recipe is not None:
        recipe = json.dumps(_plain(report.recipe), indent=2, ensure_ascii=False)
    page = _env().get_template("report.html.j2")
    return page.render(
        report=report,
        title="optbrain report" + (f" — {report.model}" if report.model else ""),
        created=report.metadata.get("created"),
        summary=_summary_lines(report.summary()),
        metrics=_metric_rows(report.metrics),
        plots=plots,
        heads=_HEADS,
        rows=[_row(i, r) for i, r in enumerate(report.layers)],
        skipped=[r for r in report.layers if not r.compressed],
        recipe=recipe,
        metadata=[(str(k), _fmt_value(v)) for k, v in report.metadata.items()],
    )


def section_html(allocation: dict[str, Any]) -> str:
    """An HTML ``<section>`` with the allocation plot and its totals."""
    section = (
        _env()
        .get_template("allocation.html.j2")
        .render(
            target=str(allocation.get("target", {}).get("text", "")),
            objective=str(allocation.get("objective")),
            predicted=allocation.get("predicted_fraction", 0) or 0,
            achieved=allocation.get("achieved_fraction", 0) or 0,
            svg=Markup(allocation_svg(allocation)),
        )
    )
    return section.strip("\n")


def insert_into_html(page: str, allocation: dict[str, Any]) -> str:
    """``page`` (from ``Report.to_html()``) with the allocation section before ``</body>``
    (or appended when there is none)."""
    sec = section_html(allocation)
    i = page.rfind("<script>")
    if i < 0:
        i = page.rfind("</body>")
    return page[:i] + sec + page[i:] if i >= 0 else page + sec
