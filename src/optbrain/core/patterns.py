"""Pruning patterns: unstructured, N:M (at most N kept in each M consecutive inputs), blocks.

``"unstructured"``; ``"N:M"`` e.g. ``"2:4"`` keeps N of every M consecutive input columns
(sparsity 1 − N/M); ``"blockB"`` e.g. ``"block4"`` removes whole runs of B consecutive input
columns of a row (group OBS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "nm" | "block"
    n: int = 0
    m: int = 0
    block: int = 1

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block}"
        return "unstructured"

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


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """Parse ``"unstructured"``, ``"N:M"`` (N < M) or ``"blockB"`` into a Pattern."""
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise ValueError(
            f"pattern must be a string like 'unstructured', '2:4' or 'block4', got {pattern!r}"
        )
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
        f"pattern must be 'unstructured', 'N:M' (e.g. '2:4') or 'blockB' (e.g. 'block4'), "
        f"got {pattern!r}"
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
