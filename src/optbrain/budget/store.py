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

Files are written through ``optbrain._files.atomic_write`` (temporary file in the same
directory, fsync, rename), so a file is either complete or absent; the fingerprint and every
layer record are sealed by the SHA-256 of their own canonical JSON, and a record names the
SHA-256 of its tensors: an edited record (a changed ``nnz``) is refused, and the layer counts
as not built (a rebuild recomputes it). A killed writer's temporary files are ignored and
deleted by the next build.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from .. import _files
from .._files import (
    CheckpointError,
    UnsealError,
    read_json,
    safetensors_bytes,
    seal,
    sha256_bytes,
    sha256_file,
)
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


def complete_record(stem: Path, name: str, verify: bool = False) -> dict[str, Any] | None:
    """The record of unit ``name`` stored as ``stem.json`` + ``stem.safetensors`` when both
    are there, the record is sealed and names ``name`` (and, with ``verify``, the tensors match
    its checksum); None otherwise (absent, interrupted or damaged: build it again)."""
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (js.is_file() and st.is_file()):
        return None
    try:
        rec = read_record(js)
    except DatabaseError:
        return None
    if rec.get("name") != name:
        return None
    if verify and sha256_file(st) != rec.get("tensors_sha256"):
        return None
    return rec


def checked_tensors(path: Path, rec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, read once and checked against ``rec["tensors_sha256"]``
    (the bytes checked are the bytes parsed); a mismatch or unreadable file: DatabaseError."""
    data = path.read_bytes()
    if sha256_bytes(data) != rec.get("tensors_sha256"):
        raise DatabaseError(
            f"{path} does not match its checksum (modified or truncated); delete it and "
            f"{path.with_suffix('.json').name} and build again to recompute it"
        )
    try:
        return load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as e:
        raise DatabaseError(f"{path} cannot be read: {e}") from None


class DatabaseError(CheckpointError):
    """A database directory that is missing, incomplete, or damaged (a ``CheckpointError``)."""


class DatabaseMismatchError(DatabaseError):
    """A database built from another model, calibration set, level grid or settings."""


def atomic_json(path: Path, data: dict[str, Any]) -> None:
    """Write the record ``data``, sealed (``optbrain._files.seal``), atomically to ``path``."""
    _files.atomic_json(path, seal(data))


def atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` as safetensors (sorted header: reproducible bytes) atomically to
    ``path``; their SHA-256."""
    return _files.atomic_write(path, safetensors_bytes(tensors))


def read_record(path: Path) -> dict[str, Any]:
    """A sealed JSON record; ``DatabaseError`` naming the file when it is damaged or edited."""
    try:
        return _files.unseal(read_json(path), str(path))
    except (UnsealError, ValueError, OSError) as e:
        raise DatabaseError(str(e)) from None


class Database:
    """A built (or partly built) database directory. ``layers``: names in model order;
    ``record(name)``: the layer's JSON; ``level_weights(name, level)``: per-group tensors.
    ``seconds``: solve seconds of the layers the build that returned it computed (not stored:
    the files stay reproducible byte for byte)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.seconds: dict[str, float] = {}
        fp = self.root / FINGERPRINT
        if not fp.is_file():
            raise DatabaseError(f"{self.root} is not a budget database (no {FINGERPRINT})")
        self.fingerprint = read_record(fp)
        if self.fingerprint.get("format") != FORMAT:
            raise DatabaseError(f"{fp} is not an optbrain budget database fingerprint")
        try:
            self.layers: list[str] = [str(n) for n in self.fingerprint["layer_order"]]
            self.levels = [Level.parse(x) for x in self.fingerprint["levels"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DatabaseError(f"{fp} is malformed: {type(e).__name__}: {e}") from None
        self._records: dict[str, dict[str, Any]] = {}

    def stem(self, name: str) -> Path:
        return self.root / "layers" / f"{self.layers.index(name):04d}"

    def is_complete(self, name: str, verify: bool = False) -> bool:
        return complete_record(self.stem(name), name, verify) is not None

    @property
    def complete(self) -> bool:
        return all(self.is_complete(n) for n in self.layers)

    def record(self, name: str) -> dict[str, Any]:
        """The layer's JSON record (the layout above; its errors: ``optbrain.budget.database``)."""
        if name not in self._records:
            js = self.stem(name).with_suffix(".json")
            if js.is_file():
                read_record(js)  # an edited or damaged record: say so (its own hash)
            if not self.is_complete(name):
                raise DatabaseError(
                    f"layer {name!r} is missing from the database in {self.root} "
                    "(an interrupted build? build it again to resume)"
                )
            self._records[name] = read_record(js)
        return self._records[name]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """All stored tensors of a layer, checksum verified."""
        rec = self.record(name)
        return checked_tensors(self.stem(name).with_suffix(".safetensors"), rec)

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


@contextlib.contextmanager
def database_root(db_dir: str | os.PathLike | None) -> Iterator[Path]:
    """The database directory of a budget run: ``db_dir`` itself, or (None) a temporary
    directory deleted when the body ends."""
    if db_dir is not None:
        yield Path(db_dir)
        return
    with tempfile.TemporaryDirectory(prefix="optbrain-db-") as tmp:
        yield Path(tmp)
