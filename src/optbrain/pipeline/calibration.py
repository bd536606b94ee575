"""Calibration data from a file or folder: text, JSON lines, images, tensors, a saved dataset.

``calibration_from(path, ...)`` (public as ``optbrain.calibration_from``) returns a list of
batches for ``optbrain.compress``; the CLI's ``--calibration`` uses the same loaders.

* ``.txt`` (or any other text file) and ``.jsonl`` (``text_key`` per line): the text is
  tokenized with ``tokenizer``, documents joined by a blank line, and cut into
  non-overlapping windows of ``seq_len`` tokens; ``samples`` windows are drawn with ``seed``.
* a folder of images (``.png .jpg .jpeg .bmp .gif .webp``, searched recursively): each is
  converted to RGB, resized to ``image_size`` × ``image_size``, scaled to [0, 1] and
  normalised ``(x - mean) / std`` per channel when ``mean``/``std`` are given.
* ``.npy`` / ``.safetensors``: rows of the tensor (first dimension = samples); a
  safetensors file with several tensors of the same length gives dict batches.
* a ``datasets`` folder written by ``save_to_disk``: its ``text_key`` column as text, or its
  ``image``/``img`` column as images.

A tensor batch becomes ``{key: batch}`` when ``key`` is given (``input_ids`` or
``pixel_values`` for Hugging Face models); text batches are always dicts (``input_ids``,
``attention_mask``). Every check (missing path, no images, no tokenizer, ``seq_len`` over
``max_length``, too little text) is a ``ValueError`` before anything heavy runs.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DEFAULT_SEQ_LEN = 512
DEFAULT_IMAGE_SIZE = 224


def _pick(n_items: int, samples: int, seed: int, what: str) -> torch.Tensor:
    """Indices of ``min(samples, n_items)`` distinct items in a seeded random order."""
    if n_items == 0:
        raise ValueError(f"no {what} to calibrate on")
    if samples > n_items:
        warnings.warn(
            f"calibration: asked for {samples} samples, only {n_items} {what} available; "
            f"using {n_items}",
            stacklevel=3,
        )
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_items, generator=g)[: min(samples, n_items)]


def _batches(rows: Any, batch_size: int, key: str | None) -> list[Any]:
    """``rows`` (a tensor, or a dict of tensors of one length) cut into batches."""
    n = len(next(iter(rows.values()))) if isinstance(rows, dict) else len(rows)
    out = []
    for i in range(0, n, batch_size):
        if isinstance(rows, dict):
            out.append({k: v[i : i + batch_size] for k, v in rows.items()})
        else:
            b = rows[i : i + batch_size]
            out.append({key: b} if key else b)
    return out


# ---------------------------------------------------------------------------------- text ----
def _resolve_tokenizer(tokenizer: Any, path: Path) -> Any:
    if tokenizer is None:
        raise ValueError(
            f"calibration {path} is text, which needs a tokenizer, and the model has none: "
            "save it beside the model (tokenizer.save_pretrained(MODEL_DIR)), or pass token "
            "ids as a .npy / .safetensors file"
        )
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return tokenizer


def read_jsonl(path: Path, text_key: str) -> list[str]:
    """The ``text_key`` field of every non-empty line of a JSON-lines file."""
    texts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from e
        if not isinstance(obj, dict) or text_key not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}:{i}: no key {text_key!r} (has {keys}); pass --text-key")
        texts.append(str(obj[text_key]))
    return texts


def token_windows(texts: Sequence[str], tokenizer: Any, seq_len: int, where: str) -> torch.Tensor:
    """``(n, seq_len)`` token ids: the texts joined by a blank line, cut into windows."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False)
    ids = ids["input_ids"][0]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"calibration {where}: {len(ids)} tokens, fewer than one window of --seq-len "
            f"{seq_len}; pass more text or a smaller --seq-len"
        )
    return ids[: n * seq_len].view(n, seq_len)


