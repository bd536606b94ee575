"""Compression reports as data: ``LayerRecord``, ``ReportData`` and their lossless JSON / CSV.

A report holds one ``LayerRecord`` per compressed (or skipped) layer plus model-level
``metrics`` and ``metadata``. It is written as lossless JSON and CSV here; the renderings live
beside it: ``report.text`` (terminal table, markdown), ``report.html`` (the page, jinja2
templates) with ``report.charts`` (its inline SVG plots); ``report.memory`` measures
``LayerRecord.peak_memory_mb``. ``optbrain.report.Report`` is ``ReportData`` plus
``to_markdown`` / ``to_html`` (so this module imports none of the renderers).

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
import io
import json
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .jsonlike import _dec_float, _enc_float, _normalize, _plain, _same, _unplain

__all__ = ["CSV_COLUMNS", "LayerRecord", "ReportData"]

FORMAT = "optbrain-report"
FORMAT_VERSION = 1

_FLOAT_FIELDS = ("damping", "sparsity", "predicted_loss", "measured_loss", "seconds")
_FLOAT_FIELDS += ("peak_memory_mb",)
_INT_FIELDS = ("group", "tokens", "bits", "group_size")
_STR_FIELDS = ("name", "type", "method", "fallback", "pattern", "status", "reason")
_STATUSES = ("compressed", "skipped")


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
class ReportData:
    """A compression run as data: per-layer records plus model-level data (``Report`` in
    ``optbrain.report`` adds the text and HTML renderings).

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
    ) -> ReportData:
        """A report whose metadata also records optbrain / torch / Python versions, torch's thread
        count and ``created`` (ISO 8601, UTC); keyword arguments are added to (and override)
        that metadata."""
        meta: dict[str, Any] = {
            "optbrain_version": _optbrain_version(),
            "torch_version": _torch_version(),
            "torch_threads": _torch_threads(),
            "python_version": sys.version.split()[0],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        meta.update(metadata)
        return cls(list(layers or []), model, recipe, dict(metrics or {}), meta)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReportData):
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
        the run's wall time (``metadata["seconds"]``: loading the calibration data, forwards,
        solves), Σ over the records when the metadata has none; solve_seconds: Σ over the
        records. peak_memory_mb: max over records (None if none). methods: count of
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
        solve = float(sum(r.seconds for r in self.layers))
        wall = self.metadata.get("seconds")
        if not isinstance(wall, (int, float)) or isinstance(wall, bool) or not wall >= 0:
            wall = solve
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
            "seconds": float(wall),
            "solve_seconds": solve,
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
    def from_dict(cls, d: dict[str, Any]) -> ReportData:
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
    def from_json(cls, text: str) -> ReportData:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> ReportData:
        """Read a report written by ``to_json``; a file that is not one is a ValueError
        naming it."""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, Unicode, keys
            raise ValueError(
                f"{path} is not an optbrain report (report.json written by 'optbrain "
                f"compress'): {type(e).__name__}: {e}"
            ) from None

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


def _write(path: str | Path | None, text: str, newline: str | None = None) -> None:
    """Write ``text`` atomically (``optbrain._files.atomic_write``); ``newline``: as ``open``'s
    (None and "" leave ``\n`` as it is on POSIX)."""
    if path is not None:
        from .._files import atomic_write

        atomic_write(path, text if newline in (None, "") else text.replace("\n", newline))


def _optbrain_version() -> str:
    from .._version import __version__

    return str(__version__)


def _torch_threads() -> int | None:
    """torch's intra-op thread count (results may differ in the last bits between counts)."""
    try:
        import torch

        return int(torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return None


def _torch_version() -> str | None:
    try:
        import torch

        return str(torch.__version__)
    except ImportError:  # pragma: no cover
        return None
