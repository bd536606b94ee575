"""Compressing and evaluating your own model (``optbrain compress/eval --model DIR|mod:fn``).

``calibration_for(loaded, path, ...)``: ``optbrain.calibration_from`` with the model's
tokenizer, context length, input keyword and image normalisation. ``obc_warnings``: the
layers the cost model puts over the time budget under ``--method obc``. ``compress_own``
writes a run directory; ``evaluate_own`` measures dense and compressed: perplexity (causal
LMs on text), accuracy (an image folder with class subfolders) and, for anything, top-1
agreement, KL(dense ‖ compressed) and the relative output error against the dense model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import atomic_write
from ..pipeline.calibration import DEFAULT_IMAGE_SIZE, calibration_from, image_files, image_tensor
from ..pipeline.data import model_device, to_device
from ..pipeline.progress import phase
from .sources import LoadedModel


def image_options(loaded: LoadedModel, image_size: int | None) -> dict[str, Any]:
    """``image_size``, ``mean`` and ``std`` from the flags, else the preprocessor config."""
    pre = loaded.preprocessor
    size = image_size
    if size is None:
        s = pre.get("crop_size") or pre.get("size")
        if isinstance(s, dict):
            s = s.get("height") or s.get("shortest_edge")
        size = int(s) if isinstance(s, (int, float)) else None
    return {"image_size": size, "mean": pre.get("image_mean"), "std": pre.get("image_std")}


def calibration_for(
    loaded: LoadedModel, path: str | Path, *, samples: int = 128, seq_len: int | None = None,
    seed: int = 0, text_key: str = "text", image_size: int | None = None, batch_size: int = 8,
) -> list[Any]:  # fmt: skip
    """Calibration batches for ``loaded`` read from ``path`` (see ``calibration_from``)."""
    return calibration_from(
        path,
        tokenizer=loaded.tokenizer,
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        text_key=text_key,
        batch_size=batch_size,
        key=loaded.input_key,
        max_length=loaded.max_length,
        **image_options(loaded, image_size),
    )


def obc_warnings(model: nn.Module, recipe: Any) -> list[str]:
    """One line per layer whose ``method="obc"`` solve the cost model predicts over
    ``auto``'s per-layer budget, with the solver ``auto`` would run instead."""
    from ..core.methods.auto import DEFAULT_BUDGET, predicted_seconds
    from ..core.spec import make_spec
    from ..pipeline.compress import layer_kwargs, plan_layers

    plans, adapters, _ = plan_layers(model, recipe)
    lines = []
    for name, plan in plans.items():
        if plan.method != "obc":
            continue
        a = adapters[name]
        spec = make_spec(a.cols, **layer_kwargs(model, a, plan))
        est = predicted_seconds("obc", a.rows, a.cols, spec)  # None: structured OBS, cheap
        secs = 0.0 if est is None else est * a.groups
        if secs > DEFAULT_BUDGET:
            alt = "sparsegpt" if spec.prunes else "gptq"
            lines.append(
                f"warning: {name} ({a.rows}x{a.cols}): exact OBC predicted ~{secs:.0f} s "
                f"(cost model; budget {DEFAULT_BUDGET:.0f} s per layer); --method auto would "
                f"run {alt} here"
            )
    return lines


