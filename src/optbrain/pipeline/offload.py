"""Layer-by-layer offload: compress a Hugging Face causal LM larger than memory, block by block.

``compress_offloaded(source, calibration, recipe, offload)`` never holds the whole model:

1. The model is built from ``source/config.json`` with every parameter on the ``meta``
   device (``params_on_meta``: buffers such as rotary frequencies stay real, they are not in
   the checkpoint) and its blocks found (``sequential.find_blocks``: ``model.layers`` of
   Llama, ``transformer.h`` of GPT-2).
2. The tensors outside the blocks (embeddings, final norm, head) are read from the
   safetensors shards (``safe_open``, one tensor at a time), the first block's inputs are
   captured for every calibration batch (a forward stopped at block 0), and those tensors go
   back to ``meta``.
3. For each block: its tensors are read from the shards, its planned layers compressed in
   sequential order (GPTQ's "true sequential", exactly as ``sequential_compress``: the same
   groups, Hessians and solves, so the same weights as an in-memory sequential run), the
   compressed block written atomically to ``offload/blocks/NNNN.safetensors`` (+ ``.json``:
   its records), the block run on the stored inputs to give the next block's, and its
   tensors released. A killed run resumes at the next block: finished blocks are read back
   from ``offload/blocks`` (checksums verified) and only run forward.
4. ``offload/model`` is assembled as a sharded Hugging Face checkpoint (one shard per block,
   the tensors outside the blocks copied one per shard, ``model.safetensors.index.json``,
   config and tokenizer files copied): ``from_pretrained`` loads it.

In memory at any time: one block's weights, the calibration activations (one block's inputs
per batch, as the sequential mode keeps) and the Hessians of the group being solved; at the
start the tensors outside the blocks. The report's ``metadata["peak_rss_mb"]`` is the peak
resident memory of the run (``report.memory``). Layers outside the blocks (``lm_head``) are
left as they are (skip records say so); the blocks must be chained (each block's hidden input
the previous block's output, as in decoder-only LMs).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import atomic_json, atomic_write, batches_sha256, clean_stale, read_json, sha256_file
from ..adapters import planning_on_meta
from ..recipe import Recipe
from ..report import LayerRecord, Report, peak_memory_tracker
from .compress import LayerCompressor, plan_layers, skip_record, solve_layer
from .data import calibration_mode, take_samples
from .hessians import HessianHooks, as_adapter
from .progress import Progress, level, reporting
from .sequential import _advance, _block_pass, _capture, _hidden_loc, _layer_groups, find_blocks
from .state import WeightBackup

STATE = "offload.json"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")  # fmt: skip

__all__ = ["compress_offloaded", "params_on_meta", "shard_index"]


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get every parameter on the ``meta`` device (no memory, no init
    cost) while buffers are made for real (rotary frequencies, causal masks: computed from
    the config, not stored in checkpoints)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def shard_index(source: Path) -> dict[str, str]:
    """``{tensor name: shard file}`` of a safetensors checkpoint directory."""
    index = source / "model.safetensors.index.json"
    if index.is_file():
        return dict(read_json(index)["weight_map"])
    single = source / "model.safetensors"
    if not single.is_file():
        raise ValueError(
            f"{source} has no model.safetensors(.index.json): offload reads safetensors shards "
            "(save the model with save_pretrained(..., safe_serialization=True))"
        )
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


class Tensors:
    """Puts checkpoint tensors into the meta model and takes them out again (tied parameters:
    every alias gets the same tensor)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.aliases: dict[str, list[str]] = {}
        by_id: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
        for names in by_id.values():
            for n in names:
                self.aliases[n] = names

    def _set(self, name: str, t: torch.Tensor) -> None:
        for n in self.aliases.get(name, [name]):
            mod, _, attr = n.rpartition(".")
            m = self.model.get_submodule(mod)
            if attr in m._parameters:
                m._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                m._buffers[attr] = t

    def load(self, files: dict[str, list[str]], root: Path, copy: bool = False) -> None:
        """Read ``{shard file: [tensor names]}`` from ``root`` into the model. ``copy``: into
        memory of their own (weights that will be overwritten); else the tensors map the file
        (only the pages read are resident: an embedding's looked-up rows)."""
        from safetensors import safe_open

        for fname, names in files.items():
            with safe_open(str(root / fname), "pt", device="cpu") as f:
                for n in names:
                    t = f.get_tensor(n)
                    self._set(n, t.clone() if copy else t)

    def release(self, names: list[str]) -> None:
        """Put tensors ``names`` back on ``meta``."""
        for n in names:
            mod, _, attr = n.rpartition(".")
            m = self.model.get_submodule(mod)
            t = m._parameters.get(attr, m._buffers.get(attr))
            if t is not None and t.device.type != "meta":
                self._set(n, torch.empty_like(t, device="meta"))


