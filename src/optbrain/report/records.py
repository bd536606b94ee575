"""Compression reports as data (``LayerRecord``, ``Report``) and their renderings.

A ``Report`` holds one ``LayerRecord`` per compressed (or skipped) layer plus model-level
``metrics`` and ``metadata``. It renders to lossless JSON, CSV, a markdown table, an aligned
plain-text table for the terminal (``render_table``) and a self-contained HTML page whose plots
are inline SVG produced here (no network, no plotting library). ``peak_memory_tracker`` measures
the memory a block needed, for ``LayerRecord.peak_memory_mb``.

JSON encoding of non-finite floats (strict JSON has no NaN / Infinity):

- typed float fields of a layer (``damping``, ``sparsity``, ``predicted_loss``,
  ``measured_loss``, ``seconds``, ``peak_memory_mb``) hold the strings ``"NaN"``, ``"Infinity"``
  or ``"-Infinity"`` (JavaScript's ``Number(s)`` and Python's ``float(s)`` both read them);
  ``None`` is ``null``.
- free-form dicts (``recipe``, ``metrics``, ``metadata``, ``LayerRecord.info``) hold them as the
  tagged object ``{"$float": "NaN"}`` so that a genuine string ``"NaN"`` stays a string.

``Report.from_dict(json.loads(r.to_json())) == r``: the free-form dicts are normalised when a
record / report is built (tuples → lists, numpy / torch scalars → numbers; anything else that
JSON cannot hold raises ``TypeError`` then). Equality treats NaN as equal to NaN. A user dict of
exactly the form ``{"$float": ...}`` is read back as a float (the one ambiguity).
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import math
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "CSV_COLUMNS",
    "LayerRecord",
    "PeakMemory",
    "Report",
    "peak_memory_tracker",
    "render_table",
]

FORMAT = "optbrain-report"
FORMAT_VERSION = 1

_FLOAT_FIELDS = ("damping", "sparsity", "predicted_loss", "measured_loss", "seconds")
_FLOAT_FIELDS += ("peak_memory_mb",)
_INT_FIELDS = ("group", "tokens", "bits", "group_size")
_STR_FIELDS = ("name", "type", "method", "fallback", "pattern", "status", "reason")
_STATUSES = ("compressed", "skipped")


# --------------------------------------------------------------------------- equality / encoding


def _same(a: Any, b: Any) -> bool:
    """Structural equality where NaN equals NaN (floats), used by the report ``__eq__``."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _enc_float(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


_FLOAT_WORDS = {"nan": math.nan, "infinity": math.inf, "-infinity": -math.inf}
_FLOAT_WORDS.update({"inf": math.inf, "-inf": -math.inf, "+infinity": math.inf, "+inf": math.inf})


def _dec_float(x: Any, what: str) -> float | None:
    if x is None:
        return None
    if isinstance(x, str):
        try:
            return _FLOAT_WORDS[x.strip().lower()]
        except KeyError:
            raise ValueError(
                f"{what}: expected a number, 'NaN' or '±Infinity', got {x!r}"
            ) from None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{what}: expected a number, got {x!r}")
    return float(x)


