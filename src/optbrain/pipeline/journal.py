"""The journal of a compress run: each solved layer kept on disk as it finishes, so that a
killed or interrupted ``compress`` resumes where it stopped instead of starting over.

Layout (``base``: the directory passed as ``journal=``; one subdirectory per run, named by
its key, so an interrupted run of other settings keeps its own)::

    base/<key hash>/journal.json       what the run is (its key): the recipe, the model's
                                       weights, module tree and code, the calibration batches
                                       (SHA-256 each), the input convention, the versions; sealed
    base/<key hash>/layers/NNNN.safetensors   one solved layer: the weight written per group
                                       ("{g}.weight") and its state's mask / scale / zero
    base/<key hash>/layers/NNNN.json   its name, report records, plan and group manifests, and
                                       the SHA-256 of the tensors file; sealed

A layer is whole or absent: its tensors are written first, then the record naming their
checksum, each atomically (``optbrain._files.atomic_write``). ``compress(..., journal=DIR)``
replays the journaled layers of a run with the same key (their weights written, records and
state restored, no solve) and solves the others. In sequential mode the calibration passes
still run, each later layer's H computed from the model with the replayed weights in place, so
the result is bit-identical to an uninterrupted run; only the solves are saved. A layer whose
files are damaged or edited is solved again. The key is written before any layer and deleted
first by ``discard``, so a subdirectory without a valid key is a leftover and is cleared.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import (
    SEAL,
    UnsealError,
    atomic_json,
    atomic_write,
    batches_sha256,
    clean_stale,
    read_json,
    safetensors_bytes,
    seal,
    sha256_bytes,
    state_sha256,
    unseal,
)
from ..report import LayerRecord
from .state import GroupState, LayerState

FORMAT = "optbrain-journal"
VERSION = 1
KEY = "journal.json"

__all__ = ["Journal", "discard", "journal_key", "replay_layer"]


def _source(obj: Any) -> bytes:
    """The source text of a function (its qualified name when there is none, e.g. a builtin)."""
    try:
        return inspect.getsource(obj).encode()
    except (OSError, TypeError):
        name = getattr(obj, "__qualname__", repr(obj))
        return f"{getattr(obj, '__module__', '')}.{name}".encode()


def _code_sha256(model: nn.Module, forward: Any) -> str:
    """What the model computes besides its weights: the module tree (``repr``: layer types and
    their settings), the source of every module class's ``forward`` and of ``forward=``."""
    h = hashlib.sha256(repr(model).encode())
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: c.__qualname__):
        h.update(f"{cls.__module__}.{cls.__qualname__}|".encode())
        h.update(_source(cls.forward))
    if forward is not None:
        h.update(_source(forward))
    return h.hexdigest()


def journal_key(
    model: nn.Module,
    batches: list[Any],
    recipe: dict[str, Any],
    inputs: str,
    forward: Any = None,
) -> dict:
    """What a journal's layers depend on: two runs with equal keys solve equal layers. The
    model's weights, module tree and code, ``forward=``, the calibration batches, the input
    convention, the recipe, and the optbrain and torch versions."""
    from .._version import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        "recipe": recipe,
        "weights_sha256": state_sha256(model),
        "code_sha256": _code_sha256(model, forward),
        "calibration_sha256": batches_sha256(batches),
        "batches": len(batches),
        "inputs": inputs,
        "optbrain": __version__,
        "torch": torch.__version__,
    }