def _by_file(names: list[str], index: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(index[n], []).append(n)
    return out


def _fingerprint(source: Path, rec: Recipe, batches: list[Any], index: dict[str, str]) -> dict:
    shards = {f: os.path.getsize(source / f) for f in sorted(set(index.values()))}
    return {"source": str(source.resolve()), "shards": shards, "recipe": rec.to_dict(),
            "calibration_sha256": batches_sha256(batches), "samples": len(batches)}  # fmt: skip


def _legacy_calibration_sha256(batches: list[Any]) -> str:
    """The calibration hash of offload directories written before ``batches_sha256`` (the
    raw bytes of each batch's tensors): such a directory still resumes."""
    h = hashlib.sha256()
    for b in batches:
        items = b.values() if isinstance(b, dict) else b if isinstance(b, tuple | list) else [b]
        for t in items:
            if isinstance(t, torch.Tensor):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_offload_dir(root: Path, fp: dict, batches: list[Any]) -> None:
    if root.exists() and not root.is_dir():
        raise ValueError(f"offload {root} is a file; pass a directory")
    if (root / STATE).is_file():
        old = read_json(root / STATE)
        stored = old.get("calibration_sha256")
        if stored != fp["calibration_sha256"] and stored == _legacy_calibration_sha256(batches):
            old = {**old, "calibration_sha256": fp["calibration_sha256"]}
        if old != json.loads(json.dumps(fp)):
            diff = sorted(k for k in fp if old.get(k) != json.loads(json.dumps(fp[k])))
            raise ValueError(
                f"offload {root} holds a run of another {' / '.join(diff)}; pass a new "
                "directory (or delete it) to start over"
            )
    elif root.is_dir() and any(root.iterdir()):
        raise ValueError(f"offload {root} is not empty and holds no offloaded run; refusing")


def compress_offloaded(
    source: str | os.PathLike,
    calibration: Any,
    recipe: Recipe | dict | str,
    offload: str | os.PathLike,
    *,
    quiet: bool = False,
    name: str | None = None,
) -> Report:
    """Compress the causal LM in directory ``source`` block by block into ``offload`` (see the
    module docstring); the compressed model is ``offload/model`` (a sharded HF checkpoint),
    the report also in ``offload/report.json``. ``recipe`` must use sequential calibration
    with compressed targets."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source, root = Path(source), Path(offload)
    rec = Recipe.coerce(recipe)
    if rec.calibration.mode != "sequential" or rec.calibration.targets != "compressed":
        raise ValueError(
            "offload compresses block by block: the recipe's calibration must be mode "
            f"'sequential' with targets 'compressed' (got {rec.calibration.mode!r}, "
            f"{rec.calibration.targets!r})"
        )
    if rec.allocation.method != "uniform":
        raise ValueError(
            f"offload takes the recipe's own per-layer settings; allocation "
            f"{rec.allocation.method!r} needs the whole dense model (run it in memory)"
        )
    if rec.refit:
        raise ValueError(
            "offload keeps one block in memory; refit: true runs a dense copy of the whole "
            "model beside it (run it in memory, or drop refit)"
        )
    if not (source / "config.json").is_file():
        raise ValueError(f"offload needs a local Hugging Face directory; {source} has no config")
    index = shard_index(source)
    batches = take_samples(calibration, rec.calibration.samples)
    fp = _fingerprint(source, rec, batches, index)
    _check_offload_dir(root, fp, batches)
    (root / "blocks").mkdir(parents=True, exist_ok=True)
    clean_stale(root / "blocks")
    atomic_json(root / STATE, fp)
    torch.manual_seed(rec.seed)
    fixed_mmap_threshold()
    t0 = time.perf_counter()
    with peak_memory_tracker("cpu") as mem:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config)
        model.eval()
        with planning_on_meta():  # shapes only: no weight is read before its block
            blocks = find_blocks(model)
            plans, adapters, records = plan_layers(model, rec)
        inside = {f"{b}.{n}" for b, blk in blocks for n, _ in blk.named_modules()}
        for n in [n for n in plans if n not in inside]:
            why = "outside the blocks: offload compresses the blocks only"
            records.append(skip_record(n, adapters.pop(n).module, why))
            del plans[n]
        progress = Progress(len(plans), "compress (offload)", enabled=not quiet)
        comp = LayerCompressor(plans, adapters, progress, model)
        comp.backup = _NoBackup()  # the dense weights stay in the source files
        try:
            with reporting("quiet" if quiet else level() or "normal"):
                _run_blocks(model, blocks, batches, comp, Tensors(model), index, source, root)
        finally:
            progress.close()
        records += _block_records(root, len(blocks))
        _assemble(source, root, index, blocks)
    report = Report.create(
        records,
        model=name or source.name,
        recipe=rec.to_dict(),
        seconds=time.perf_counter() - t0,
        calibration_batches=len(batches),
        calibration_mode="sequential",
    )
    report.metadata["offload"] = str(root)
    report.metadata["peak_rss_mb"] = mem.peak_mb
    atomic_write(root / "report.json", report.to_json())
    return report


def _stem(root: Path, k: int) -> Path:
    return root / "blocks" / f"{k:04d}"


def _done(root: Path, k: int) -> bool:
    """Is block ``k`` written whole (record present, tensors matching its checksum)?"""
    stem = _stem(root, k)
    if not (stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file()):
        return False
    return read_json(stem.with_suffix(".json"))["sha256"] == sha256_file(
        stem.with_suffix(".safetensors")
    )


def _run_blocks(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    batches: list[Any],
    comp: LayerCompressor,
    tensors: Tensors,
    index: dict[str, str],
    source: Path,
    root: Path,
) -> None:
    """Steps 2 and 3 of the module docstring."""
    prefixes = tuple(f"{b}." for b, _ in blocks)
    outside = [n for n in index if not n.startswith(prefixes)]
    with calibration_mode(model):
        tensors.load(_by_file(outside, index), source)
        bname0, block0 = blocks[0]
        cur = [
            _capture(model, block0, bname0, i, b, None, "all", None) for i, b in enumerate(batches)
        ]
        tensors.release(outside)
        if _hidden_loc(*cur[0]) is None:
            raise ValueError(f"block {bname0!r} gets no hidden input; offload cannot chain it")
        for k, (bname, block) in enumerate(blocks):
            names = [n for n in index if n.startswith(f"{bname}.")]
            stem = _stem(root, k)
            if _done(root, k):  # resumed: the compressed block, run forward only
                comp.progress.update(f"{bname} (done before)", step=_planned(comp, bname))
                tensors.load({stem.with_suffix(".safetensors").name: names}, root / "blocks")
            else:
                tensors.load(_by_file(names, index), source, copy=True)
                start = len(comp.records)
                _compress_block(block, bname, cur, comp)
                held = dict(model.named_buffers())
                held.update(model.named_parameters(remove_duplicate=False))
                _write_block(stem, {n: held[n].data for n in names}, comp.records[start:])
                del held  # else it keeps this block's weights alive through the next block
            if k + 1 < len(blocks):
                _advance(block, bname, cur, torch.device("cpu"), None)
            tensors.release(names)
            trim_heap()


class _NoBackup(WeightBackup):
    """No in-memory copy of the dense weights: offload never writes into ``source``."""

    def keep(self, weight: torch.Tensor) -> None:
        pass


def _planned(comp: LayerCompressor, bname: str) -> int:
    return sum(n.startswith(f"{bname}.") for n in comp.plans)


def _compress_block(block: nn.Module, bname: str, cur: list, comp: LayerCompressor) -> None:
    """The planned layers of one block, as ``sequential_compress`` does them (order
    ``"sequential"``, float64 Hessians)."""
    pre = f"{bname}."
    local = {n[len(pre) :]: comp.adapters[n].module for n in comp.plans if n.startswith(pre)}
    if not local:
        return
    adapters = {n: as_adapter(f"{bname}.{n}", m) for n, m in local.items()}
    dev = torch.device("cpu")
    groups, once = _layer_groups(block, bname, adapters, cur[0], dev, "sequential")
    for group in groups:
        stop, sub = (group[-1] if once else None), {n: adapters[n] for n in group}
        hooks = HessianHooks(sub, dtype=torch.float64, stop_after=stop)
        _block_pass(block, bname, cur, dev, hooks)
        trim_heap()  # the pass's activations, before the solves' buffers
        for n in group:  # as ``comp(name, module, hessians)``; H is the sum, scaled in place
            full = f"{bname}.{n}"
            accs = hooks.hessians.pop(n)
            tokens, job = accs[0].tokens, comp.job(full, accs, consume=True)
            del accs
            t0 = time.perf_counter()
            with comp.progress.within(full, comp.predicted.get(full)):
                solved = solve_layer(*job)
            del job
            comp.apply(full, adapters[n].module, tokens, solved, time.perf_counter() - t0)
            del solved
            trim_heap()


def _libc() -> Any:
    """glibc (``malloc_trim``, ``mallopt``), or False elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (an AttributeError without glibc)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a
    no-op): the solver's many mid-sized temporaries otherwise stay resident after use."""
    gc.collect()
    if _libc():
        _libc().malloc_trim(0)


