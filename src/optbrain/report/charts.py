"""The one chart module: inline SVG bar charts (no network, no plotting library).

One geometry / axis / label engine (``_geom``, ``_bars``, ``_xlabels``, ``_svg``) draws every
plot: the four per-layer plots of the report page (``layer_plots``: loss, sparsity, bits, time)
and the budget allocation chart (``allocation_svg``: the cost of each layer at its chosen level
as a fraction of its dense cost, coloured by kind, with the budget as a dashed line).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .text import _fmt_loss, _fmt_pct, _fmt_secs

if TYPE_CHECKING:
    from .records import ReportData as Report

__all__ = ["KIND_COLORS", "allocation_svg", "layer_plots"]

_E = html.escape  # quote=True by default: safe in text and attribute values

_PLOT_H = 200.0
_TOP = 16.0
_LEFT = 72.0
_RIGHT = 16.0
_MAX_NAMED = 60  # above this many layers, x labels show indices instead of names
_LABEL_CHARS = 28
_COLOR = {"ok": "#3b6fc4", "skipped": "#b8b8b8", "bad": "#c43b3b", "mark": "#222"}


@dataclass(frozen=True)
class _Geom:
    n: int
    slot: float
    left: float
    named: bool
    bottom: float
    top: float = _TOP
    plot_h: float = _PLOT_H
    min_width: float = 0.0

    @property
    def width(self) -> float:
        return max(self.min_width, self.left + self.n * self.slot + _RIGHT)

    @property
    def height(self) -> float:
        return self.top + self.plot_h + self.bottom

    @property
    def base(self) -> float:
        return self.top + self.plot_h

    def x(self, i: int) -> float:
        return self.left + i * self.slot


def _geom(
    labels: list[str],
    *,
    slot: float | None = None,
    top: float = _TOP,
    plot_h: float = _PLOT_H,
    min_width: float = 0.0,
) -> _Geom:
    """Layout for one bar per label; ``slot`` (bar pitch) defaults to fit ~720 px."""
    n = max(len(labels), 1)
    slot = max(6.0, min(36.0, 720.0 / n)) if slot is None else float(slot)
    named = len(labels) <= _MAX_NAMED
    longest = min(max((len(s) for s in labels), default=1), _LABEL_CHARS)
    bottom = 20.0 + (longest * 6.0 * 0.87 if named else 14.0)  # rotated −60°: ≈ len·w·sin60
    # a rotated name reaches ≈ len·w·cos60 to the left of its bar: keep the first one on the page
    left = max(_LEFT, (longest * 6.0 * 0.5 - slot / 2 + 8.0) if named else 0.0)
    return _Geom(len(labels), slot, left, named, bottom, top, plot_h, min_width)


def _nice_ticks(vmax: float, n: int = 5) -> list[float]:
    """0 = t_0 < … < t_k ≥ vmax with a 1/2/2.5/5·10^e step."""
    if not (math.isfinite(vmax) and vmax > 0):
        vmax = 1.0
    raw = vmax / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = 10.0 * mag
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * mag * (1 + 1e-9):
            step = m * mag
            break
    k = max(1, math.ceil(vmax / step - 1e-9))
    return [i * step for i in range(k + 1)]


def _f(x: float) -> str:
    return f"{x:.1f}"


def short_label(s: str, n: int = _LABEL_CHARS) -> str:
    """``s`` in at most ``n`` characters: whole leading dotted parts dropped for an ``…``
    (``model.layers.11.self_attn.q_proj`` → ``…layers.11.self_attn.q_proj``), so the layer
    number and the projection stay; a single part still too long keeps its tail."""
    if len(s) <= n:
        return s
    parts = s.split(".")
    while len(parts) > 1 and len(".".join(parts)) + 1 > n:
        parts.pop(0)
    tail = ".".join(parts)
    return "…" + (tail if len(tail) + 1 <= n else tail[-(n - 1) :])


def _xlabels(g: _Geom, labels: list[str]) -> str:
    out = []
    y = g.base + 12
    if g.named:
        for i, s in enumerate(labels):
            cx = g.x(i) + g.slot / 2
            short = short_label(s)
            out.append(
                f'<text class="xl" transform="translate({_f(cx)},{_f(y)}) rotate(-60)" '
                f'text-anchor="end">{_E(short)}<title>{_E(s)}</title></text>'
            )
    else:
        every = max(1, math.ceil(g.n / 20))
        for i in range(0, g.n, every):
            cx = g.x(i) + g.slot / 2
            out.append(f'<text class="xl" x="{_f(cx)}" y="{_f(y)}" text-anchor="middle">{i}</text>')
        out.append(
            f'<text class="xl" x="{_f(g.left + g.n * g.slot / 2)}" y="{_f(g.height - 4)}" '
            f'text-anchor="middle">layer index (see table)</text>'
        )
    return "".join(out)


def _bars(
    g: _Geom,
    values: list[float | None],
    fills: list[str],
    titles: list[str],
    *,
    log: bool,
    unit: str,
    top: float | None = None,
    marks: list[float | None] | None = None,
    over: list[str] | None = None,
    rules: list[tuple[float, str]] | None = None,
) -> str:
    """Axes + bars in one ``<g>``. Non-drawable values (None, NaN, ≤ 0 on a log axis) get a
    marker on the baseline; +inf draws a red bar to the top; every bar has a ``<title>``.

    fills: bar colours; marks: a dark tick per bar (measured loss); over: a label written
    above each bar; rules: ``(value, title)`` dashed red lines across the plot (a budget)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    finite += [m for m in (marks or []) if m is not None and math.isfinite(m)]
    if log:
        pos = [v for v in finite if v > 0]
        lo = math.floor(math.log10(0.5 * min(pos))) if pos else -1  # smallest bar stays visible
        hi = math.ceil(math.log10(max(pos))) if pos else 0
        hi = max(hi, lo + 1)
        step = max(1, math.ceil((hi - lo) / 8))
        ticks = [lo]
        while ticks[-1] < hi:
            ticks.append(ticks[-1] + step)
        hi = ticks[-1]

        def y(v: float) -> float | None:
            if not v > 0:
                return None
            t = (math.log10(v) - lo) / (hi - lo)
            return g.base - g.plot_h * min(max(t, 0.0), 1.0)

        tick_pos = [(g.base - g.plot_h * (t - lo) / (hi - lo), f"{10.0**t:g}") for t in ticks]
    else:
        tk = _nice_ticks(top if top is not None else max(finite, default=0.0))
        vtop = tk[-1]

        def y(v: float) -> float | None:
            if v < 0:
                return None
            return g.base - g.plot_h * min(v / vtop, 1.0)

        tick_pos = [(g.base - g.plot_h * t / vtop, f"{t:g}") for t in tk]

    out = []
    for ty, text in tick_pos:
        out.append(
            f'<line class="grid" stroke="#eee" x1="{_f(g.left)}" x2="{_f(g.width - _RIGHT)}" '
            f'y1="{_f(ty)}" y2="{_f(ty)}"/>'
            f'<text class="yl" x="{_f(g.left - 6)}" y="{_f(ty + 4)}" text-anchor="end">'
            f"{_E(text)}</text>"
        )
    mid = g.top + g.plot_h / 2
    out.append(
        f'<text class="yl" transform="translate(14,{_f(mid)}) rotate(-90)" '
        f'text-anchor="middle">{_E(unit)}{" (log)" if log else ""}</text>'
    )
    bw = g.slot * 0.72
    for i, (v, color, title) in enumerate(zip(values, fills, titles, strict=True)):
        x0 = g.x(i) + (g.slot - bw) / 2
        tt = f"<title>{_E(title)}</title>"
        if v is not None and math.isinf(v) and v > 0:
            out.append(
                f'<rect x="{_f(x0)}" y="{_f(g.top)}" width="{_f(bw)}" height="{_f(g.plot_h)}" '
                f'fill="{_COLOR["bad"]}">{tt}</rect>'
            )
            continue
        yy = None if v is None or math.isnan(v) else y(v)
        if yy is None or (v == 0 and not log):
            bad = v is not None and (math.isnan(v) or v < 0)
            fill = _COLOR["bad"] if bad else color
            out.append(
                f'<rect x="{_f(x0)}" y="{_f(g.base - 2)}" width="{_f(bw)}" height="2" '
                f'fill="{fill}">{tt}</rect>'
            )
            if bad:
                out.append(
                    f'<text class="bad" fill="#c43b3b" font-weight="bold" '
                    f'x="{_f(x0 + bw / 2)}" y="{_f(g.base - 5)}" '
                    f'text-anchor="middle">×{tt}</text>'
                )
            continue
        h = max(g.base - yy, 1.0)
        out.append(
            f'<rect x="{_f(x0)}" y="{_f(g.base - h)}" width="{_f(bw)}" height="{_f(h)}" '
            f'fill="{color}">{tt}</rect>'
        )
        if over is not None:
            out.append(
                f'<text transform="translate({_f(x0 + bw / 2)},{_f(g.base - h - 3)}) '
                f'rotate(-60)" font-size="9">{_E(over[i])}</text>'
            )
    for i, m in enumerate(marks or []):
        if m is None or not math.isfinite(m):
            continue
        my = y(m)
        if my is None:
            continue
        x0 = g.x(i) + g.slot * 0.05
        out.append(
            f'<line class="mark" stroke="#222" stroke-width="2" '
            f'x1="{_f(x0)}" x2="{_f(x0 + g.slot * 0.9)}" y1="{_f(my)}" '
            f'y2="{_f(my)}"><title>{_E(titles[i])}</title></line>'
        )
    for value, title in rules or []:
        ry = y(value)
        if ry is not None:
            out.append(
                f'<line class="rule" stroke="{_COLOR["bad"]}" stroke-dasharray="4 3" '
                f'x1="{_f(g.left)}" x2="{_f(g.width - _RIGHT)}" y1="{_f(ry)}" y2="{_f(ry)}">'
                f"<title>{_E(title)}</title></line>"
            )
    out.append(
        f'<line class="axis" stroke="#777" x1="{_f(g.left)}" x2="{_f(g.width - _RIGHT)}" '
        f'y1="{_f(g.base)}" y2="{_f(g.base)}"/>'
        f'<line class="axis" stroke="#777" x1="{_f(g.left)}" x2="{_f(g.left)}" '
        f'y1="{_f(g.top)}" y2="{_f(g.base)}"/>'
    )
    return "".join(out)