def compress_own(
    loaded: LoadedModel,
    batches: list[Any],
    recipe: Any,
    out: Path,
    *,
    quiet: bool = False,
    executor: Any = None,
    source: dict[str, Any] | None = None,
) -> Any:
    """Compress ``loaded.model`` in place on ``batches``; write the run directory ``out``
    (checkpoint, ``report.html``, ``recipe.yaml``, ``source.json``: the model's kind, name and
    task, plus ``source`` — where it is, ``{"model": DIR or module:factory, "weights": ...}``,
    read by ``optbrain export``). Channels / heads are then
    removed for real (``optbrain.shrink``, as for a zoo model; ``metadata["shrink"]``).
    Returns the report."""
    from ..api import compress, shrink
    from ..io import save
    from ..pipeline.journal import discard
    from ..pipeline.shrink import structured_layers
    from .runs import JOURNAL, RUN_FILES

    t0 = time.perf_counter()
    report = compress(
        loaded.model, batches, recipe, quiet=quiet, name=loaded.name, executor=executor,
        journal=out / JOURNAL,
    )  # fmt: skip
    journal = report.metadata.pop("journal", None)  # discarded once the run is saved
    if structured_layers(loaded.model):  # channels / heads: remove them for real
        report.metadata["shrink"] = shrink(loaded.model, batches[0]).to_dict()
    report.metadata["compress_seconds"] = time.perf_counter() - t0
    loaded.model.__dict__["_optbrain"]["report"] = report.to_dict()
    save(loaded.model, out)
    src = {"kind": loaded.kind, "name": loaded.name, "task": loaded.task, **(source or {})}
    written = {
        "report.html": report.to_html(),
        "recipe.yaml": recipe.to_yaml(),
        "source.json": json.dumps(src, indent=1),
    }
    for fname, text in written.items():
        atomic_write(out / fname, text)
    for fname in RUN_FILES - set(written):  # an earlier run's files in a reused --out
        (out / fname).unlink(missing_ok=True)
    if journal is not None:
        discard(journal)
    return report


# ----------------------------------------------------------------------------- metrics ----
def _output(out: Any) -> torch.Tensor:
    """The tensor to compare: ``.logits``, else ``.last_hidden_state``, else the first."""
    for attr in ("logits", "last_hidden_state"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, (tuple, list)):
        return _output(out[0])
    if isinstance(out, dict):
        return _output(next(iter(out.values())))
    return out


def _call(model: nn.Module, batch: Any) -> torch.Tensor:
    b = to_device(batch, model_device(model))
    if isinstance(b, dict):
        return _output(model(**b)).float()
    if isinstance(b, (tuple, list)):
        return _output(model(*b)).float()
    return _output(model(b)).float()


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Σ next-token negative log-likelihood and the token count of one batch."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = ids[:, 1:].to(lp.device)
    return float(-lp.gather(-1, tgt.unsqueeze(-1)).sum()), tgt.numel()


@torch.no_grad()
def compare(
    dense: nn.Module,
    comp: nn.Module,
    batches: list[Any],
    *,
    labels: list[torch.Tensor] | None = None,
    perplexity: bool = False,
) -> dict[str, dict[str, float]]:
    """``{metric: {"dense": x, "compressed": y}}`` on ``batches``. Always ``agreement``
    (same top-1 over the last dimension), ``kl`` (mean KL(dense ‖ compressed) of the softmax
    over the last dimension) and ``rel_error`` (‖y_c − y_d‖² / ‖y_d‖²), whose dense values
    are 1, 0 and 0; ``accuracy`` with ``labels``, ``perplexity`` (causal LM, batches with
    ``input_ids``)."""
    sums = {"agree": 0.0, "n": 0, "kl": 0.0, "err": 0.0, "ref": 0.0}
    nll = {"dense": 0.0, "compressed": 0.0}
    tokens = 0
    correct = {"dense": 0, "compressed": 0}
    progress = phase(len(batches), "eval")  # as chatty as the caller's reporting level
    try:
        for i, b in enumerate(batches):
            yd, yc = _call(dense, b), _call(comp, b)
            pd, pc = yd.argmax(-1), yc.argmax(-1)
            sums["agree"] += float((pd == pc).sum())
            sums["n"] += pd.numel()
            ld, lc = torch.log_softmax(yd, -1), torch.log_softmax(yc, -1)
            sums["kl"] += float((ld.exp() * (ld - lc)).sum())
            sums["err"] += float((yc - yd).pow(2).sum())
            sums["ref"] += float(yd.pow(2).sum())
            if labels is not None:
                y = labels[i].to(pd.device)
                correct["dense"] += int((pd == y).sum())
                correct["compressed"] += int((pc == y).sum())
            if perplexity:
                ids = b["input_ids"]
                nd, t = _nll(yd, ids)
                nc, _ = _nll(yc, ids)
                nll["dense"] += nd
                nll["compressed"] += nc
                tokens += t
            progress.update(f"batch {i + 1}")
    finally:
        progress.close()
    n = max(sums["n"], 1)
    m: dict[str, dict[str, float]] = {
        "agreement": {"dense": 1.0, "compressed": sums["agree"] / n},
        "kl": {"dense": 0.0, "compressed": sums["kl"] / n},
        "rel_error": {"dense": 0.0, "compressed": sums["err"] / max(sums["ref"], 1e-30)},
    }
    if labels is not None:
        total = sum(len(y) for y in labels)
        m["accuracy"] = {k: v / total for k, v in correct.items()}
    if perplexity and tokens:
        m["perplexity"] = {k: math.exp(v / tokens) for k, v in nll.items()}
    return m


