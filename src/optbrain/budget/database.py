"""The per-layer database: every compressible layer compressed at every level of a grid, with
its error, stored on disk and built once for any number of budgets.

Layout of a database directory::

    fingerprint.json         what it was built from: model weights (SHA-256 of the state dict)
                             and layer shapes, calibration (samples, batches, SHA-256 of the
                             tensors, seed, input convention), level grid, solver settings
    layers/0000.safetensors  the layer's compressed weights at every non-dense level, per group:
                             "{level}/{g}/weight" (float32), "/mask" (uint8, pruned levels),
                             "/scale" and "/zero" (quantized levels)
    layers/0000.json         the layer: name, shape, groups, calibration positions per sample,
                             and per level: kept weights (nnz), bits, pattern, number of scales,
                             loss, predicted loss, model-level loss; SHA-256 of the tensors

Errors of a level (all summed over the groups of a layer):

* ``loss``: the layer-wise loss ``½ Σ_r δ_r H δ_rᵀ`` (``= ||δ Xᵀ||² / N``) with the collected,
  undamped ``H`` — measured on the stored weights, so it is comparable across levels.
* ``predicted``: the solver's own prediction (under the damped ``H``).
* ``model_loss`` (``model_level=True``): the model-level calibration loss increase when only
  this layer is swapped in — the mean squared difference of all floating-point model outputs
  from the dense model's on the calibration batches (as in the OBC paper's database).

Grouped convolutions are one unit: all groups of a layer take the same level (each group is
solved as its own problem, and the layer's numbers are the sums over groups).

Solvers: ``"obc"`` (exact: one ExactOBS trace per group gives every unstructured sparsity via
``trace.at(s)``, ExactOBS N:M per pattern, OBQ on top for bits — the arithmetic of
``compress_layer(method="obc")``); ``"fast"`` (SparseGPT for pruned levels, GPTQ for
quantized-only ones, one ``compress_layer`` call per level); ``"auto"`` (per layer: exact when
the modelled exact time of all its levels, ``optbrain.core.methods.auto.COST``, is within
``time_budget`` seconds, else fast).

Resuming: layers are written one at a time, tensors then JSON, each to a temporary file renamed
into place, so a layer is either complete or absent; an interrupted build skips the complete
layers (their tensor checksums verified) and computes the others exactly as it would have.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._files import sha256_file
from ..adapters import LayerAdapter, adapter_for, find_layers
from ..api import take_samples
from ..core.hessian import row_losses
from ..core.layer import compress_layer
from ..core.methods.auto import estimate_levels_seconds
from ..core.methods.obc import solve_obc_levels
from ..pipeline import collect_hessians, trace_input_shapes
from ..pipeline.data import Forward, calibration_mode, call_model, iter_batches, model_device
from ..pipeline.data import to_device as _to_device
from ..pipeline.progress import Progress
from .levels import Level, normalize_levels

FORMAT = "optbrain-budget-db"
VERSION = 1
FINGERPRINT = "fingerprint.json"
SOLVERS = ("obc", "fast", "auto")

__all__ = [
    "Database",
    "DatabaseError",
    "DatabaseMismatchError",
    "DbSettings",
    "build_database",
    "fingerprint",
]


class DatabaseError(ValueError):
    """A database directory that is missing, incomplete, or damaged."""


class DatabaseMismatchError(DatabaseError):
    """A database built from another model, calibration set, level grid or settings."""


@dataclass(frozen=True)
class DbSettings:
    """How the database's levels are computed (part of its fingerprint).

    damp: relative damping of H. sym / group_size: the quantization grid (symmetric, per
    output channel by default). solver: "obc" | "fast" | "auto". time_budget: seconds of
    modelled exact solving per layer below which "auto" uses the exact solver.
    model_level: also measure each level's model-level calibration loss increase.
    model_level_samples: measure it on the first this many calibration samples only (None:
    all); one forward over them per (layer, level), so this bounds the cost on big models.
    """

    damp: float = 0.01
    sym: bool = True
    group_size: int | None = None
    solver: str = "auto"
    time_budget: float = 300.0
    model_level: bool = False
    model_level_samples: int | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        n = self.model_level_samples
        if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
            raise ValueError(f"model_level_samples must be a positive integer or None, got {n!r}")


# --------------------------------------------------------------------------- files


def _tmp(path: Path) -> Path:
    """A temporary name beside ``path``, unique per process (two builds of one database at
    once then never rename each other's half-written files into place)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _atomic_json(path: Path, data: Any) -> None:
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    tmp = _tmp(path)
    # no header metadata: safetensors writes its keys in hash-map order, which would make
    # the bytes of two identical builds differ (the JSON record carries the format instead)
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(tmp))
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