def text_calibration(
    texts: Sequence[str], tokenizer: Any, samples: int, seq_len: int, seed: int,
    batch_size: int, where: str,
) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Text → seeded windows → ``{"input_ids", "attention_mask"}`` batches."""
    windows = token_windows(texts, tokenizer, seq_len, where)
    rows = windows[_pick(len(windows), samples, seed, f"windows of {seq_len} tokens")]
    return _batches({"input_ids": rows, "attention_mask": torch.ones_like(rows)}, batch_size, None)


# -------------------------------------------------------------------------------- images ----
def image_files(d: Path) -> list[Path]:
    """The image files under ``d`` (recursively), sorted."""
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_tensor(
    images: Sequence[Any], size: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> torch.Tensor:
    """``(n, 3, size, size)`` float tensor from PIL images or paths: RGB, resized (bilinear),
    in [0, 1], then ``(x - mean) / std`` per channel when given."""
    import numpy as np
    from PIL import Image

    out = []
    for im in images:
        if isinstance(im, (str, Path)):
            with Image.open(im) as f:
                im = f.convert("RGB")
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1))
    x = torch.stack(out) / 255.0
    if mean is not None:
        x = x - torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    if std is not None:
        x = x / torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x


# ----------------------------------------------------------------------------- tensors ----
def read_tensors(path: Path) -> Any:
    """A tensor (``.npy``, or a one-tensor ``.safetensors``) or a dict of same-length tensors."""
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False))
    from safetensors.torch import load_file

    d = load_file(str(path))
    if not d:
        raise ValueError(f"calibration {path}: the safetensors file holds no tensor")
    lengths = {k: len(v) for k, v in d.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"calibration {path}: tensors of different lengths {lengths}")
    return next(iter(d.values())) if len(d) == 1 else d


# ------------------------------------------------------------------------------- public ----
def calibration_from(
    path: str | Path,
    *,
    tokenizer: Any = None,
    samples: int = 128,
    seq_len: int | None = None,
    seed: int = 0,
    text_key: str = "text",
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 8,
    key: str | None = None,
    max_length: int | None = None,
) -> list[Any]:
    """Calibration batches read from ``path`` (see the module docstring for the formats).

    tokenizer: a tokenizer or the directory holding one (text only). seq_len: tokens per
    window (default ``min(512, max_length)``), at most ``max_length`` (the model's context).
    key: pass tensor batches as ``{key: batch}``. Returns a list of batches holding at most
    ``samples`` samples.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"calibration {p}: no such file or directory")
    if samples < 1 or batch_size < 1:
        raise ValueError(f"--samples and batch size must be >= 1, got {samples}, {batch_size}")
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    if seq_len is not None and max_length is not None and seq_len > max_length:
        raise ValueError(
            f"--seq-len {seq_len} is longer than the model's context ({max_length} tokens)"
        )
    L = seq_len or min(DEFAULT_SEQ_LEN, max_length or DEFAULT_SEQ_LEN)
    size = image_size or DEFAULT_IMAGE_SIZE

    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        return _from_dataset(p, tokenizer, samples, L, seed, text_key, size, mean, std,
                             batch_size, key)  # fmt: skip
    if p.is_dir():
        files = image_files(p)
        if not files:
            raise ValueError(
                f"calibration {p}: a folder with no images ({' '.join(IMAGE_SUFFIXES)}) and "
                "not a datasets save_to_disk folder"
            )
        chosen = [files[int(i)] for i in _pick(len(files), samples, seed, "images")]
        return _batches(image_tensor(chosen, size, mean, std), batch_size, key)
    if p.suffix in (".npy", ".safetensors"):
        t = read_tensors(p)
        n = len(next(iter(t.values()))) if isinstance(t, dict) else len(t)
        idx = _pick(n, samples, seed, "rows")
        rows = {k: v[idx] for k, v in t.items()} if isinstance(t, dict) else t[idx]
        return _batches(rows, batch_size, key)
    tok = _resolve_tokenizer(tokenizer, p)
    if p.suffix == ".jsonl":
        texts = read_jsonl(p, text_key)
    else:
        try:
            texts = [p.read_text()]
        except UnicodeDecodeError as e:
            raise ValueError(f"calibration {p}: not a text file (nor .npy/.safetensors)") from e
    return text_calibration(texts, tok, samples, L, seed, batch_size, str(p))


def _from_dataset(
    p: Path, tokenizer: Any, samples: int, seq_len: int, seed: int, text_key: str,
    size: int, mean: Any, std: Any, batch_size: int, key: str | None,
) -> list[Any]:  # fmt: skip
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"calibration {p} is a datasets folder: pip install datasets") from e
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    cols = list(ds.column_names)
    if text_key in cols:
        tok = _resolve_tokenizer(tokenizer, p)
        return text_calibration(list(ds[text_key]), tok, samples, seq_len, seed, batch_size,
                                str(p))  # fmt: skip
    img = next((c for c in ("image", "img", "pixel_values") if c in cols), None)
    if img is None:
        raise ValueError(
            f"calibration {p}: dataset columns {cols} hold no {text_key!r} text column "
            "(pass --text-key) and no 'image' column"
        )
    idx = _pick(len(ds), samples, seed, "dataset rows")
    images = [ds[int(i)][img] for i in idx]
    return _batches(image_tensor(images, size, mean, std), batch_size, key)