def _svg(g: _Geom, label: str, body: str, labels: list[str]) -> str:
    return (
        f'<svg role="img" aria-label="{_E(label)}" width="{_f(g.width)}" height="{_f(g.height)}" '
        f'font-family="sans-serif" font-size="11" viewBox="0 0 {_f(g.width)} {_f(g.height)}">'
        f"{body}{_xlabels(g, labels)}</svg>"
    )


def _auto_log(values: list[float]) -> bool:
    pos = [v for v in values if math.isfinite(v) and v > 0]
    return bool(pos) and max(pos) / min(pos) > 100.0


@dataclass(frozen=True)
class LayerPlots:
    """The report page's per-layer plots as SVG strings. loss holds both scales (groups
    ``scale-lin`` / ``scale-log``; the page's checkbox shows one); log_loss: start on log."""

    loss: str
    sparsity: str
    bits: str
    time: str
    log_loss: bool
    measured: bool


def _skip_note(r: Any) -> str:
    return "" if r.compressed else " (skipped" + (f": {r.reason}" if r.reason else "") + ")"


def is_norm(r: Any) -> bool:
    """A skipped normalisation layer (LayerNorm, RMSNorm, BatchNorm2d, GroupNorm, ...)."""
    return not r.compressed and "Norm" in r.type


