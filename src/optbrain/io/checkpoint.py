"""Save what ``optbrain.compress`` did to a model, and apply it to a fresh copy without
recompressing.

A run directory holds::

    compressed.safetensors   every compressed layer's weight exactly as in the module, its
                             masks (uint8) and quantization scales / zero points per group,
                             and batch-norm statistics when they were re-calibrated (a re-save
                             into the same directory alternates with compressed.b.safetensors)
    manifest.json            format version, tensor index (layer → keys, shapes, dtypes), the
                             name and SHA-256 of the tensors file, the recipe, the report, the
                             torch version and thread count; sealed by the SHA-256 of its own
                             canonical JSON (``optbrain._files.seal``)
    report.json              a copy of the manifest's report, for people and ``optbrain report``

No pickle anywhere. Atomic: the tensors go to the slot the current manifest does not name, then
the manifest is renamed into place (the commit), then the old slot is deleted; every file goes
through ``optbrain._files.atomic_write``. A writer killed at any moment leaves a directory that
loads as the old run or the new one. ``load`` checks the manifest's seal, the tensors' checksum,
the format version and that every layer exists in the model with the same weight shape and
dtype, and copies the tensors in: the model is then bit-identical to the one that was saved.
Same tensors and thread count give the same bytes in every file.

``save(model, path, packed=True)`` (what ``optbrain.export(model, path, format="safetensors")``
writes) stores the layers as format version 3 instead: integer codes (two 4-bit codes per
byte), mask bits and scales per group (``optbrain.io.packed``), about 1/8 of the float32
bytes at 4 bits; a layer whose weight is not exactly on its grid is stored as it is. ``load``
reads versions 1 to 3.

A shrunk model (``optbrain.shrink``) also stores its whole state dict under ``shrunk.`` (the new
shapes), the example inputs under ``shrink.example.`` and the shrink operations in the manifest;
``load`` replays the operations on the fresh dense model before copying the tensors in.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from torch import nn

from .._files import (
    CheckpointError,
    UnsealError,
    atomic_json,
    atomic_write,
    clean_stale,
    read_json,
    safetensors_bytes,
    seal,
    sha256_bytes,
    tensor_bytes,
    unseal,
)
from ..adapters import adapter_for
from ..pipeline.state import GroupState, LayerState, ModelState, compressed_state
from . import packed as packed_layout
from .layers import compressed_layers

FORMAT = "optbrain-compressed"
VERSION = 2
#: version 2 with packed layers (integer codes, mask bits; ``optbrain.io.packed``)
PACKED_VERSION = 3
#: run directories written before manifests were sealed: still loaded (see ``read_manifest``)
LEGACY_VERSION = 1
TENSORS = "compressed.safetensors"
TENSORS_B = "compressed.b.safetensors"
MANIFEST = "manifest.json"
REPORT = "report.json"
SHRUNK = "shrunk."
EXAMPLE = "shrink.example."


def _bn_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


def environment() -> dict[str, Any]:
    """What the numbers of a run may depend on: torch version and intra-op thread count."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads()}


def _current_tensors_name(d: Path) -> str | None:
    """The tensors file named by the manifest now in ``d`` (None when there is none)."""
    try:
        return str(read_manifest(d).get("tensors"))
    except CheckpointError:
        return None


def dense_fingerprint(model: nn.Module, compressed: Iterable[str]) -> str | None:
    """sha256 over the parameters outside the ``compressed`` layers (name, dtype, shape, bytes):
    what compression leaves as it was, so that a run is applied only to the model it was made
    from (another model of the same shapes would load silently otherwise). Parameters shared
    with a compressed layer (tied weights) are left out. None when there is no such parameter.
    """
    mods = dict(model.named_modules())
    names = list(compressed)
    tied = {p.data_ptr() for n in names if n in mods for p in mods[n].parameters()}
    skip = tuple(f"{n}." for n in names)
    h, count = hashlib.sha256(), 0
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.startswith(skip) or p.data_ptr() in tied:
            continue
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|".encode())
        h.update(tensor_bytes(p))
        count += 1
    return h.hexdigest() if count else None