def _plain(x: Any, what: str = "value") -> Any:
    """Free-form value → JSON-ready value (non-finite floats tagged, tuples → lists).

    Scalars from numpy / torch (anything with ``.item()`` and no length) become Python numbers;
    ``Path`` becomes ``str``. Anything else raises ``TypeError`` naming ``what``.
    """
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"$float": _enc_float(x)}
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"{what}: dict keys must be strings, got {k!r}")
            out[k] = _plain(v, f"{what}.{k}")
        return out
    if isinstance(x, (list, tuple)):
        return [_plain(v, f"{what}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, Path):
        return str(x)
    item = getattr(x, "item", None)
    if callable(item) and getattr(x, "ndim", 0) == 0:
        return _plain(item(), what)
    raise TypeError(f"{what}: {type(x).__name__} is not JSON-like (use dict/list/str/number/None)")


def _unplain(x: Any) -> Any:
    """Inverse of ``_plain`` for values read back from JSON."""
    if isinstance(x, dict):
        if len(x) == 1 and "$float" in x:
            return _dec_float(x["$float"], "$float")
        return {k: _unplain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unplain(v) for v in x]
    return x


def _normalize(x: Any, what: str) -> Any:
    """A JSON-like copy of ``x`` as it will read back (tuples → lists, numpy / torch scalars →
    numbers); raises ``TypeError`` for values JSON cannot hold, at construction, not at save."""
    return _unplain(_plain(x, what))


# --------------------------------------------------------------------------- records


@dataclass(eq=False)
class LayerRecord:
    """What happened to one layer (or one group of a grouped conv).

    name: module path (``"encoder.layer.0.attention.self.query"``); type: module class name
    (``"Linear"``, ``"Conv2d"``, ``"Conv1D"``). shape: shape of the weight this record compressed;
    for a per-group record of a grouped conv (``group`` = group index) it is that group's slice,
    so parameter counts of records add up. group: None when the layer was compressed whole.
    method: method actually used (``"obc"``, ``"gptq"``, ``"auto→sparsegpt"``). tokens:
    calibration tokens (rows of X) seen. damping: absolute λ added to diag H. fallback: policy
    step taken when inverting H, or None. sparsity: pruned fraction of this weight. bits: None
    when not quantized. pattern: ``"unstructured"``, ``"2:4"``, ``"block4"`` or None.
    group_size: quantization group size or None (per channel). predicted_loss: the solver's
    layer loss ``½ Σ_r δ_r H δ_rᵀ``; measured_loss: the same measured on layer outputs, or None.
    seconds: wall time of the solve. peak_memory_mb: see ``peak_memory_tracker``, or None.
    status: ``"compressed"`` or ``"skipped"``; reason: why skipped (or None).
    info: free-form JSON-like extras (method knobs, diagnostics); JSON only, not in CSV / tables.
    """

    name: str
    type: str = ""
    shape: tuple[int, ...] = ()
    group: int | None = None
    method: str = ""
    tokens: int = 0
    damping: float = 0.0
    fallback: str | None = None
    sparsity: float = 0.0
    bits: int | None = None
    pattern: str | None = None
    group_size: int | None = None
    predicted_loss: float = 0.0
    measured_loss: float | None = None
    seconds: float = 0.0
    peak_memory_mb: float | None = None
    status: str = "compressed"
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        for f in _FLOAT_FIELDS:
            v = getattr(self, f)
            if v is not None:
                setattr(self, f, float(v))
        for f in _INT_FIELDS:
            v = getattr(self, f)
            if v is not None:
                setattr(self, f, int(v))
        if self.status not in _STATUSES:
            raise ValueError(f"layer {self.name!r}: status must be one of {_STATUSES}")
        self.info = _normalize({} if self.info is None else self.info, f"layer {self.name!r} info")

    @property
    def numel(self) -> int:
        """Number of weights this record covers (product of ``shape``; 0 for an empty shape)."""
        return math.prod(self.shape) if self.shape else 0

    @property
    def compressed(self) -> bool:
        return self.status == "compressed"

    @property
    def label(self) -> str:
        """``name``, with ``[g<group>]`` appended for a per-group record."""
        return self.name if self.group is None else f"{self.name}[g{self.group}]"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerRecord):
            return NotImplemented
        return all(
            _same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats encoded, see module docstring)."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _FLOAT_FIELDS:
                v = _enc_float(v)
            elif f.name == "shape":
                v = list(v)
            elif f.name == "info":
                v = _plain(v, f"layer {self.name!r} info")
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerRecord:
        """Inverse of ``to_dict``; also accepts raw float NaN / inf. Unknown keys are an error."""
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(f"a layer record must be a dict with a 'name', got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"layer {d['name']!r}: unknown keys {unknown}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            what = f"layer {d['name']!r} {k}"
            if k in _FLOAT_FIELDS:
                v = _dec_float(v, what)
            elif k in _INT_FIELDS:
                if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                    raise ValueError(f"{what}: expected an integer or null, got {v!r}")
            elif k in _STR_FIELDS:
                if v is not None and not isinstance(v, str):
                    raise ValueError(f"{what}: expected a string or null, got {v!r}")
            elif k == "shape":
                if not isinstance(v, (list, tuple)) or not all(
                    isinstance(s, int) and not isinstance(s, bool) for s in v
                ):
                    raise ValueError(f"{what}: expected a list of integers, got {v!r}")
                v = tuple(v)
            elif k == "info":
                v = _unplain(v) if v is not None else {}
            kw[k] = v
        return cls(**kw)

    @classmethod
    def from_result(
        cls,
        result: Any,
        *,
        name: str,
        type: str,
        shape: tuple[int, ...] | None = None,
        tokens: int = 0,
        group: int | None = None,
        pattern: str | None = None,
        measured_loss: float | None = None,
        peak_memory_mb: float | None = None,
        info: dict[str, Any] | None = None,
    ) -> LayerRecord:
        """Build a ``compressed`` record from a ``core.result.LayerResult``.

        ``shape`` defaults to ``result.weight.shape``; ``pattern`` to ``result.info["pattern"]``;
        ``group_size`` comes from the quantization grid. JSON-like entries of ``result.info``
        (numbers, strings, ...) are kept in ``info``; others (tensors) are dropped.
        """
        extra: dict[str, Any] = {}
        for k, v in (result.info or {}).items():
            try:
                _plain(v)
            except TypeError:
                continue
            extra[str(k)] = v
        extra.update(info or {})
        if pattern is None:
            pattern = extra.get("pattern") if isinstance(extra.get("pattern"), str) else None
        extra.pop("pattern", None)
        grid = result.grid
        return cls(
            name=name,
            type=type,
            shape=tuple(result.weight.shape) if shape is None else tuple(shape),
            group=group,
            method=result.method,
            tokens=tokens,
            damping=result.damping,
            fallback=result.fallback,
            sparsity=result.sparsity,
            bits=result.bits,
            pattern=pattern,
            group_size=grid.group_size if grid is not None else None,
            predicted_loss=result.loss,
            measured_loss=measured_loss,
            seconds=result.seconds,
            peak_memory_mb=peak_memory_mb,
            status="compressed",
            info=extra,
        )


CSV_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(LayerRecord) if f.name != "info"
)
"""CSV header: every ``LayerRecord`` field except ``info``, in declaration order."""


@dataclass(eq=False)
class Report:
    """A compression run: per-layer records plus model-level data.

    model: a name for the model (or None). recipe: the recipe as a plain dict (or None).
    metrics: evaluation results; a value may be a number or ``{"dense": x, "compressed": y}``
    (rendered side by side with the change). metadata: wall time, calibration samples, versions,
    creation time, ... (``Report.create`` fills versions and time). All three are JSON-like.
    """

    layers: list[LayerRecord] = field(default_factory=list)
    model: str | None = None
    recipe: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        layers: list[LayerRecord] | None = None,
        *,
        model: str | None = None,
        recipe: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        **metadata: Any,
    ) -> Report:
        """A report whose metadata also records optbrain / torch / Python versions and ``created``
        (ISO 8601, UTC); keyword arguments are added to (and override) that metadata."""
        meta: dict[str, Any] = {
            "optbrain_version": _optbrain_version(),
            "torch_version": _torch_version(),
            "python_version": sys.version.split()[0],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        meta.update(metadata)
        return cls(list(layers or []), model, recipe, dict(metrics or {}), meta)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Report):
            return NotImplemented
        return all(
            _same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )

    __hash__ = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.layers = list(self.layers)
        if self.recipe is not None:
            self.recipe = _normalize(self.recipe, "recipe")
        self.metrics = _normalize(self.metrics or {}, "metrics")
        self.metadata = _normalize(self.metadata or {}, "metadata")

    # ---------------------------------------------------------------- summary

    def summary(self) -> dict[str, Any]:
        """Totals over the layers.

        layers / compressed / skipped / quantized / fallbacks: counts (``fallbacks`` = records with
        a fallback). params: Σ numel over all records; params_compressed: over compressed ones.
        sparsity: Σ_compressed sparsity·numel / Σ_all numel (skipped layers count as dense);
        sparsity_compressed: the same over compressed layers only. mean_bits: numel-weighted mean
        of ``bits`` over quantized layers (None if none). predicted_loss: Σ over compressed
        layers; measured_loss: the same, None unless every compressed layer has one. seconds:
        Σ over all records. peak_memory_mb: max over records (None if none). methods: count of
        compressed layers per method.
        """
        comp = [r for r in self.layers if r.compressed]
        quant = [r for r in comp if r.bits is not None]
        n_all = sum(r.numel for r in self.layers)
        n_comp = sum(r.numel for r in comp)
        zeros = sum(r.sparsity * r.numel for r in comp)
        n_q = sum(r.numel for r in quant)
        mems = [r.peak_memory_mb for r in self.layers if r.peak_memory_mb is not None]
        measured = [r.measured_loss for r in comp]
        methods: dict[str, int] = {}
        for r in comp:
            methods[r.method] = methods.get(r.method, 0) + 1
        return {
            "layers": len(self.layers),
            "compressed": len(comp),
            "skipped": len(self.layers) - len(comp),
            "quantized": len(quant),
            "fallbacks": sum(r.fallback is not None for r in self.layers),
            "params": n_all,
            "params_compressed": n_comp,
            "sparsity": zeros / n_all if n_all else 0.0,
            "sparsity_compressed": zeros / n_comp if n_comp else 0.0,
            "mean_bits": (sum(r.bits * r.numel for r in quant) / n_q if n_q else None),
            "predicted_loss": float(sum(r.predicted_loss for r in comp)),
            "measured_loss": (
                float(sum(measured)) if comp and all(m is not None for m in measured) else None
            ),
            "seconds": float(sum(r.seconds for r in self.layers)),
            "peak_memory_mb": max(mems) if mems else None,
            "methods": methods,
        }

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict. ``summary`` is included for readers and ignored by ``from_dict``."""
        summary = self.summary()
        summary = {k: _enc_float(v) if isinstance(v, float) else v for k, v in summary.items()}
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "recipe": None if self.recipe is None else _plain(self.recipe, "recipe"),
            "metrics": _plain(self.metrics, "metrics"),
            "metadata": _plain(self.metadata, "metadata"),
            "summary": summary,
            "layers": [r.to_dict() for r in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Inverse of ``to_dict``. Rejects other formats, newer versions and unknown keys."""
        if not isinstance(d, dict):
            raise ValueError(f"a report must be a dict, got {type(d).__name__}")
        if d.get("format", FORMAT) != FORMAT:
            raise ValueError(f"not an optbrain report (format {d.get('format')!r})")
        version = d.get("version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"report format version {version!r} is newer than this optbrain reads "
                f"({FORMAT_VERSION}); upgrade optbrain"
            )
        allowed = {"format", "version", "model", "recipe", "metrics", "metadata", "summary"}
        unknown = sorted(set(d) - allowed - {"layers"})
        if unknown:
            raise ValueError(f"report: unknown keys {unknown}")
        layers = d.get("layers") or []
        if not isinstance(layers, list):
            raise ValueError("report: 'layers' must be a list")
        recipe = d.get("recipe")
        return cls(
            layers=[LayerRecord.from_dict(x) for x in layers],
            model=d.get("model"),
            recipe=None if recipe is None else _unplain(recipe),
            metrics=_unplain(d.get("metrics") or {}),
            metadata=_unplain(d.get("metadata") or {}),
        )

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        """Strict JSON text (no bare NaN); written to ``path`` (UTF-8) when given."""
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)
        _write(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a report written by ``to_json``."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    # ---------------------------------------------------------------- CSV / markdown / text

    def to_csv(self, path: str | Path | None = None) -> str:
        """One row per record, header ``CSV_COLUMNS``.

        shape is ``"768x3072"``; None is an empty cell; floats are written with ``repr`` (exact;
        non-finite as ``nan`` / ``inf`` / ``-inf``, which ``float()`` reads back).
        """
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for r in self.layers:
            row = []
            for c in CSV_COLUMNS:
                v = getattr(r, c)
                if v is None:
                    row.append("")
                elif c == "shape":
                    row.append("x".join(str(s) for s in v))
                elif isinstance(v, float):
                    row.append(repr(v))
                else:
                    row.append(str(v))
            w.writerow(row)
        text = buf.getvalue()
        _write(path, text, newline="")
        return text

    def to_markdown(self) -> str:
        """Markdown: summary bullets, metrics, the layer table, skipped layers with reasons and
        layers where a fallback policy fired. Layer names are code spans."""
        s = self.summary()
        out = [f"# optbrain report{': ' + _md_text(self.model) if self.model else ''}", ""]
        out += [f"- {k}: {v}" for k, v in _summary_lines(s)]
        out.append("")
        if self.metrics:
            out += [
                "## Metrics",
                "",
                "| metric | dense | compressed | change |",
                "|---|---|---|---|",
            ]
            for name, dense, comp, change in _metric_rows(self.metrics):
                cells = [_md_code(name), _md_text(dense), _md_text(comp), _md_text(change)]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        cols = _table_columns(self.layers)
        out += ["## Layers", ""]
        out.append("| " + " | ".join(c.title for c in cols) + " |")
        out.append("|" + "|".join("---:" if c.right else "---" for c in cols) + "|")
        for i, r in enumerate(self.layers):
            cells = [
                _md_code(c.get(i, r)) if c.key == "layer" else _md_text(c.get(i, r)) for c in cols
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        skipped = [r for r in self.layers if not r.compressed]
        if skipped:
            out += ["## Skipped layers", ""]
            out += [
                f"- {_md_code(r.label)}: {_md_text(r.reason or 'no reason given')}" for r in skipped
            ]
            out.append("")
        fell = [r for r in self.layers if r.fallback is not None]
        if fell:
            out += ["## Fallbacks", ""]
            out += [f"- {_md_code(r.label)}: {_md_text(r.fallback or '')}" for r in fell]
            out.append("")
        return "\n".join(out)

    # ---------------------------------------------------------------- HTML

    def to_html(self, path: str | Path | None = None, *, log_loss: bool | None = None) -> str:
        """A self-contained HTML page (no network): summary, metrics, four inline-SVG plots
        (per-layer loss, sparsity, bits, time), the layer table (click a header to sort),
        skipped layers, recipe and metadata. All text is HTML-escaped.

        log_loss: initial scale of the loss plot (a checkbox on the page switches it);
        None = log when the positive losses span more than two decades.
        """
        page = _html_page(self, log_loss)
        _write(path, page)
        return page


def _write(path: str | Path | None, text: str, newline: str | None = None) -> None:
    if path is not None:
        with open(path, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)


def _optbrain_version() -> str:
    try:
        from .. import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover
        return "unknown"


def _torch_version() -> str | None:
    try:
        import torch

        return str(torch.__version__)
    except ImportError:  # pragma: no cover
        return None


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


# --------------------------------------------------------------------------- SVG plots

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

    @property
    def width(self) -> float:
        return self.left + self.n * self.slot + _RIGHT

    @property
    def height(self) -> float:
        return _TOP + _PLOT_H + self.bottom

    @property
    def base(self) -> float:
        return _TOP + _PLOT_H

    def x(self, i: int) -> float:
        return self.left + i * self.slot


def _geom(labels: list[str]) -> _Geom:
    n = max(len(labels), 1)
    slot = max(6.0, min(36.0, 720.0 / n))
    named = len(labels) <= _MAX_NAMED
    longest = min(max((len(s) for s in labels), default=1), _LABEL_CHARS)
    bottom = 20.0 + (longest * 6.0 * 0.87 if named else 14.0)  # rotated −60°: ≈ len·w·sin60
    # a rotated name reaches ≈ len·w·cos60 to the left of its bar: keep the first one on the page
    left = max(_LEFT, (longest * 6.0 * 0.5 - slot / 2 + 8.0) if named else 0.0)
    return _Geom(len(labels), slot, left, named, bottom)


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


def _xlabels(g: _Geom, labels: list[str]) -> str:
    out = []
    y = g.base + 12
    if g.named:
        for i, s in enumerate(labels):
            cx = g.x(i) + g.slot / 2
            short = s if len(s) <= _LABEL_CHARS else "…" + s[-(_LABEL_CHARS - 1) :]
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
    states: list[str],
    titles: list[str],
    *,
    log: bool,
    unit: str,
    top: float | None = None,
    marks: list[float | None] | None = None,
) -> str:
    """Axes + bars in one ``<g>``. Non-drawable values (None, NaN, ≤ 0 on a log axis) get a
    marker on the baseline; +inf draws a red bar to the top; every bar has a ``<title>``."""
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
            return g.base - _PLOT_H * min(max(t, 0.0), 1.0)

        tick_pos = [(g.base - _PLOT_H * (t - lo) / (hi - lo), f"{10.0**t:g}") for t in ticks]
    else:
        tk = _nice_ticks(top if top is not None else max(finite, default=0.0))
        vtop = tk[-1]

        def y(v: float) -> float | None:
            if v < 0:
                return None
            return g.base - _PLOT_H * min(v / vtop, 1.0)

        tick_pos = [(g.base - _PLOT_H * t / vtop, f"{t:g}") for t in tk]

    out = []
    for ty, text in tick_pos:
        out.append(
            f'<line class="grid" stroke="#eee" x1="{_f(g.left)}" x2="{_f(g.width - _RIGHT)}" '
            f'y1="{_f(ty)}" y2="{_f(ty)}"/>'
            f'<text class="yl" x="{_f(g.left - 6)}" y="{_f(ty + 4)}" text-anchor="end">'
            f"{_E(text)}</text>"
        )
    mid = _TOP + _PLOT_H / 2
    out.append(
        f'<text class="yl" transform="translate(14,{_f(mid)}) rotate(-90)" '
        f'text-anchor="middle">{_E(unit)}{" (log)" if log else ""}</text>'
    )
    bw = g.slot * 0.72
    for i, (v, st, title) in enumerate(zip(values, states, titles, strict=True)):
        x0 = g.x(i) + (g.slot - bw) / 2
        color = _COLOR["skipped"] if st == "skipped" else _COLOR["ok"]
        tt = f"<title>{_E(title)}</title>"
        if v is not None and math.isinf(v) and v > 0:
            out.append(
                f'<rect x="{_f(x0)}" y="{_f(_TOP)}" width="{_f(bw)}" height="{_f(_PLOT_H)}" '
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
    out.append(
        f'<line class="axis" stroke="#777" x1="{_f(g.left)}" x2="{_f(g.width - _RIGHT)}" '
        f'y1="{_f(g.base)}" y2="{_f(g.base)}"/>'
        f'<line class="axis" stroke="#777" x1="{_f(g.left)}" x2="{_f(g.left)}" '
        f'y1="{_f(_TOP)}" y2="{_f(g.base)}"/>'
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


def _plots(report: Report, log_loss: bool | None) -> list[str]:
    layers = report.layers
    labels = [r.label for r in layers]
    states = ["ok" if r.compressed else "skipped" for r in layers]
    g = _geom(labels)

    def titles(fmt: Any, attr: str) -> list[str]:
        out = []
        for r in layers:
            t = f"{r.label}: {fmt(getattr(r, attr))}"
            if not r.compressed:
                t += " (skipped" + (f": {r.reason}" if r.reason else "") + ")"
            out.append(t)
        return out

    figs = []
    # loss: both scales in one SVG; a CSS-only checkbox chooses which group is shown
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
        if not r.compressed:
            t += " (skipped" + (f": {r.reason}" if r.reason else "") + ")"
        lt.append(t)
    kw: dict[str, Any] = {"unit": "loss", "marks": marks if has_marks else None}
    body = (
        f'<g class="scale-lin">{_bars(g, loss, states, lt, log=False, **kw)}</g>'
        f'<g class="scale-log">{_bars(g, loss, states, lt, log=True, **kw)}</g>'
    )
    legend = " Dark ticks: measured loss." if has_marks else ""
    figs.append(
        f'<figure class="plot"><input type="checkbox" id="logloss" class="toggle"'
        f"{' checked' if log_loss else ''}>"
        f"<figcaption>Predicted loss per layer.{legend} "
        f'<label for="logloss">log scale</label></figcaption>'
        f"{_svg(g, 'predicted loss per layer', body, labels)}</figure>"
    )
    sp = [r.sparsity for r in layers]
    body = _bars(
        g,
        [100.0 * v for v in sp],
        states,
        titles(_fmt_pct, "sparsity"),
        log=False,
        unit="sparsity (%)",
        top=100.0,
    )
    figs.append(_figure("Sparsity per layer.", _svg(g, "sparsity per layer", body, labels)))
    bits = [None if r.bits is None else float(r.bits) for r in layers]
    top = max([b for b in bits if b is not None] + [8.0])
    body = _bars(
        g,
        bits,
        states,
        titles(lambda b: "not quantized" if b is None else f"{b} bits", "bits"),
        log=False,
        unit="bits",
        top=top,
    )
    figs.append(
        _figure(
            "Bits per layer (baseline marks: not quantized).",
            _svg(g, "bits per layer", body, labels),
        )
    )
    secs = [r.seconds for r in layers]
    body = _bars(
        g, secs, states, titles(lambda s: f"{_fmt_secs(s)} s", "seconds"), log=False, unit="seconds"
    )
    figs.append(_figure("Time per layer.", _svg(g, "time per layer", body, labels)))
    return figs


def _figure(caption: str, svg: str) -> str:
    return f'<figure class="plot"><figcaption>{_E(caption)}</figcaption>{svg}</figure>'


# --------------------------------------------------------------------------- HTML page

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#666;margin:0 0 12px}
table{border-collapse:collapse;font-size:13px}
th,td{padding:3px 8px;border-bottom:1px solid #e3e3e3;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
table.layers th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}
tr.skipped td{color:#888}
.kv th{font-weight:normal;color:#555}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{background:#f6f6f6;padding:8px;overflow:auto}
figure.plot{margin:12px 0 20px;overflow-x:auto}
figcaption{margin-bottom:4px;color:#444}
svg text{font:11px system-ui,sans-serif;fill:#333}
svg text.bad{fill:#c43b3b;font-weight:bold}
input.toggle{margin-right:4px}
#logloss:checked ~ svg .scale-lin{display:none}
#logloss:not(:checked) ~ svg .scale-log{display:none}
"""

_JS = """
(function(){
  var ths = document.querySelectorAll("table.layers th");
  ths.forEach(function(th, col){
    th.addEventListener("click", function(){
      var body = th.closest("table").tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute("data-dir") !== "asc";
      th.setAttribute("data-dir", asc ? "asc" : "desc");
      function key(row){
        var c = row.cells[col], v = c.getAttribute("data-v");
        return v === null ? c.textContent : v;
      }
      rows.sort(function(a, b){
        var x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y), d;
        if (x === "" || y === "") { d = (x === "") - (y === ""); return d; }
        d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? d : -d;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
})();
"""


def _num_attr(v: float | int | None) -> str:
    """``data-v`` for sorting: repr of the number; '' for None; NaN sorts as a string."""
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def _html_page(report: Report, log_loss: bool | None) -> str:
    s = report.summary()
    title = "optbrain report" + (f" — {report.model}" if report.model else "")
    created = report.metadata.get("created")
    sub = []
    if report.model:
        sub.append(f"model <code>{_E(report.model)}</code>")
    if created:
        sub.append(f"created {_E(str(created))}")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_E(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_E(title)}</h1>",
        f'<p class="sub">{" · ".join(sub)}</p>' if sub else "",
        '<section><h2>Summary</h2><table class="kv"><tbody>',
    ]
    parts += [f"<tr><th>{_E(k)}</th><td>{_E(v)}</td></tr>" for k, v in _summary_lines(s)]
    parts.append("</tbody></table></section>")
    if report.metrics:
        parts.append(
            "<section><h2>Metrics</h2><table><thead><tr><th>metric</th><th>dense</th>"
            "<th>compressed</th><th>change</th></tr></thead><tbody>"
        )
        for name, dense, comp, change in _metric_rows(report.metrics):
            parts.append(
                f'<tr><td>{_E(name)}</td><td class="n">{_E(dense)}</td>'
                f'<td class="n">{_E(comp)}</td><td class="n">{_E(change)}</td></tr>'
            )
        parts.append("</tbody></table></section>")
    parts.append("<section><h2>Per-layer plots</h2>")
    if report.layers:
        parts.append(
            '<p class="sub">Grey: skipped layers. Red: NaN / infinite values. '
            "Hover a bar for its layer and value.</p>"
        )
        parts += _plots(report, log_loss)
    else:
        parts.append("<p>No layers.</p>")
    parts.append("</section>")
    parts.append(_html_layer_table(report.layers))
    skipped = [r for r in report.layers if not r.compressed]
    if skipped:
        parts.append("<section><h2>Skipped layers</h2><ul>")
        parts += [
            f"<li><code>{_E(r.label)}</code>: {_E(r.reason or 'no reason given')}</li>"
            for r in skipped
        ]
        parts.append("</ul></section>")
    if report.recipe is not None:
        rec = json.dumps(_plain(report.recipe), indent=2, ensure_ascii=False)
        parts.append(f"<section><h2>Recipe</h2><pre>{_E(rec)}</pre></section>")
    if report.metadata:
        parts.append('<section><h2>Metadata</h2><table class="kv"><tbody>')
        parts += [
            f"<tr><th>{_E(str(k))}</th><td>{_E(_fmt_value(v))}</td></tr>"
            for k, v in report.metadata.items()
        ]
        parts.append("</tbody></table></section>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(p for p in parts if p) + "\n"


def _html_layer_table(layers: list[LayerRecord]) -> str:
    heads = [
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
    ]
    out = ['<section><h2>Layers</h2><table class="layers"><thead><tr>']
    out += [f"<th>{_E(h)}</th>" for h in heads]
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(layers):

        def num(v: float | int | None, text: str) -> str:
            return f'<td class="n" data-v="{_E(_num_attr(v))}">{_E(text)}</td>'

        cells = [
            num(i, str(i)),
            f"<td><code>{_E(r.label)}</code></td>",
            f"<td>{_E(r.type)}</td>",
            f'<td data-v="{r.numel}">{_E("x".join(map(str, r.shape)))}</td>',
            f"<td>{_E(r.method)}</td>",
            num(r.tokens, str(r.tokens)),
            num(r.damping, _fmt_float(r.damping, ".3g")),
            f"<td>{_E(_fmt_opt(r.fallback))}</td>",
            num(r.sparsity, _fmt_pct(r.sparsity)),
            f"<td>{_E(_fmt_opt(r.pattern))}</td>",
            num(r.bits, _fmt_opt(r.bits)),
            num(r.group_size, _fmt_opt(r.group_size)),
            num(r.predicted_loss, _fmt_loss(r.predicted_loss)),
            num(r.measured_loss, _fmt_loss(r.measured_loss)),
            num(r.seconds, _fmt_secs(r.seconds)),
            num(r.peak_memory_mb, _fmt_mb(r.peak_memory_mb)),
            f"<td>{_E(_status_text(r))}</td>",
        ]
        cls = "" if r.compressed else ' class="skipped"'
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></section>")
    return "".join(out)


# --------------------------------------------------------------------------- peak memory


@dataclass
class PeakMemory:
    """Filled in when a ``peak_memory_tracker`` block exits.

    mb: extra memory the block needed at its peak, ``peak_mb − start_mb`` (≥ 0) — the value for
    ``LayerRecord.peak_memory_mb``. peak_mb: the peak itself (absolute). start_mb: usage when the
    block began. method: how it was measured:

    - ``"cuda"``: PyTorch caching-allocator bytes on that device (``torch.cuda.memory_allocated``
      / ``max_memory_allocated``). Exact for tensors; misses cuBLAS / cuDNN workspaces, other
      libraries and memory reserved but not allocated by the cache.
    - ``"vmhwm"`` (Linux, CPU): resident set size of the whole process. The kernel's high-water
      mark (``VmHWM``) is reset at entry through ``/proc/self/clear_refs`` and read at exit, so
      ``peak_mb`` is the true RSS peak inside the block. Counts every thread of the process and
      freed memory the allocator keeps; pages of a tensor count once touched (``torch.empty``
      without writes may not count).
    - ``"ru_maxrss"`` (other POSIX): process-lifetime RSS peak (``getrusage``); ``mb`` is only
      the growth of that peak during the block — a lower bound, 0 when the process once used
      more before the block. ``peak_mb`` is the lifetime peak.
    - ``"none"``: no way to measure (``mb`` stays None).
    """

    device: str
    method: str
    start_mb: float = 0.0
    peak_mb: float | None = None
    mb: float | None = None


_MB = 1024.0 * 1024.0
_LOCK = threading.Lock()
_ACTIVE: list[tuple[str, list[float]]] = []  # (backend key, [peak seen before a nested reset])


def _read_status_kb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    v = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return v / _MB if sys.platform == "darwin" else v / 1024.0  # bytes on macOS, KiB elsewhere


@contextmanager
def peak_memory_tracker(device: Any = None) -> Iterator[PeakMemory]:
    """Measure the peak memory of a block, in MB (MiB)::

        with peak_memory_tracker(W.device) as mem:
            result = compress(...)
        record.peak_memory_mb = mem.mb

    device: a CUDA device (``torch.device`` or ``"cuda:0"``) measures that GPU's PyTorch
    allocations; None / ``"cpu"`` measures the process RSS. See ``PeakMemory`` for what each
    method counts. Nesting is supported (an inner reset does not lose the outer peak); trackers
    on different threads of one process see each other's memory (the counters are per process).
    """
    dev = "cpu" if device is None else str(device)
    seen = [0.0]  # highest peak read before a nested tracker's reset (see below)
    with _LOCK:
        if dev.startswith("cuda"):
            import torch

            d = torch.device(dev)
            if d.index is None:
                d = torch.device("cuda", torch.cuda.current_device())
            key = str(d)

            def sync() -> None:
                torch.cuda.synchronize(d)

            def read_peak() -> float:
                return torch.cuda.max_memory_allocated(d) / _MB

            sync()
            rec = PeakMemory(key, "cuda", start_mb=torch.cuda.memory_allocated(d) / _MB)
            before = read_peak()
            torch.cuda.reset_peak_memory_stats(d)
        else:
            key = "cpu"

            def sync() -> None:
                pass

            hwm = _read_status_kb("VmHWM")
            rss = _read_status_kb("VmRSS")
            # read the old high-water mark before trying the reset (the probe *is* the reset)
            if hwm is not None and rss is not None and _reset_hwm():
                rec = PeakMemory("cpu", "vmhwm", start_mb=rss / 1024.0)
                before = hwm / 1024.0

                def read_peak() -> float:
                    return (_read_status_kb("VmHWM") or 0.0) / 1024.0

            else:
                start = _ru_maxrss_mb()
                rec = PeakMemory("cpu", "none" if start is None else "ru_maxrss", start or 0.0)
                before = rec.start_mb

                def read_peak() -> float:
                    return _ru_maxrss_mb() or 0.0

        for k, s in _ACTIVE:  # outer trackers keep the peak they had before our reset
            if k == key:
                s[0] = max(s[0], before)
        seen[0] = rec.start_mb
        _ACTIVE.append((key, seen))
    try:
        yield rec
    finally:
        sync()
        with _LOCK:
            del _ACTIVE[next(i for i, (_, s) in enumerate(_ACTIVE) if s is seen)]
            if rec.method != "none":
                rec.peak_mb = max(seen[0], read_peak())
                rec.mb = max(0.0, rec.peak_mb - rec.start_mb)