class Journal:
    """The journal of the run with ``key`` (see the module docstring) in directory ``base``:
    ``base/<16 hex digits of the key's hash>/``. Interrupted runs of other settings keep their
    own subdirectories (a rerun of their command resumes them); nothing else in ``base`` is
    read, written or deleted.

    ``notes``: what opening it found (layers kept from an interrupted run, other runs'
    journals), for the progress line. ``discard()`` deletes it once the result is saved.
    """

    def __init__(self, base: str | Path, key: dict[str, Any]) -> None:
        self.base = Path(base)
        self.notes: list[str] = []
        if self.base.exists() and not self.base.is_dir():
            raise ValueError(f"journal {self.base} is a file; pass a directory")
        key = seal(key)
        self.root = self.base / key[SEAL][:16]
        if self._old_seal() != key[SEAL]:
            # absent, or a leftover of this name without a valid key (a kill before the key
            # was written, or during a discard): its layers cannot be trusted
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True)
            atomic_json(self.root / KEY, key)  # the key first, then any layer
        self.layers = self.root / "layers"
        self.layers.mkdir(exist_ok=True)
        clean_stale(self.layers)
        self.index = self._scan()
        used = [int(p.name.split(".")[0]) for p in self.layers.iterdir() if p.name[:4].isdigit()]
        self._next = max(used, default=-1) + 1
        if self.index:
            self.notes.append(
                f"journal {self.root}: resuming, {len(self.index)} layer(s) solved before are "
                "replayed (not solved again)"
            )
        others = [d for d in self.base.iterdir() if d != self.root and (d / KEY).is_file()]
        if others:
            mb = sum(f.stat().st_size for d in others for f in d.rglob("*") if f.is_file()) / 1e6
            self.notes.append(
                f"journal {self.base}: also holds {len(others)} interrupted run(s) of other "
                f"settings ({mb:.1f} MB); rerun their command to resume, or delete them"
            )

    def _old_seal(self) -> str | None:
        path = self.root / KEY
        try:
            rec = read_json(path)
            unseal(rec, str(path))
        except (ValueError, UnsealError, OSError):
            return None
        return rec[SEAL]

    def discard(self) -> None:
        """Delete this run's journal: its key first (a deletion cut short leaves a directory
        the next open clears as a leftover), then its layers; ``base`` too when empty."""
        discard(self.root)

    def _scan(self) -> dict[str, Path]:
        """name -> record stem of every whole, unedited layer."""
        out = {}
        for js in sorted(self.layers.glob("*.json")):
            try:
                rec = unseal(read_json(js), str(js))
            except (ValueError, UnsealError):
                continue
            if isinstance(rec.get("name"), str):
                out[rec["name"]] = js.with_suffix("")
        return out

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def write(
        self,
        name: str,
        weights: list[torch.Tensor],
        records: list[LayerRecord],
        state: LayerState,
    ) -> None:
        """Keep solved layer ``name``: the weight written per group, its report records and
        its state (plan, masks, grids)."""
        stem = self.index.get(name)
        if stem is None:
            stem, self._next = self.layers / f"{self._next:04d}", self._next + 1
        tensors = {f"{g}.weight": w for g, w in enumerate(weights)}
        groups = [gs.to_manifest(str(g), tensors) for g, gs in enumerate(state.groups)]
        digest = atomic_write(stem.with_suffix(".safetensors"), safetensors_bytes(tensors))
        body = {
            "name": name,
            "tensors_sha256": digest,
            "records": [r.to_dict() for r in records],
            "plan": state.plan,
            "groups": groups,
        }
        atomic_json(stem.with_suffix(".json"), seal(body))
        self.index[name] = stem

    def read(
        self, name: str, shapes: list[tuple[int, ...]]
    ) -> tuple[list[torch.Tensor], list[LayerRecord], LayerState] | None:
        """Layer ``name`` as written: ``(weights per group, records, state)``; None when its
        tensors do not match their checksum or ``shapes`` (damaged, or another layout): the
        layer is then solved again."""
        from safetensors.torch import load as load_bytes

        stem = self.index[name]
        try:
            rec = unseal(read_json(stem.with_suffix(".json")), str(stem))
            data = stem.with_suffix(".safetensors").read_bytes()
        except (ValueError, UnsealError, OSError):
            return None
        if sha256_bytes(data) != rec["tensors_sha256"]:
            return None
        tensors = load_bytes(data)
        weights = [tensors.get(f"{g}.weight") for g in range(len(shapes))]
        if any(w is None or tuple(w.shape) != s for w, s in zip(weights, shapes, strict=True)):
            return None
        if len(rec["groups"]) != len(shapes):
            return None
        state = LayerState(
            plan=rec["plan"], groups=[GroupState.from_manifest(g, tensors) for g in rec["groups"]]
        )
        return weights, [LayerRecord.from_dict(d) for d in rec["records"]], state  # type: ignore[misc]


def replay_layer(comp: Any, name: str) -> bool:
    """Layer ``name`` of ``comp`` (a ``LayerCompressor``) from its journal: the weights written
    (the dense ones kept in ``comp.backup`` first), records and state restored; True, or False
    when there is no journal, the layer is not in it or its files are damaged: solve it."""
    journal = comp.journal
    if journal is None or name not in journal:
        return False
    adapter = comp.adapters[name]
    dense = [adapter.weight(g) for g in range(adapter.groups)]
    got = journal.read(name, [tuple(w.shape) for w in dense])
    if got is None:
        return False
    weights, records, state = got
    comp.backup.keep(adapter.module.weight)
    for g, (w, d) in enumerate(zip(weights, dense, strict=True)):
        adapter.set_weight(g, w.to(device=d.device, dtype=d.dtype))
    comp.records.extend(records)
    comp.state[name] = state
    comp.actual[name] = sum(r.seconds for r in records)
    comp.progress.update(f"{name} (solved before: replayed from the journal)")
    return True


def discard(root: str | Path) -> None:
    """Delete the journal directory ``root`` (``Journal.root``, e.g. a report's
    ``metadata["journal"]``), key first, and its parent when nothing else is left in it."""
    root = Path(root)
    (root / KEY).unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.parent.rmdir()
