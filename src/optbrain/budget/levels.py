"""Compression levels of the per-layer database: ``Level(sparsity, pattern, bits, channels)``.

A level is one way to compress a layer: unstructured sparsity (the pruned fraction), an N:M
pattern, a structured fraction of whole input channels removed (``channels``: a conv input
channel is its ``kh·kw`` columns, a Linear input feature one column; structured OBS,
``core/structured.py``; the model is then shrunk for real, ``optbrain.shrink``), a weight bit
width, or a compound of one pruning kind and bits. The three pruning kinds exclude each other
(a channel level with unstructured zeros inside would not shrink further and is not offered).
Every level has a stable string id, used as a key on disk and in reports::

    Level()                         "dense"      (always in the database, error 0)
    Level(sparsity=0.75)            "s0.75"
    Level(pattern="2:4")            "2:4"
    Level(bits=4)                   "b4"
    Level(sparsity=0.5, bits=8)     "s0.5+b8"
    Level(pattern="2:4", bits=4)    "2:4+b4"
    Level(channels=0.25)            "c0.25"      (25% of the input channels removed)
    Level(channels=0.25, bits=8)    "c0.25+b8"

``Level.parse(id)`` inverts ``id``. ``default_levels()`` is the grid used when none is given
(unstructured, N:M, bits); ``structured_levels()`` the channel grid (the default of a latency
target: in torch eager only removed channels run faster, zeros and low-bit weights do not).
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
DEFAULT_CHANNELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Level:
    """One compressed version of a layer.

    sparsity: unstructured pruned fraction in [0, 1) (0 when ``pattern`` is set).
    pattern: ``"N:M"`` or None. bits: weight bit width (2..8) or None (not quantized).
    channels: fraction of whole input channels removed, in [0, 1) (0: none); excludes
    ``sparsity`` and ``pattern``.
    """

    sparsity: float = 0.0
    pattern: str | None = None
    bits: int | None = None
    channels: float = 0.0

    def __post_init__(self) -> None:
        for what in ("sparsity", "channels"):
            raw = getattr(self, what)
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ValueError(f"level {what} must be a number in [0, 1), got {raw!r}")
            if not 0.0 <= float(raw) < 1.0:
                raise ValueError(f"level {what} must be in [0, 1), got {raw!r}")
            object.__setattr__(self, what, round(float(raw), 4))
        if self.channels and (self.sparsity or self.pattern is not None):
            raise ValueError(
                "a level removes whole channels or prunes single weights (sparsity / N:M), not "
                f"both: channels={self.channels} with "
                + (f"sparsity={self.sparsity}" if self.sparsity else f"pattern={self.pattern!r}")
            )
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
        if self.channels:
            parts.append(f"c{self.channels:g}")
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
        return bool(self.sparsity) or self.pattern is not None or bool(self.channels)

    @property
    def structured(self) -> bool:
        """Whole input channels removed (the layer shrinks)."""
        return bool(self.channels)

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
        return 1.0 - self.sparsity - self.channels

    def fits(self, cols: int, channel_size: int = 1) -> bool:
        """Whether the level applies to a weight with ``cols`` columns (N:M needs M | cols; a
        channel level, with ``channel_size`` columns per input channel, must leave one)."""
        if self.channels:
            n = cols // channel_size
            return cols % channel_size == 0 and int(round(self.channels * n)) < n
        return self.nm is None or cols % self.nm[1] == 0

    @classmethod
    def parse(cls, text: str | Level) -> Level:
        """``Level`` from its id (``"s0.5+b4"``, ``"2:4"``, ``"b8"``, ``"c0.25"``, ``"dense"``)."""
        if isinstance(text, Level):
            return text
        if not isinstance(text, str):
            raise ValueError(f"a level is a string like 's0.5+b4', got {text!r}")
        t = text.strip().lower()
        if t == "dense":
            return cls()
        sparsity, pattern, bits, channels = 0.0, None, None, 0.0
        for part in t.split("+"):
            part = part.strip()
            if re.fullmatch(r"s(0?\.\d+|0)", part):
                sparsity = float(part[1:])
            elif re.fullmatch(r"c(0?\.\d+|0)", part):
                channels = float(part[1:])
            elif re.fullmatch(r"\d+:\d+", part):
                pattern = part
            elif re.fullmatch(r"b\d+", part):
                bits = int(part[1:])
            else:
                raise ValueError(
                    f"level {text!r}: cannot read {part!r} (use sS e.g. s0.5, N:M e.g. 2:4, "
                    "cC e.g. c0.25 (channels), bB e.g. b4, joined by '+', or 'dense')"
                )
        return cls(sparsity, pattern, bits, channels)


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


def structured_levels(
    channels: Iterable[float] = DEFAULT_CHANNELS, bits: Iterable[int] = ()
) -> list[Level]:
    """The channel grid: dense, each fraction of input channels removed, and (with ``bits``)
    every fraction compounded with every bit width (``"c0.25+b8"``) and the bits alone.

    Bits are off by default: in torch eager a quantized weight is stored dequantized and runs
    as fast as float32, so for a latency target they only add error."""
    bits = list(bits)
    out = [Level()] + [Level(channels=c) for c in channels]
    out += [Level(bits=b) for b in bits]
    out += [Level(channels=c, bits=b) for c in channels for b in bits]
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