def save(model: nn.Module, path: str | os.PathLike, packed: bool = False) -> Path:
    """Write the compressed layers of ``model`` (after ``optbrain.compress``) to directory
    ``path`` (created if needed); ``packed=True``: as integer codes (format version 3).
    Returns the directory."""
    state = compressed_state(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    modules = dict(model.named_modules())
    layers = compressed_layers(model) if packed else {}
    for name, entry in state.layers.items():
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"layer {name!r} was compressed but is no longer in the model")
        w = module.weight.detach()
        groups = packed_layout.layer_entry(layers[name], name, tensors) if name in layers else None
        if groups is not None:
            index[name] = {
                "packed": True,
                "shape": list(w.shape),
                "dtype": str(w.dtype).removeprefix("torch."),
                "groups": groups,
                "plan": entry.plan,
            }
            continue
        key = f"{name}.weight"
        tensors[key] = w.cpu().contiguous()
        index[name] = {
            "weight": key,
            "shape": list(w.shape),
            "dtype": str(w.dtype).removeprefix("torch."),
            "groups": [
                grp.to_manifest(f"{name}.g{g}", tensors) for g, grp in enumerate(entry.groups)
            ],
            "plan": entry.plan,
        }
    buffers: dict[str, list[str]] = {}
    if state.bn_recalibrated:
        for name, bn in _bn_modules(model).items():
            keys = []
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                t = getattr(bn, b, None)
                if t is not None:
                    k = f"{name}.{b}"
                    tensors[k] = t.detach().cpu().contiguous()
                    keys.append(k)
            buffers[name] = keys
    shrink = None
    if state.shrink:
        example = _pack_example(state.shrink_example, tensors)
        for k, v in model.state_dict().items():
            tensors[f"{SHRUNK}{k}"] = v.detach().cpu().clone().contiguous()
        shrink = {"ops": state.shrink["ops"], "example": example, "report": state.shrink}
    clean_stale(out)
    current = _current_tensors_name(out)
    name = TENSORS_B if current == TENSORS else TENSORS  # never overwrite what the manifest names
    version = PACKED_VERSION if packed else VERSION
    data = safetensors_bytes(tensors, {"format": FORMAT, "version": str(version)})
    digest = atomic_write(out / name, data)
    manifest = {
        "format": FORMAT,
        "version": version,
        "tensors": name,
        "sha256": digest,
        "layers": index,
        "buffers": buffers,
        "recipe": state.recipe,
        "report": state.report,
        "environment": environment(),
    }
    if shrink is not None:  # it stores the whole shrunk model: nothing else to match
        manifest["shrink"] = shrink
    else:
        manifest["dense_fingerprint"] = dense_fingerprint(model, state.layers)
    atomic_json(out / MANIFEST, seal(manifest))  # the commit point
    for old in {TENSORS, TENSORS_B} - {name}:
        (out / old).unlink(missing_ok=True)
    atomic_json(out / REPORT, state.report)
    return out


