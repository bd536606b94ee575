"""Compression levels of the per-layer database: ``Level(sparsity, pattern, bits)`` and grids.

A level is one way to compress a layer: unstructured sparsity (the pruned fraction), an N:M
pattern (exclusive with unstructured sparsity), a weight bit width, or a compound of pruning
and bits. Every level has a stable string id, used as a key on disk and in reports::

    Level()                         "dense"      (always in the database, error 0)
    Level(sparsity=0.75)            "s0.75"
    Level(pattern="2:4")            "2:4"
    Level(bits=4)                   "b4"
    Level(sparsity=0.5, bits=8)     "s0.5+b8"
    Level(pattern="2:4", bits=4)    "2:4+b4"

``Level.parse(id)`` inverts ``id``. ``default_levels()`` is the grid used when none is given.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..core.patterns import parse_pattern

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
DEFAULT_PATTERNS = ("2:4", "4:8")
DEFAULT_BITS = (8, 6, 4, 3, 2)
DEFAULT_COMPOUND = ("s0.5+b8", "s0.75+b8", "s0.5+b4", "s0.75+b4", "2:4+b8", "2:4+b4")


@dataclass(frozen=True)
class Level:
    """One compressed version of a layer.

    sparsity: unstructured pruned fraction in [0, 1) (0 when ``pattern`` is set).
    pattern: ``"N:M"`` or None. bits: weight bit width (2..8) or None (not quantized).
    """

    sparsity: float = 0.0
    pattern: str | None = None
    bits: int | None = None

    def __post_init__(self) -> None:
        s = float(self.sparsity)
        if not 0.0 <= s < 1.0:
            raise ValueError(f"level sparsity must be in [0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", round(s, 4))
        if self.pattern is not None:
            pat = parse_pattern(self.pattern)
            if pat.kind != "nm":
                raise ValueError(f"level pattern must be N:M (e.g. '2:4'), got {self.pattern!r}")
            if self.sparsity:
                raise ValueError("a level has either an unstructured sparsity or an N:M pattern")
            object.__setattr__(self, "pattern", str(pat))
        if self.bits is not None:
            if isinstance(self.bits, bool) or int(self.bits) != self.bits:
                raise ValueError(f"level bits must be an integer, got {self.bits!r}")
            if not 2 <= int(self.bits) <= 8:
                raise ValueError(f"level bits must be in 2..8, got {self.bits!r}")
            object.__setattr__(self, "bits", int(self.bits))

    @property
    def id(self) -> str:
        parts = []
        if self.sparsity:
            parts.append(f"s{self.sparsity:g}")
        if self.pattern:
            parts.append(self.pattern)
        if self.bits is not None:
            parts.append(f"b{self.bits}")
        return "+".join(parts) or "dense"

    def __str__(self) -> str:
        return self.id

    @property
    def is_dense(self) -> bool:
        return not self.prunes and not self.quantizes

    @property
    def prunes(self) -> bool:
        return bool(self.sparsity) or self.pattern is not None

    @property
    def quantizes(self) -> bool:
        return self.bits is not None

    @property
    def kind(self) -> str:
        """ "dense", "pruned", "quantized" or "both" (the allocation chart's colours)."""
        if self.is_dense:
            return "dense"
        if self.prunes and self.quantizes:
            return "both"
        return "pruned" if self.prunes else "quantized"

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` of the N:M pattern, or None."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def nominal_density(self) -> float:
        """Kept fraction of the weights as asked (the database stores the exact count)."""
        if self.pattern is not None:
            n, m = self.nm  # type: ignore[misc]
            return n / m
        return 1.0 - self.sparsity

    def fits(self, cols: int) -> bool:
        """Whether the level applies to a weight with ``cols`` columns (N:M needs M | cols)."""
        return self.nm is None or cols % self.nm[1] == 0

    @classmethod
    def parse(cls, text: str | Level) -> Level:
        """``Level`` from its id (``"s0.5+b4"``, ``"2:4"``, ``"b8"``, ``"dense"``)."""
        if isinstance(text, Level):
            return text
        if not isinstance(text, str):
            raise ValueError(f"a level is a string like 's0.5+b4', got {text!r}")
        t = text.strip().lower()
        if t == "dense":
            return cls()
        sparsity, pattern, bits = 0.0, None, None
        for part in t.split("+"):
            part = part.strip()
            if re.fullmatch(r"s(0?\.\d+|0)", part):
                sparsity = float(part[1:])
            elif re.fullmatch(r"\d+:\d+", part):
                pattern = part
            elif re.fullmatch(r"b\d+", part):
                bits = int(part[1:])
            else:
                raise ValueError(
                    f"level {text!r}: cannot read {part!r} (use sS e.g. s0.5, N:M e.g. 2:4, "
                    "bB e.g. b4, joined by '+', or 'dense')"
                )
        return cls(sparsity, pattern, bits)


def sort_key(level: Level) -> tuple:
    """Dense first, then by kept fraction (descending), then bits (descending, None = 32)."""
    return (-level.nominal_density, -(level.bits or 32), level.pattern or "", level.id)


def default_levels(
    sparsities: Iterable[float] = DEFAULT_SPARSITIES,
    patterns: Iterable[str] = DEFAULT_PATTERNS,
    bits: Iterable[int] = DEFAULT_BITS,
    compound: Iterable[str] = DEFAULT_COMPOUND,
) -> list[Level]:
    """The level grid: dense, each sparsity, each N:M pattern, each bit width, and the
    compound levels (ids such as ``"s0.5+b4"``)."""
    out = [Level()]
    out += [Level(sparsity=s) for s in sparsities]
    out += [Level(pattern=p) for p in patterns]
    out += [Level(bits=b) for b in bits]
    out += [Level.parse(c) for c in compound]
    return normalize_levels(out)


def normalize_levels(levels: Sequence[Level | str] | None) -> list[Level]:
    """Parse, de-duplicate, add dense and sort a level list (``None``: the default grid)."""
    if levels is None:
        return default_levels()
    if isinstance(levels, (str, Level)):
        levels = [levels]
    parsed = {Level.parse(x).id: Level.parse(x) for x in levels}
    parsed.setdefault("dense", Level())
    return sorted(parsed.values(), key=sort_key)
