"""``allocation_svg``: the level chosen for each layer as a self-contained inline SVG bar chart.

One bar per layer: its cost at the chosen level as a fraction of its dense cost (the target's
metric), labelled with the level id and coloured by kind (dense, pruned, quantized, both); a
dashed line marks the budget as a fraction of the whole model's dense cost. ``section_html``
wraps it for insertion into ``Report.to_html()`` pages (``insert_into_html``).
"""

from __future__ import annotations

from html import escape
from typing import Any

from .levels import Level

COLORS = {"dense": "#9e9e9e", "pruned": "#1f77b4", "quantized": "#ff7f0e", "both": "#8e44ad"}


def _kind(lid: str) -> str:
    lv = Level.parse(lid)
    if lv.is_dense:
        return "dense"
    if lv.prunes and lv.quantizes:
        return "both"
    return "pruned" if lv.prunes else "quantized"


def allocation_svg(allocation: dict[str, Any], *, bar: int = 34, height: int = 220) -> str:
    """SVG (a string) of ``report.metadata["allocation"]`` (``Allocation.to_dict()``)."""
    levels: dict[str, str] = allocation["levels"]
    costs = allocation.get("layer_costs", {})
    dense = allocation.get("layer_dense_costs", {})
    names = list(levels)
    longest = max((len(n[-24:]) for n in names), default=1)
    left, top, bottom = 44, 64, 24 + int(5.2 * longest)
    width = max(left + 16 + bar * max(1, len(names)), 4 * 78 + left)
    total_h = top + height + bottom
    y0 = top + height

    def y(v: float) -> float:
        return y0 - max(0.0, min(1.0, v)) * height

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
        f'viewBox="0 0 {width} {total_h}" font-family="sans-serif" font-size="10">',
        f"<title>{escape(str(allocation.get('target', {}).get('text', 'allocation')))}</title>",
    ]
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(
            f'<line x1="{left}" x2="{width - 8}" y1="{y(t):.1f}" y2="{y(t):.1f}" '
            'stroke="#e0e0e0"/>'
            f'<text x="{left - 4}" y="{y(t) + 3:.1f}" text-anchor="end">{t:g}</text>'
        )
    for i, n in enumerate(names):
        lid = levels[n]
        d = float(dense.get(n) or 0.0)
        frac = float(costs.get(n, 0.0)) / d if d else 0.0
        x = left + 8 + i * bar
        h = y0 - y(frac)
        out.append(
            f'<rect x="{x}" y="{y(frac):.1f}" width="{bar - 6}" height="{h:.1f}" '
            f'fill="{COLORS[_kind(lid)]}"><title>{escape(n)}: {escape(lid)} '
            f"({frac:.3f} of dense)</title></rect>"
        )
        cx = x + (bar - 6) / 2
        out.append(
            f'<text transform="translate({cx:.1f},{y(frac) - 3:.1f}) rotate(-60)" '
            f'font-size="9">{escape(lid)}</text>'
        )
        out.append(
            f'<text transform="translate({cx:.1f},{y0 + 6}) rotate(60)" '
            f'font-size="9">{escape(n[-24:])}</text>'
        )
    frac = allocation.get("predicted_fraction")
    budget, dense_total = allocation.get("budget"), allocation.get("dense_cost")
    if budget is not None and dense_total:
        b = float(budget) / float(dense_total)
        out.append(
            f'<line x1="{left}" x2="{width - 8}" y1="{y(b):.1f}" y2="{y(b):.1f}" '
            f'stroke="#d62728" stroke-dasharray="4 3"><title>budget {b:.4g} of dense'
            f"{'' if frac is None else f', allocation {float(frac):.4g}'}</title></line>"
        )
    lx = left
    for k, c in COLORS.items():
        out.append(
            f'<rect x="{lx}" y="6" width="10" height="10" fill="{c}"/>'
            f'<text x="{lx + 13}" y="15">{k}</text>'
        )
        lx += 78
    out.append("</svg>")
    return "".join(out)


def section_html(allocation: dict[str, Any]) -> str:
    """An HTML ``<section>`` with the allocation plot and its totals."""
    t = allocation.get("target", {}).get("text", "")
    parts = [
        "<section><h2>Budget allocation</h2>",
        f"<p>target <code>{escape(str(t))}</code>, objective "
        f"<code>{escape(str(allocation.get('objective')))}</code>: predicted cost "
        f"{allocation.get('predicted_fraction', 0) or 0:.4f}, achieved "
        f"{allocation.get('achieved_fraction', 0) or 0:.4f} of dense "
        "(bar: each layer's cost at its level / its dense cost).</p>",
        allocation_svg(allocation),
        "</section>",
    ]
    return "".join(parts)


def insert_into_html(page: str, allocation: dict[str, Any]) -> str:
    """``page`` (from ``Report.to_html()``) with the allocation section before ``</body>``
    (or appended when there is none)."""
    sec = section_html(allocation)
    i = page.rfind("<script>")
    if i < 0:
        i = page.rfind("</body>")
    return page[:i] + sec + page[i:] if i >= 0 else page + sec