def layer_plots(report: Report, log_loss: bool | None) -> LayerPlots:
    """Loss, sparsity, bits and time per layer; log_loss None = log when the positive losses
    span more than two decades. Skipped norm layers are folded out (``is_norm``: they are
    never compressible, and a transformer has two per block); the table still lists them."""
    layers = [r for r in report.layers if not is_norm(r)]
    labels = [r.label for r in layers]
    fills = [_COLOR["ok"] if r.compressed else _COLOR["skipped"] for r in layers]
    g = _geom(labels)

    def titles(fmt: Any, attr: str) -> list[str]:
        return [f"{r.label}: {fmt(getattr(r, attr))}{_skip_note(r)}" for r in layers]

    loss = [r.predicted_loss for r in layers]
    marks = [r.measured_loss for r in layers]
    has_marks = any(m is not None for m in marks)
    if log_loss is None:
        log_loss = _auto_log(loss + [m for m in marks if m is not None])
    lt = []
    for r in layers:
        t = f"{r.label}: predicted {_fmt_loss(r.predicted_loss)}"
        if r.measured_loss is not None:
            t += f", measured {_fmt_loss(r.measured_loss)}"
        lt.append(t + _skip_note(r))
    kw: dict[str, Any] = {"unit": "loss", "marks": marks if has_marks else None}
    body = (
        f'<g class="scale-lin">{_bars(g, loss, fills, lt, log=False, **kw)}</g>'
        f'<g class="scale-log">{_bars(g, loss, fills, lt, log=True, **kw)}</g>'
    )
    loss_svg = _svg(g, "predicted loss per layer", body, labels)
    sp = [100.0 * r.sparsity for r in layers]
    body = _bars(
        g, sp, fills, titles(_fmt_pct, "sparsity"), log=False, unit="sparsity (%)", top=100.0
    )
    sparsity_svg = _svg(g, "sparsity per layer", body, labels)
    bits = [None if r.bits is None else float(r.bits) for r in layers]
    top = max([b for b in bits if b is not None] + [8.0])
    bt = titles(lambda b: "not quantized" if b is None else f"{b} bits", "bits")
    body = _bars(g, bits, fills, bt, log=False, unit="bits", top=top)
    bits_svg = _svg(g, "bits per layer", body, labels)
    secs = [r.seconds for r in layers]
    st = titles(lambda s: f"{_fmt_secs(s)} s", "seconds")
    body = _bars(g, secs, fills, st, log=False, unit="seconds")
    time_svg = _svg(g, "time per layer", body, labels)
    return LayerPlots(loss_svg, sparsity_svg, bits_svg, time_svg, bool(log_loss), has_marks)


