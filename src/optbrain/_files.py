"""Shared file I/O: atomic writes, canonical JSON, sealed (self-hashed) records, safetensors
bytes with a sorted header, and the clean-up of a killed writer's temporary files.

Every file optbrain writes (run directories, budget databases, reports, exports) goes through
``atomic_write``: the bytes go to a temporary file in the same directory, are fsync'ed, and the
file is renamed over the destination (``os.replace``, atomic on POSIX), then the directory is
fsync'ed. A reader therefore sees the old file or the new one, never a mix. A writer killed
half-way leaves only ``*.optbrain-tmp`` files, which no reader opens and the next writer into
that directory deletes (``clean_stale``).

A *sealed* JSON record carries ``"sha256"`` of its own canonical bytes (sorted keys, no
whitespace, with the ``sha256`` field removed); ``unseal`` verifies it, so an edited record
(``layers={}``, a changed ``nnz``) is refused instead of trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

TMP_SUFFIX = ".optbrain-tmp"
SEAL = "sha256_self"

__all__ = [
    "SEAL",
    "CheckpointError",
    "TMP_SUFFIX",
    "UnsealError",
    "atomic_json",
    "atomic_write",
    "batches_sha256",
    "canonical_json",
    "clean_stale",
    "read_json",
    "safetensors_bytes",
    "seal",
    "sha256_bytes",
    "sha256_file",
    "state_sha256",
    "tensor_bytes",
    "unseal",
    "update_hash",
]


class CheckpointError(ValueError):
    """A file optbrain wrote (run directory, budget database) that is missing, truncated,
    tampered with or does not fit the model."""


class UnsealError(ValueError):
    """A sealed record whose bytes no longer match its own hash (edited or damaged)."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # some file systems / platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> str:
    """Write ``data`` to ``path`` atomically (temp file beside it, fsync, rename, fsync of the
    directory); returns the SHA-256 of the bytes written. ``str`` is written as UTF-8."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return sha256_bytes(raw)


def clean_stale(directory: str | Path, older_than: float = 0.0) -> list[Path]:
    """Delete the temporary files a killed writer left in ``directory`` (not recursive);
    only those at least ``older_than`` seconds old. Returns what was deleted."""
    d = Path(directory)
    gone = []
    if not d.is_dir():
        return gone
    now = time.time()
    for p in d.glob(f".*{TMP_SUFFIX}"):
        try:
            if now - p.stat().st_mtime >= older_than:
                p.unlink()
                gone.append(p)
        except OSError:  # another cleaner was faster
            pass
    return gone


def canonical_json(data: Any) -> bytes:
    """The canonical bytes of ``data``: sorted keys, no whitespace, no NaN, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def atomic_json(path: str | Path, data: Any) -> str:
    """``data`` as indented JSON with sorted keys (reproducible bytes), written atomically."""
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write(path, text)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; any failure (not UTF-8, malformed, nested too deep) is a
    ``ValueError`` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (damaged?): {e}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a file optbrain wrote") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (truncated or edited?): {e}") from None


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` plus ``SEAL``: the SHA-256 of its canonical JSON without that field."""
    body = {k: v for k, v in record.items() if k != SEAL}
    return {**body, SEAL: sha256_bytes(canonical_json(body))}


def unseal(record: Any, where: str) -> dict[str, Any]:
    """``record`` after checking its seal; ``UnsealError`` naming ``where`` otherwise."""
    if not isinstance(record, dict) or not isinstance(record.get(SEAL), str):
        raise UnsealError(f"{where} carries no {SEAL!r} hash (edited, or not written by optbrain)")
    body = {k: v for k, v in record.items() if k != SEAL}
    try:
        digest = sha256_bytes(canonical_json(body))
    except (TypeError, ValueError, RecursionError) as e:
        raise UnsealError(f"{where} cannot be re-serialised: {e}") from None
    if digest != record[SEAL]:
        raise UnsealError(f"{where} does not match its own hash ({SEAL}); it was edited or damaged")
    return body


def safetensors_bytes(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """The safetensors file of ``tensors`` with its JSON header in sorted key order, so the
    same tensors and metadata always give the same bytes (``safetensors.torch.save`` writes
    its metadata in hash-map order). Loads with ``safetensors.torch.load_file``."""
    from safetensors.torch import save

    raw = save({k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)})
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # the data section stays 8-byte aligned
    return len(hb).to_bytes(8, "little") + hb + raw[8 + n :]


# ----------------------------------------------------------------------- hashing tensors ----
def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (CPU, contiguous, flattened; b"" when empty): what a fingerprint
    hashes, beside its name, dtype and shape."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def update_hash(h: Any, obj: Any) -> None:
    """Feed ``obj`` into ``hashlib`` object ``h``: tensors and numpy arrays by dtype, shape and
    bytes; mappings by key (in order), tuples / lists by length and item, dataclasses by field;
    anything else by ``repr`` (numbers, strings, None)."""
    if isinstance(obj, torch.Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(tensor_bytes(obj))
    elif type(obj).__module__ == "numpy" and hasattr(obj, "tobytes"):  # ndarray / scalar
        import numpy as np

        arr = np.ascontiguousarray(obj)
        h.update(f"N{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"D{type(obj).__qualname__}".encode())
        for f in dataclasses.fields(obj):
            h.update(f"K{f.name!r}".encode())
            update_hash(h, getattr(obj, f.name))
    elif isinstance(obj, Mapping):
        for k in obj:
            h.update(f"K{k!r}".encode())
            update_hash(h, obj[k])
    elif isinstance(obj, (tuple, list)):
        h.update(f"L{len(obj)}".encode())
        for o in obj:
            update_hash(h, o)
    else:
        h.update(f"V{obj!r}".encode())


def state_sha256(module: torch.nn.Module) -> str:
    """Hex SHA-256 of a module's ``state_dict`` (name, dtype, shape and bytes of each tensor,
    in order): its weights and buffers, for a fingerprint."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def batches_sha256(batches: Any) -> str:
    """Hex SHA-256 of calibration batches (``update_hash`` of each, in order)."""
    h = hashlib.sha256()
    for b in batches:
        update_hash(h, b)
    return h.hexdigest()