def _pack_example(example: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Store the shrink example inputs in ``tensors``; returns how to rebuild them."""
    if isinstance(example, torch.Tensor):
        tensors[f"{EXAMPLE}0"] = example.detach().cpu().contiguous()
        return {"kind": "tensor"}
    if isinstance(example, dict):
        for k, v in example.items():
            tensors[f"{EXAMPLE}{k}"] = v.detach().cpu().contiguous()
        return {"kind": "kwargs", "keys": list(example)}
    if isinstance(example, tuple | list):
        for i, v in enumerate(example):
            tensors[f"{EXAMPLE}{i}"] = v.detach().cpu().contiguous()
        return {"kind": "args", "keys": [str(i) for i in range(len(example))]}
    raise CheckpointError(
        f"cannot save the shrink example inputs of type {type(example).__name__} "
        "(a tensor, a tuple or a dict of tensors)"
    )


def _unpack_example(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if info["kind"] == "tensor":
        return tensors[f"{EXAMPLE}0"]
    vals = [tensors[f"{EXAMPLE}{k}"] for k in info["keys"]]
    return dict(zip(info["keys"], vals, strict=True)) if info["kind"] == "kwargs" else tuple(vals)


def _replay_shrink(
    model: nn.Module, shrink: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Shrink the fresh dense ``model`` as the saved one was, then copy its whole state in."""
    from ..pipeline.shrink import apply_ops

    example = _unpack_example(shrink["example"], tensors)
    was_training = model.training
    apply_ops(model.eval(), example, shrink["ops"])
    model.train(was_training)
    saved = {k[len(SHRUNK) :]: v for k, v in tensors.items() if k.startswith(SHRUNK)}
    try:
        model.load_state_dict(saved, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"the shrunk checkpoint does not fit the replayed model: {e}"
        ) from None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The validated manifest of a run directory."""
    d = Path(path)
    mpath = d / MANIFEST
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory written by optbrain.save")
    if not mpath.is_file():
        raise CheckpointError(
            f"{d} has no {MANIFEST}; not a run directory written by optbrain.save"
        )
    try:
        manifest = read_json(mpath)
    except (ValueError, OSError) as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not an optbrain manifest (format != {FORMAT!r})")
    version = manifest.get("version")
    if version == LEGACY_VERSION:
        # written before manifests were sealed: the tensors' checksum is all it has, so ``load``
        # also requires every tensor of the file to be named by the manifest (an edit that
        # drops layers is refused); the report comes from report.json
        manifest = {**manifest, "tensors": TENSORS, "report": _legacy_report(d)}
    elif version not in (VERSION, PACKED_VERSION):
        raise CheckpointError(
            f"{mpath} has format version {version!r}; this optbrain reads versions "
            f"{LEGACY_VERSION} to {PACKED_VERSION} (save the run again)"
        )
    else:
        try:
            manifest = unseal(manifest, str(mpath))
        except UnsealError as e:
            raise CheckpointError(str(e)) from None
    for key in ("tensors", "sha256", "layers", "buffers"):
        if key not in manifest:
            raise CheckpointError(f"{mpath} lacks {key!r} (truncated or edited?)")
    if manifest["tensors"] not in (TENSORS, TENSORS_B):
        raise CheckpointError(f"{mpath} names tensors file {manifest['tensors']!r}")
    if not isinstance(manifest["layers"], dict) or not manifest["layers"]:
        raise CheckpointError(f"{mpath} lists no compressed layer; nothing to apply")
    return manifest


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply a saved run to ``model`` (a fresh copy of the dense model) and return it.

    Raises ``CheckpointError`` when the files are missing, truncated or modified (the tensors'
    checksum, the manifest's seal), the manifest is malformed, or a layer is absent from the
    model or has another shape or dtype. The model is changed only after every check passed,
    except that a shrunk run first replays its shrink (the shapes must change before they can
    be checked).
    """
    d = Path(path)
    manifest = read_manifest(d)
    tpath = d / manifest["tensors"]
    if not tpath.is_file():
        raise CheckpointError(f"{d} has no {manifest['tensors']}")
    data = tpath.read_bytes()  # one read: the bytes checked are the bytes parsed
    if sha256_bytes(data) != manifest["sha256"]:
        raise CheckpointError(
            f"{tpath} does not match its checksum in {MANIFEST} (file "
            "truncated or modified); refusing to load it"
        )
    try:
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{tpath} cannot be read: {e}") from None
    if manifest.get("version") == LEGACY_VERSION:
        _check_all_named(d, manifest, tensors)
    if manifest.get("shrink"):  # shapes change first: replay the shrink on the dense model
        try:
            _replay_shrink(model, manifest["shrink"], tensors)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{d / MANIFEST}: cannot replay the shrink: {e}") from None
    try:  # every check, and the new state, before anything is written into the model
        plan, state = _plan_load(model, d, manifest, tensors)
    except CheckpointError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{d / MANIFEST} is malformed (edited?): {type(e).__name__}: {e}"
        ) from None
    want = manifest.get("dense_fingerprint")
    if want is not None and not manifest.get("shrink"):
        got = dense_fingerprint(model, manifest["layers"])
        if got != want:
            raise CheckpointError(
                f"{d} was made from another model: the weights outside its compressed layers "
                "differ from this model's (same shapes, other values); load it onto the dense "
                "model it was compressed from"
            )
    report = manifest.get("report")
    with torch.no_grad():
        for write in plan:
            write()
    state.report = report
    if manifest.get("shrink"):
        state.shrink = manifest["shrink"]["report"]
        state.shrink_example = _unpack_example(manifest["shrink"]["example"], tensors)
    state.attach(model)
    return model


Write = Callable[[], None]


