"""JSON-like values of a report: NaN-aware equality and the lossless encoding of free-form data.

Typed float fields encode non-finite values as the strings ``"NaN"`` / ``"Infinity"`` /
``"-Infinity"`` (``_enc_float`` / ``_dec_float``); free-form dicts tag them as
``{"$float": "NaN"}`` (``_plain`` / ``_unplain``) so that a genuine string ``"NaN"`` stays a
string. ``_normalize`` gives the value as it will read back, at construction.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


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
