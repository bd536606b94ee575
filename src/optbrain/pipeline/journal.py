"""The journal of a compress run: each solved layer kept on disk as it finishes, so that a
killed or interrupted ``compress`` resumes where it stopped instead of starting over.

Layout of a journal directory::

    journal.json                what the run is (its key): the recipe, the model's weights
                                (SHA-256 of the state dict before compression), the
                                calibration batches (SHA-256), the input convention; sealed
    layers/NNNN.safetensors     one solved layer: the weight written per group
                                ("{g}.weight") and its state's mask / scale / zero
    layers/NNNN.json            its name, report records, plan and group manifests, and the
                                SHA-256 of the tensors file; sealed

A layer is whole or absent: its tensors are written first, then the record naming their
checksum, each atomically (``optbrain._files.atomic_write``). ``compress(..., journal=DIR)``
replays the journaled layers of a run with the same key (their weights written, records and
state restored, no solve) and solves the others. In sequential mode the calibration passes
still run, each later layer's H computed from the model with the replayed weights in place, so
the result is bit-identical to an uninterrupted run; only the solves are saved. A layer whose
files are damaged or edited is solved again. A journal with another key (other recipe, model or
calibration) is deleted when opened, with a note: its layers do not belong to this run.
"""

from __future__ import annotations

import hashlib
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
    tensor_bytes,
    unseal,
)
from ..report import LayerRecord
from .state import GroupState, LayerState

FORMAT = "optbrain-journal"
VERSION = 1
KEY = "journal.json"

__all__ = ["Journal", "journal_key", "replay_layer"]


def journal_key(model: nn.Module, batches: list[Any], recipe: dict[str, Any], inputs: str) -> dict:
    """What a journal's layers depend on: two runs with equal keys solve equal layers."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return {
        "format": FORMAT,
        "version": VERSION,
        "recipe": recipe,
        "weights_sha256": h.hexdigest(),
        "calibration_sha256": batches_sha256(batches),
        "batches": len(batches),
        "inputs": inputs,
    }


class Journal:
    """A journal directory (see the module docstring) opened for the run with ``key``.

    ``notes``: what opening it found (layers kept from an interrupted run, or a journal of
    another run deleted), for the progress line.
    """

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        self.root = Path(root)
        self.notes: list[str] = []
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"journal {self.root} is a file; pass a directory")
        key = seal(key)
        old = self._old_key()
        same = old is not None and old.get(SEAL) == key[SEAL]
        if old is not None and not same:
            shutil.rmtree(self.root)
            self.notes.append(
                f"journal {self.root}: it held an interrupted run of another recipe, model or "
                "calibration; deleted, starting over"
            )
        self.layers = self.root / "layers"
        self.layers.mkdir(parents=True, exist_ok=True)
        clean_stale(self.layers)
        if not same:
            atomic_json(self.root / KEY, key)
        self.index = self._scan()
        used = [int(p.name.split(".")[0]) for p in self.layers.iterdir() if p.name[:4].isdigit()]
        self._next = max(used, default=-1) + 1
        if self.index:
            self.notes.append(
                f"journal {self.root}: resuming, {len(self.index)} layer(s) solved before are "
                "replayed (not solved again)"
            )

    def _old_key(self) -> dict[str, Any] | None:
        path = self.root / KEY
        if not path.is_file():
            if self.root.is_dir() and any(self.root.iterdir()):
                raise ValueError(
                    f"journal {self.root} is not empty and holds no journal ({KEY} missing); "
                    "refusing to write into it"
                )
            return None
        try:
            old = read_json(path)
            unseal(old, str(path))
        except (ValueError, UnsealError):
            return {SEAL: "damaged"}  # not this run's: deleted and started over
        return old

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