# --------------------------------------------------------------------------- budget allocation

KIND_COLORS = {"dense": "#9e9e9e", "pruned": "#1f77b4", "quantized": "#ff7f0e", "both": "#8e44ad"}


def _legend(x: float, y: float, colors: dict[str, str], step: float = 78.0) -> str:
    out = []
    for i, (k, c) in enumerate(colors.items()):
        lx = x + i * step
        out.append(
            f'<rect x="{_f(lx)}" y="{_f(y)}" width="10" height="10" fill="{c}"/>'
            f'<text x="{_f(lx + 13)}" y="{_f(y + 9)}">{_E(k)}</text>'
        )
    return "".join(out)


def allocation_svg(allocation: dict[str, Any], *, bar: int = 34, height: int = 220) -> str:
    """SVG (a string) of ``report.metadata["allocation"]`` (``Allocation.to_dict()``).

    One bar per layer: its cost at the chosen level as a fraction of its dense cost (the
    target's metric), labelled with the level id and coloured by kind (``layer_kinds``: dense,
    pruned, quantized, both); a dashed line marks the budget as a fraction of the whole model's
    dense cost. bar: pixels per layer; height: of the plot area.
    """
    levels: dict[str, str] = allocation["levels"]
    kinds: dict[str, str] = allocation.get("layer_kinds", {})
    costs = allocation.get("layer_costs", {})
    dense = allocation.get("layer_dense_costs", {})
    names = list(levels)
    g = _geom(names, slot=bar, top=64.0, plot_h=height, min_width=_LEFT + 4 * 78.0 + _RIGHT)
    fracs, fills, titles = [], [], []
    for n in names:
        lid = levels[n]
        d = float(dense.get(n) or 0.0)
        frac = float(costs.get(n, 0.0)) / d if d else 0.0
        fracs.append(frac)
        fills.append(KIND_COLORS[kinds.get(n, "dense")])
        titles.append(f"{n}: {lid} ({frac:.3f} of dense)")
    rules = []
    frac = allocation.get("predicted_fraction")
    budget, dense_total = allocation.get("budget"), allocation.get("dense_cost")
    if budget is not None and dense_total:
        b = float(budget) / float(dense_total)
        tail = "" if frac is None else f", allocation {float(frac):.4g}"
        rules.append((b, f"budget {b:.4g} of dense{tail}"))
    over = [levels[n] for n in names]
    body = _legend(g.left, 6.0, KIND_COLORS) + _bars(
        g, fracs, fills, titles, log=False, unit="cost / dense", top=1.0, over=over, rules=rules
    )
    label = str(allocation.get("target", {}).get("text", "allocation"))
    return _svg(g, label, body, names)