def class_folders(d: Path) -> list[tuple[str, list[Path]]]:
    """``[(class name, image files)]`` of the subfolders of ``d`` holding images, sorted;
    empty when ``d`` has no such subfolders (then it is not a labelled folder)."""
    out = []
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):
        files = image_files(sub)
        if files:
            out.append((sub.name, files))
    return out


def _label_index(loaded: LoadedModel, names: list[str]) -> list[int]:
    """Output index per class folder: by the model's ``id2label`` when it names every folder,
    else the sorted folder order (as torchvision's ImageFolder)."""
    id2label = getattr(getattr(loaded.model, "config", None), "id2label", None) or {}
    by_name = {str(v): int(k) for k, v in id2label.items()}
    if names and all(n in by_name for n in names):
        return [by_name[n] for n in names]
    return list(range(len(names)))


def labelled_images(
    loaded: LoadedModel, d: Path, image_size: int | None, limit: int | None, batch_size: int = 16
) -> tuple[list[Any], list[torch.Tensor]] | None:
    """Batches and labels of an image folder with class subfolders (None when it has none)."""
    classes = class_folders(d)
    if len(classes) < 2:
        return None
    idx = _label_index(loaded, [c for c, _ in classes])
    items = [(f, idx[k]) for k, (_, files) in enumerate(classes) for f in files]
    g = torch.Generator().manual_seed(0)
    items = [items[int(i)] for i in torch.randperm(len(items), generator=g)][:limit]
    opts = image_options(loaded, image_size)
    size = opts["image_size"] or DEFAULT_IMAGE_SIZE
    batches, labels = [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        x = image_tensor([f for f, _ in chunk], size, opts["mean"], opts["std"])
        batches.append({loaded.input_key: x} if loaded.input_key else x)
        labels.append(torch.tensor([y for _, y in chunk]))
    return batches, labels


def evaluate_own(
    loaded: LoadedModel, run: str | Path | None, data: str | Path, *, limit: int | None = None,
    seq_len: int | None = None, text_key: str = "text", image_size: int | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Dense vs compressed (``run``; without it, dense against itself) on ``data``; progress
    as the caller's ``optbrain.pipeline.progress.reporting`` level says."""
    from ..io import load

    p = Path(data).expanduser()
    labelled = labelled_images(loaded, p, image_size, limit) if p.is_dir() else None
    if labelled is not None:
        batches, labels = labelled
    else:
        import warnings

        labels = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "only N windows": eval takes them all
            batches = calibration_for(
                loaded, p, samples=limit or 10**9, seq_len=seq_len, text_key=text_key,
                image_size=image_size, batch_size=4,
            )  # fmt: skip
    dense = loaded.model
    comp = load(copy.deepcopy(dense), run) if run else dense
    perplexity = loaded.task == "causal-lm" and isinstance(batches[0], dict)
    perplexity = perplexity and "input_ids" in batches[0]
    return compare(dense, comp, batches, labels=labels, perplexity=perplexity)