#: glibc's ``M_MMAP_THRESHOLD`` and the value an offloaded run sets (bytes)
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 1 << 20


def fixed_mmap_threshold() -> bool:
    """Serve every allocation of ``MMAP_THRESHOLD`` bytes or more by its own ``mmap``, so that
    freeing it returns the memory at once. glibc otherwise raises the threshold to the size of
    the largest block freed so far (up to 32 MB), after which the solver's (rows, cols)
    temporaries come from the heap and fragment it: measured on the 2.14 GB synthetic Llama,
    the widest layer's solve grew from 327 MB in block 0 to 394 MB in block 7. Process-wide
    and not undone (glibc cannot report the old setting); an offloaded run is the memory-bound
    case it is for. Returns whether it was set (False off glibc)."""
    return bool(_libc() and _libc().mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


_LIBC: Any = None


def _write_block(stem: Path, tensors: dict, records: list[LayerRecord]) -> None:
    """Tensors, then the record naming their checksum: a block is whole or absent."""
    from safetensors.torch import save_file

    path = stem.with_suffix(".safetensors")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    body = {"sha256": sha256_file(path), "records": [r.to_dict() for r in records]}
    atomic_json(stem.with_suffix(".json"), body)


def _block_records(root: Path, n: int) -> list[LayerRecord]:
    out: list[LayerRecord] = []
    for k in range(n):
        rows = read_json(_stem(root, k).with_suffix(".json"))["records"]
        out += [LayerRecord.from_dict(d) for d in rows]
    return out


def _assemble(source: Path, root: Path, index: dict[str, str], blocks: list) -> None:
    """``root/model``: the blocks' files as shards, the tensors outside them one per shard
    (read and written one at a time), the index and the config / tokenizer files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = root / "model"
    out.mkdir(exist_ok=True)
    prefixes = tuple(f"{b}." for b, _ in blocks)
    outside = [n for n in index if not n.startswith(prefixes)]
    total = len(blocks) + len(outside)
    weight_map: dict[str, str] = {}
    for k, (bname, _) in enumerate(blocks):
        shard = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        dst = out / shard
        dst.unlink(missing_ok=True)
        try:
            os.link(_stem(root, k).with_suffix(".safetensors"), dst)  # the same file, no copy
        except OSError:  # another file system
            shutil.copyfile(_stem(root, k).with_suffix(".safetensors"), dst)
        weight_map.update({n: shard for n in index if n.startswith(f"{bname}.")})
    for j, n in enumerate(outside):
        shard = f"model-{len(blocks) + j + 1:05d}-of-{total:05d}.safetensors"
        with safe_open(str(source / index[n]), "pt", device="cpu") as f:
            t = f.get_tensor(n)
        tmp = out / f".{shard}.tmp"
        save_file({n: t}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / shard)
        del t
        weight_map[n] = shard
    atomic_json(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    for fname in COPIED:
        if (source / fname).is_file():
            shutil.copyfile(source / fname, out / fname)