def _plan_load(
    model: nn.Module, d: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[list[Write], ModelState]:
    """The writes to do and the model's new ``ModelState``, after checking that the checkpoint
    fits ``model``; nothing is written."""
    modules = dict(model.named_modules())
    plan: list[Write] = []
    layers: dict[str, LayerState] = {}
    for name, info in manifest["layers"].items():
        module = modules.get(name)
        w = getattr(module, "weight", None) if module is not None else None
        if not isinstance(w, torch.Tensor):
            raise CheckpointError(f"layer {name!r} of the checkpoint is not in this model")
        if info.get("packed"):
            if list(w.shape) != list(info["shape"]) or _dtype(w) != info["dtype"]:
                raise CheckpointError(
                    f"layer {name!r}: checkpoint weight is {tuple(info['shape'])} "
                    f"{info['dtype']}, the model's is {tuple(w.shape)} {_dtype(w)}; is this "
                    "the model that was compressed?"
                )
            writes, groups = _packed_layer(name, module, info, tensors)
            plan.extend(writes)
        else:
            t = tensors.get(info["weight"])
            if t is None:
                raise CheckpointError(
                    f"tensor {info['weight']!r} is missing from {d / manifest['tensors']}"
                )
            if list(w.shape) != list(t.shape) or w.dtype != t.dtype:
                raise CheckpointError(
                    f"layer {name!r}: checkpoint weight is {tuple(t.shape)} {t.dtype}, the "
                    f"model's is {tuple(w.shape)} {w.dtype}; is this the model that was "
                    "compressed?"
                )
            plan.append(_copy(w, t))
            groups = [GroupState.from_manifest(g, tensors) for g in info["groups"]]
        layers[name] = LayerState(plan=info["plan"], groups=groups)
    bns = _bn_modules(model)
    for name, keys in manifest["buffers"].items():
        if name not in bns:
            raise CheckpointError(f"batch norm {name!r} of the checkpoint is not in this model")
        for k in keys:
            buf = getattr(bns[name], k.rsplit(".", 1)[1], None)
            t = tensors.get(k)
            if t is None or not isinstance(buf, torch.Tensor) or buf.shape != t.shape:
                raise CheckpointError(f"buffer {k!r} is missing or has another shape")
            plan.append(_copy(buf, t))
    state = ModelState(
        recipe=manifest["recipe"],
        loaded_from=str(d),
        layers=layers,
        bn_recalibrated=bool(manifest["buffers"]),
    )
    return plan, state


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> Write:
    return lambda: dst.copy_(src.to(dst.device))


def _packed_layer(
    name: str, module: nn.Module, info: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[list[Write], list[GroupState]]:
    """The ``set_weight`` calls writing a packed layer's groups and the groups' states, after
    checking that they fit ``module``."""
    adapter = adapter_for(module)
    if adapter is None or adapter.groups != len(info["groups"]):
        raise CheckpointError(
            f"layer {name!r}: the checkpoint has {len(info['groups'])} weight group(s), the "
            f"model's {type(module).__name__} does not match; is this the model that was "
            "compressed?"
        )
    dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
    writes: list[Write] = []
    groups: list[GroupState] = []
    for g, ginfo in enumerate(info["groups"]):
        if (int(ginfo["rows"]), int(ginfo["cols"])) != (adapter.rows, adapter.cols):
            raise CheckpointError(
                f"layer {name!r} group {g}: checkpoint weight is {ginfo['rows']}x"
                f"{ginfo['cols']}, the model's {adapter.rows}x{adapter.cols}"
            )
        try:
            W, mask, scale, zero = packed_layout.unpack_group(ginfo, tensors, dtype)
        except ValueError as e:
            raise CheckpointError(f"layer {name!r} group {g}: {e}") from None
        writes.append(lambda g=g, W=W: adapter.set_weight(g, W))
        groups.append(
            GroupState(
                mask=mask,
                scale=scale,
                zero=zero,
                bits=ginfo.get("bits"),
                sym=ginfo.get("sym"),
                group_size=ginfo.get("group_size"),
            )
        )
    return writes, groups


def _legacy_report(d: Path) -> Any:
    """The report of a version-1 run (its own report.json; None when unreadable)."""
    try:
        return read_json(d / REPORT)
    except (ValueError, OSError):
        return None


def _check_all_named(d: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of a version-1 file is named by its (unsealed) manifest."""
    try:
        named = {i["weight"] for i in manifest["layers"].values()}
        named |= {
            g[part]
            for i in manifest["layers"].values()
            for g in i["groups"]
            for part in ("mask", "scale", "zero")
            if part in g
        }
        named |= {k for keys in manifest["buffers"].values() for k in keys}
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{d / MANIFEST} is malformed (edited?): {type(e).__name__}: {e}"
        ) from None
    orphans = sorted(set(tensors) - named)
    if orphans:
        raise CheckpointError(
            f"{d / MANIFEST} does not name {len(orphans)} tensor(s) of {d / TENSORS} "
            f"(e.g. {orphans[0]!r}): the manifest was edited; refusing to load a partial run"
        )
