"""Pruning patterns: unstructured, N:M, blocks, and the structured channels / heads.

``"unstructured"``; ``"N:M"`` e.g. ``"2:4"`` keeps N of every M consecutive input columns
(sparsity 1 − N/M); ``"blockB"`` e.g. ``"block4"`` removes whole runs of B consecutive input
columns of a row (group OBS); ``"channels"`` removes whole input channels (features) from every
row at once, ``"heads"`` / ``"heads64"`` whole attention heads of an output projection
(structured OBS, ``core/structured.py``; the sparsity is the fraction of channels / heads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

#: Pattern kinds that remove whole input groups from every row (structured OBS).
STRUCTURED_KINDS = ("channels", "heads")


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "nm" | "block" | "channels" | "heads"
    n: int = 0
    m: int = 0
    block: int = 1
    head_dim: int | None = None  # heads: columns per head (None: read from the model config)

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block}"
        if self.kind == "heads" and self.head_dim is not None:
            return f"heads{self.head_dim}"
        if self.kind in STRUCTURED_KINDS:
            return self.kind
        return "unstructured"

    @property
    def structured(self) -> bool:
        """Whole input channels / heads removed from every row (``channels`` / ``heads``)."""
        return self.kind in STRUCTURED_KINDS

    @property
    def fixed_sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def check_cols(self, cols: int) -> None:
        if self.kind == "nm" and cols % self.m != 0:
            raise ValueError(f"pattern {self}: W has {cols} columns, not divisible by M={self.m}")
        if self.kind == "block" and cols % self.block != 0:
            raise ValueError(
                f"pattern {self}: W has {cols} columns, not divisible by block size {self.block}"
            )


def pruned_count(sparsity: float, total: int) -> int:
    """How many of ``total`` units a ``sparsity`` in [0, 1) prunes: ``round(s · total)``,
    but at most ``total - 1`` when ``s < 1``, so a sparsity below 1 never prunes everything
    (``pruned_count(0.999, 32) == 31``, not 32)."""
    k = int(round(sparsity * total))
    return min(k, total - 1) if sparsity < 1.0 and total > 0 else k


# --- patterns ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StructuredPattern:
    """``"channels"`` (input channels / features) or ``"heads"`` (needs ``head_dim``)."""

    kind: str  # "channels" | "heads"
    head_dim: int | None = None

    def __str__(self) -> str:
        if self.kind == "heads" and self.head_dim is not None:
            return f"heads{self.head_dim}"
        return self.kind

    def group_size(self, cols: int, kernel_positions: int = 1) -> int:
        """Columns per group for a layer with ``cols`` inputs (see ``structured_group_size``)."""
        return structured_group_size(self, cols, kernel_positions)


def parse_structured(pattern: object, head_dim: int | None = None) -> StructuredPattern | None:
    """``"channels"``, ``"heads"`` / ``"heads64"`` / ``"heads:64"`` → a pattern; else None.

    ``None`` means "not a structured pattern" (let the unstructured parser handle it). A head
    size given both in the name and as ``head_dim`` must agree.
    """
    if isinstance(pattern, StructuredPattern):
        return pattern if head_dim is None else _with_head_dim(pattern, head_dim)
    if not isinstance(pattern, str):
        return None
    p = pattern.strip().lower()
    if p == "channels":
        if head_dim is not None:
            raise ValueError("head_dim applies to pattern 'heads' only, not 'channels'")
        return StructuredPattern("channels")
    m = re.fullmatch(r"heads\s*:?\s*(\d+)?", p)
    if not m:
        return None
    named = int(m.group(1)) if m.group(1) else None
    if named is not None and head_dim is not None and int(head_dim) != named:
        raise ValueError(f"pattern {pattern!r} says head size {named} but head_dim={head_dim}")
    return _with_head_dim(StructuredPattern("heads"), named if named is not None else head_dim)


def _with_head_dim(pat: StructuredPattern, head_dim: int | None) -> StructuredPattern:
    if head_dim is None:
        return pat
    if isinstance(head_dim, bool) or int(head_dim) != head_dim or int(head_dim) < 1:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    if pat.kind != "heads":
        raise ValueError("head_dim applies to pattern 'heads' only, not 'channels'")
    return StructuredPattern("heads", int(head_dim))


def structured_group_size(pattern: StructuredPattern, cols: int, kernel_positions: int = 1) -> int:
    """Columns per group: ``kernel_positions`` (1 for Linear, ``kh·kw`` for a conv) for
    ``channels``; ``head_dim`` for ``heads``. ValueError if it does not divide ``cols``."""
    if pattern.kind == "heads":
        if pattern.head_dim is None:
            raise ValueError(
                "pattern 'heads' needs the head size: give head_dim (or read it from the "
                "model config: hidden_size / num_attention_heads)"
            )
        g = pattern.head_dim
        if cols % g != 0:
            raise ValueError(f"head_dim={g} does not divide the {cols} input columns of W")
        return g
    g = int(kernel_positions)
    if g < 1 or cols % g != 0:
        raise ValueError(f"{g} kernel positions per channel do not divide the {cols} columns")
    return g


def parse_pattern(pattern: str | Pattern, head_dim: int | None = None) -> Pattern:
    """Parse ``"unstructured"``, ``"N:M"`` (N < M), ``"blockB"``, ``"channels"`` or ``"heads"``
    (``"heads64"``; or the head size as ``head_dim``) into a Pattern."""
    if isinstance(pattern, Pattern):
        if head_dim is None or pattern.kind != "heads":
            return pattern
        pattern = str(pattern)
    if not isinstance(pattern, str):
        raise ValueError(
            f"pattern must be a string like 'unstructured', '2:4', 'block4', 'channels' or "
            f"'heads', got {pattern!r}"
        )
    st = parse_structured(pattern, head_dim)
    if st is not None:
        return Pattern(st.kind, head_dim=st.head_dim)
    if head_dim is not None:
        raise ValueError(f"head_dim applies to pattern 'heads' only, not {pattern!r}")
    p = pattern.strip().lower()
    if p in ("unstructured", "none", ""):
        return Pattern("unstructured")
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", p)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if mm < 1 or n < 1:
            raise ValueError(f"pattern {pattern!r}: N and M must be >= 1")
        if n >= mm:
            raise ValueError(f"pattern {pattern!r}: N must be smaller than M (N:M keeps N of M)")
        return Pattern("nm", n=n, m=mm)
    m = re.fullmatch(r"block\s*(\d+)", p)
    if m:
        b = int(m.group(1))
        if b < 1:
            raise ValueError(f"pattern {pattern!r}: block size must be >= 1")
        return Pattern("block", block=b)
    raise ValueError(
        f"pattern must be 'unstructured', 'N:M' (e.g. '2:4'), 'blockB' (e.g. 'block4'), "
        f"'channels' or 'heads', got {pattern!r}"
    )


def nm_ok(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``mask (rows, cols)`` (True = kept) keeps at most n of every m consecutive."""
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all())


def blocks_ok(mask: torch.Tensor, block: int) -> bool:
    """Whether ``mask (rows, cols)`` is constant on every run of ``block`` consecutive columns."""
    rows, cols = mask.shape
    g = mask.reshape(rows, cols // block, block)
    return bool((g.all(-1) | (~g).all(-1)).all())