# --------------------------------------------------------------------------- fingerprint


def _hash_batch(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, Mapping):
        for k in obj:
            h.update(f"K{k!r}".encode())
            _hash_batch(h, obj[k])
    elif isinstance(obj, (tuple, list)):
        h.update(f"L{len(obj)}".encode())
        for o in obj:
            _hash_batch(h, o)
    else:
        h.update(f"V{obj!r}".encode())


def _leading(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim():
                return int(v.shape[0])
    if isinstance(batch, (tuple, list)):
        for v in batch:
            if isinstance(v, torch.Tensor) and v.dim():
                return int(v.shape[0])
    return 1


def fingerprint(
    model: nn.Module,
    batches: Sequence[Any],
    levels: Sequence[Level],
    settings: DbSettings,
    *,
    seed: int | None = None,
    inputs: str = "all",
) -> dict[str, Any]:
    """What a database depends on; two builds with equal fingerprints give equal databases."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    layers, _ = find_layers(model)
    c = hashlib.sha256()
    for b in batches:
        _hash_batch(c, b)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "weights_sha256": h.hexdigest(),
            "layers": {n: list(m.weight.shape) for n, m in layers.items()},
        },
        "calibration": {
            "samples": sum(_leading(b) for b in batches),
            "batches": len(batches),
            "sha256": c.hexdigest(),
            "seed": seed,
            "inputs": inputs,
        },
        "levels": [lv.id for lv in levels],
        "settings": asdict(settings),
    }


def _compare(old: dict[str, Any], new: dict[str, Any], root: Path, levels_given: bool) -> None:
    diffs = []
    for key in ("format", "version"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} (database) vs {new.get(key)!r}")
    om, nm = old.get("model", {}), new["model"]
    if om.get("layers") != nm["layers"]:
        diffs.append("model: other layers or layer shapes")
    elif om.get("weights_sha256") != nm["weights_sha256"]:
        diffs.append("model: other weights (state-dict SHA-256 differs)")
    oc, nc = old.get("calibration", {}), new["calibration"]
    for k in nc:
        if k == "seed" and (oc.get(k) is None or nc[k] is None):
            continue  # an unknown seed: the data's SHA-256 decides
        if oc.get(k) != nc[k]:
            diffs.append(f"calibration {k}: {oc.get(k)!r} (database) vs {nc[k]!r}")
    os_, ns = old.get("settings", {}), new["settings"]
    for k in ns:
        if k == "model_level":
            continue  # a database without model-level errors gets them added
        if k == "model_level_samples" and not (ns["model_level"] and os_.get("model_level")):
            continue  # only matters when both have (or will have) model-level errors
        if os_.get(k) != ns[k]:
            diffs.append(f"setting {k}: {os_.get(k)!r} (database) vs {ns[k]!r}")
    if levels_given and old.get("levels") != new["levels"]:
        diffs.append(
            f"levels: database {old.get('levels')} vs requested {new['levels']} "
            "(pass levels=None to use the database's grid)"
        )
    if diffs:
        raise DatabaseMismatchError(
            f"the database in {root} was built for another model or settings — "
            + "; ".join(diffs)
            + ". Use another database directory, or delete this one to rebuild it."
        )


# --------------------------------------------------------------------------- the database


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
        """The layer's JSON record (see the module docstring)."""
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


# --------------------------------------------------------------------------- building


def exact_seconds(adapter: LayerAdapter, levels: Sequence[Level]) -> float:
    """Modelled seconds of the exact solver for all of a layer's levels (all groups)."""
    return estimate_levels_seconds(adapter.rows, adapter.cols, levels) * adapter.groups


def _solve_exact(
    W: torch.Tensor, H: torch.Tensor, levels: Sequence[Level], st: DbSettings
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, Any, float]]:
    """Every level of one group with the exact solver: ``{id: (weight, keep, grid, predicted)}``
    (``optbrain.core.methods.obc.solve_obc_levels``)."""
    todo = [lv for lv in levels if not lv.is_dense]
    solved = solve_obc_levels(W, H, todo, damp=st.damp, sym=st.sym, group_size=st.group_size)
    return {lv.id: sol for lv, sol in zip(todo, solved, strict=True)}


