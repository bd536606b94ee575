"""The on-disk budget database: its directory layout, the ``Database`` reader, atomic writes.

Layout of a database directory::

    fingerprint.json         what it was built from: model weights (SHA-256 of the state dict)
                             and layer shapes, calibration (samples, batches, SHA-256 of the
                             tensors, seed, input convention), level grid, solver settings
                             (``optbrain.budget.fingerprint``)
    layers/0000.safetensors  the layer's compressed weights at every non-dense level, per group:
                             "{level}/{g}/weight" (float32), "/mask" (uint8, pruned levels),
                             "/scale" and "/zero" (quantized levels)
    layers/0000.json         the layer: name, shape, groups, calibration positions per sample,
                             and per level: kept weights (nnz), bits, pattern, number of scales,
                             loss, predicted loss, model-level loss; SHA-256 of the tensors

Files are written to a temporary name and renamed into place (``atomic_json``,
``atomic_tensors``), so a file is either complete or absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._files import sha256_file
from .levels import Level

FORMAT = "optbrain-budget-db"
VERSION = 1
FINGERPRINT = "fingerprint.json"

__all__ = [
    "FINGERPRINT",
    "FORMAT",
    "VERSION",
    "Database",
    "DatabaseError",
    "DatabaseMismatchError",
    "atomic_json",
    "atomic_tensors",
]


class DatabaseError(ValueError):
    """A database directory that is missing, incomplete, or damaged."""


class DatabaseMismatchError(DatabaseError):
    """A database built from another model, calibration set, level grid or settings."""


def _tmp(path: Path) -> Path:
    """A temporary name beside ``path``, unique per process (two builds of one database at
    once then never rename each other's half-written files into place)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file renamed into place."""
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)


def atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` as safetensors to ``path`` (renamed into place); their SHA-256."""
    tmp = _tmp(path)
    # no header metadata: safetensors writes its keys in hash-map order, which would make
    # the bytes of two identical builds differ (the JSON record carries the format instead)
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(tmp))
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


class Database:
    """A built (or partly built) database directory. ``layers``: names in model order;
    ``record(name)``: the layer's JSON; ``level_weights(name, level)``: per-group tensors."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        fp = self.root / FINGERPRINT
        if not fp.is_file():
            raise DatabaseError(f"{self.root} is not a budget database (no {FINGERPRINT})")
        try:
            self.fingerprint = json.loads(fp.read_text())
        except json.JSONDecodeError as e:
            raise DatabaseError(f"{fp} is not valid JSON: {e}") from None
        if self.fingerprint.get("format") != FORMAT:
            raise DatabaseError(f"{fp} is not an optbrain budget database fingerprint")
        self.layers: list[str] = list(self.fingerprint["layer_order"])
        self.levels = [Level.parse(x) for x in self.fingerprint["levels"]]
        self._records: dict[str, dict[str, Any]] = {}

    def stem(self, name: str) -> Path:
        return self.root / "layers" / f"{self.layers.index(name):04d}"

    def is_complete(self, name: str, verify: bool = False) -> bool:
        js = self.stem(name).with_suffix(".json")
        st = self.stem(name).with_suffix(".safetensors")
        if not (js.is_file() and st.is_file()):
            return False
        try:
            rec = json.loads(js.read_text())
        except json.JSONDecodeError:
            return False
        if rec.get("name") != name:
            return False
        return not verify or sha256_file(st) == rec.get("tensors_sha256")

    @property
    def complete(self) -> bool:
        return all(self.is_complete(n) for n in self.layers)

    def record(self, name: str) -> dict[str, Any]:
        """The layer's JSON record (the layout above; its errors: ``optbrain.budget.database``)."""
        if name not in self._records:
            if not self.is_complete(name):
                raise DatabaseError(
                    f"layer {name!r} is missing from the database in {self.root} "
                    "(an interrupted build? build it again to resume)"
                )
            self._records[name] = json.loads(self.stem(name).with_suffix(".json").read_text())
        return self._records[name]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """All stored tensors of a layer, checksum verified."""
        rec = self.record(name)
        path = self.stem(name).with_suffix(".safetensors")
        if sha256_file(path) != rec["tensors_sha256"]:
            raise DatabaseError(
                f"{path} does not match its checksum (modified or truncated); delete it and "
                f"{path.with_suffix('.json').name} and build again to recompute the layer"
            )
        return load_file(str(path))

    def level_weights(
        self, name: str, level: str, tensors: dict[str, torch.Tensor] | None = None
    ) -> list[dict[str, torch.Tensor | None]]:
        """Per group: ``{"weight", "mask", "scale", "zero"}`` of ``level`` (None where absent).
        The dense level has no stored tensors (the model's own weights)."""
        rec = self.record(name)
        if level not in rec["levels"]:
            raise DatabaseError(f"layer {name!r} has no level {level!r}")
        if level == "dense":
            return [
                dict.fromkeys(("weight", "mask", "scale", "zero")) for _ in range(rec["groups"])
            ]
        t = self.tensors(name) if tensors is None else tensors
        return [
            {p: t.get(f"{level}/{g}/{p}") for p in ("weight", "mask", "scale", "zero")}
            for g in range(rec["groups"])
        ]