def _solve_fast(
    W: torch.Tensor, H: torch.Tensor, levels: Sequence[Level], st: DbSettings
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, Any, float]]:
    """Every level of one group with SparseGPT (pruned levels) / GPTQ (quantized only)."""
    out = {}
    for lv in levels:
        if lv.is_dense:
            continue
        res = compress_layer(
            W,
            H,
            sparsity=lv.sparsity or None,
            pattern=lv.pattern or "unstructured",
            bits=lv.bits,
            sym=st.sym,
            group_size=st.group_size,
            damp=st.damp,
            method="sparsegpt" if lv.prunes else "gptq",
        )
        out[lv.id] = (res.weight, res.mask, res.grid, float(res.loss))
    return out


def _outputs(obj: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return [obj.detach().double()] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        return [t for k in obj for t in _outputs(obj[k])]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _outputs(o)]
    return []


class _ModelLoss:
    """Model-level error: mean squared difference of the model outputs from the dense ones."""

    def __init__(self, model: nn.Module, batches: Sequence[Any], forward, inputs: str) -> None:
        self.model, self.batches, self.forward, self.inputs = model, batches, forward, inputs
        self.dense = self._run()
        self.numel = sum(t.numel() for outs in self.dense for t in outs)
        if self.numel == 0:
            raise ValueError(
                "model_level=True needs model outputs with floating-point tensors; "
                "pass forward=fn(model, batch) returning one"
            )

    def _run(self) -> list[list[torch.Tensor]]:
        dev = model_device(self.model)
        outs = []
        with calibration_mode(self.model):
            for _, b in iter_batches(self.batches):
                out = call_model(self.model, _to_device(b, dev), self.forward, self.inputs)
                outs.append(_outputs(out))
        return outs

    def __call__(self) -> float:
        total = 0.0
        for dense, outs in zip(self.dense, self._run(), strict=True):
            for d, o in zip(dense, outs, strict=True):
                total += float(((o - d) ** 2).sum())
        return total / self.numel


def _model_level_errors(
    adapter: LayerAdapter,
    entries: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    model_loss: _ModelLoss,
) -> None:
    """Add ``model_loss`` to every level entry: swap that level's weights in, measure, restore."""
    dense = [adapter.weight(g) for g in range(adapter.groups)]
    for lid, entry in entries.items():
        if lid == "dense":
            entry["model_loss"] = 0.0
            continue
        try:
            for g, w in enumerate(dense):
                adapter.set_weight(g, tensors[f"{lid}/{g}/weight"].to(w.device))
            entry["model_loss"] = model_loss()
        finally:
            for g, w in enumerate(dense):
                adapter.set_weight(g, w)


def _build_layer(
    name: str,
    index: int,
    adapter: LayerAdapter,
    hessians: list,
    levels: Sequence[Level],
    st: DbSettings,
    input_shape: tuple[int, ...] | None,
    model_loss: _ModelLoss | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    fit = [lv for lv in levels if lv.fits(adapter.cols)]
    solver = st.solver
    if solver == "auto":
        solver = "obc" if exact_seconds(adapter, fit) <= st.time_budget else "fast"
    solve = _solve_exact if solver == "obc" else _solve_fast
    G = adapter.groups
    per_group = []
    tensors: dict[str, torch.Tensor] = {}
    energy = 0.0
    for g in range(G):
        W = adapter.weight(g)
        H = hessians[g].hessian().to(W.device)
        energy += float(0.5 * ((W.double() @ H) * W.double()).sum())
        res = solve(W, H, fit, st)
        stats = {}
        for lid, (w, keep, grid, predicted) in res.items():
            w = w.to(torch.float32)
            tensors[f"{lid}/{g}/weight"] = w.cpu()
            if keep is not None:
                tensors[f"{lid}/{g}/mask"] = keep.cpu().to(torch.uint8)
            if grid is not None:
                tensors[f"{lid}/{g}/scale"] = grid.scale.cpu().to(torch.float32)
                tensors[f"{lid}/{g}/zero"] = grid.zero.cpu().to(torch.float32)
            stats[lid] = {
                "nnz": int(keep.sum()) if keep is not None else adapter.rows * adapter.cols,
                "loss": float(row_losses(W, w, H).sum()),
                "predicted": float(predicted),
                "scales": int(grid.scale.numel()) if grid is not None else 0,
            }
        per_group.append(stats)
        del H
    entries: dict[str, Any] = {}
    for lv in fit:
        e: dict[str, Any] = {
            "sparsity": 0.0,
            "pattern": lv.pattern,
            "bits": lv.bits,
            "sym": st.sym if lv.quantizes else None,
            "group_size": st.group_size if lv.quantizes else None,
        }
        if lv.is_dense:
            e.update(nnz=adapter.params, loss=0.0, predicted=0.0, scales=0)
        else:
            for k in ("nnz", "loss", "predicted", "scales"):
                e[k] = sum(s[lv.id][k] for s in per_group)
        e["sparsity"] = 1.0 - e["nnz"] / adapter.params
        entries[lv.id] = e
    if model_loss is not None:
        _model_level_errors(adapter, entries, tensors, model_loss)
    positions = adapter.positions(input_shape) if input_shape is not None else 1
    record = {
        "format": FORMAT,
        "name": name,
        "index": index,
        "type": type(adapter.module).__name__,
        "kind": adapter.kind,
        "groups": G,
        "rows": adapter.rows,
        "cols": adapter.cols,
        "params": adapter.params,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "positions": int(positions),
        "tokens": int(hessians[0].tokens),
        "dense_energy": energy,
        "solver": solver,
        "levels": entries,
    }
    return record, tensors


def build_database(
    model: nn.Module,
    batches: Sequence[Any],
    root: str | os.PathLike,
    levels: Sequence[Level | str] | None = None,
    *,
    settings: DbSettings | None = None,
    forward: Forward | None = None,
    inputs: str = "all",
    seed: int | None = None,
    quiet: bool = True,
    on_layer: Callable[[str], None] | None = None,
) -> Database:
    """Build (or resume, or reuse) the database of ``model`` in directory ``root``.

    batches: the calibration batches (a list; the optbrain batch convention, see
      ``optbrain.pipeline.data``). levels: the grid (None: the grid of an existing database,
      else ``default_levels()``); the dense level is always added.
    A database already in ``root`` whose fingerprint differs (model weights, calibration,
    levels, settings) raises ``DatabaseMismatchError``; its complete layers are reused, and
    asking ``model_level=True`` of one built without adds the model-level errors (from the
    stored weights, no re-solving).
    on_layer(name): called after each layer is written (progress hooks, tests).
    The model is left unchanged (weights swapped for model-level errors are restored).
    """
    st = settings or DbSettings()
    root = Path(root)
    batches = list(batches)
    if not batches:
        raise ValueError("calibration is empty: at least one batch is needed")
    old = None
    if (root / FINGERPRINT).is_file():
        old = Database(root).fingerprint
    if levels is None and old is not None:
        grid = normalize_levels(old["levels"])
    else:
        grid = normalize_levels(levels)
    fp = fingerprint(model, batches, grid, st, seed=seed, inputs=inputs)
    layers, _ = find_layers(model)
    if not layers:
        raise ValueError("nothing to compress: the model has no compressible layer")
    fp["layer_order"] = list(layers)
    if old is not None:
        _compare(old, fp, root, levels_given=levels is not None)
    else:
        (root / "layers").mkdir(parents=True, exist_ok=True)
        _atomic_json(root / FINGERPRINT, fp)
    (root / "layers").mkdir(parents=True, exist_ok=True)
    db = Database(root)
    pending = [n for n in db.layers if not db.is_complete(n, verify=True)]
    upgrade = st.model_level and not db.fingerprint["settings"].get("model_level")
    if not pending and not upgrade:
        return db
    mloss = None
    if st.model_level:
        few = (
            batches
            if st.model_level_samples is None
            else take_samples(batches, st.model_level_samples)
        )
        mloss = _ModelLoss(model, few, forward, inputs)
    if pending:
        _build_pending(
            model, batches, db, pending, layers, st, forward, inputs, mloss, quiet, on_layer
        )
    if upgrade:  # model-level errors for the layers built without them, then the fingerprint
        _add_model_level(db, layers, mloss, quiet)  # type: ignore[arg-type]
        fp = dict(db.fingerprint)
        fp["settings"] = {
            **fp["settings"],
            "model_level": True,
            "model_level_samples": st.model_level_samples,
        }
        _atomic_json(root / FINGERPRINT, fp)
    return Database(root)


def _add_model_level(
    db: Database, layers: dict[str, nn.Module], mloss: _ModelLoss, quiet: bool
) -> None:
    todo = [
        n for n in db.layers if any("model_loss" not in e for e in db.record(n)["levels"].values())
    ]
    progress = Progress(len(todo), "model-level errors", enabled=not quiet)
    try:
        for name in todo:
            rec = json.loads(json.dumps(db.record(name)))
            _model_level_errors(adapter_for(layers[name]), rec["levels"], db.tensors(name), mloss)
            _atomic_json(db.stem(name).with_suffix(".json"), rec)
            progress.update(name)
    finally:
        progress.close()


def _build_pending(
    model: nn.Module,
    batches: Sequence[Any],
    db: Database,
    pending: list[str],
    layers: dict[str, nn.Module],
    st: DbSettings,
    forward: Forward | None,
    inputs: str,
    mloss: _ModelLoss | None,
    quiet: bool,
    on_layer: Callable[[str], None] | None,
) -> None:
    adapters = {n: adapter_for(layers[n]) for n in pending}
    shapes = trace_input_shapes(model, adapters, batches[0], forward, inputs=inputs)
    hessians = collect_hessians(model, adapters, batches, forward, inputs=inputs)
    progress = Progress(len(pending), "database", enabled=not quiet)
    try:
        for name in pending:
            rec, tensors = _build_layer(
                name,
                db.layers.index(name),
                adapters[name],
                hessians.pop(name),
                db.levels,
                st,
                shapes.get(name),
                mloss,
            )
            stem = db.stem(name)
            rec["tensors_sha256"] = _atomic_tensors(stem.with_suffix(".safetensors"), tensors)
            _atomic_json(stem.with_suffix(".json"), rec)
            progress.update(name)
            if on_layer is not None:
                on_layer(name)
    finally:
        progress.close()
