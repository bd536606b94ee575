"""Sequential (GPTQ-style) mode: compress block by block, each block's Hessians computed from
inputs produced by the already-compressed blocks before it, holding one block's inputs at a
time.

How it runs (``sequential_compress``):

1. Probe: one full forward of the dense model on the first batch with hooks on every block
   records the order blocks run in and fingerprints (shape, sums, a weighted sum) of their
   inputs and outputs. Block ``b`` is *chained* to ``b - 1`` when its hidden input (first
   positional argument, or ``hidden_states=``) equals ``b - 1``'s first output and its other
   arguments equal ``b - 1``'s. Each block must run exactly once per forward.
2. Capture: the first block's positional + keyword inputs are stored per batch by a pre-hook
   that raises a private exception to stop the forward there.
3. For each block in run order: the targets inside it (``targets_in_block``) are compressed
   (see ``order``); then, if the next block is chained, the compressed block is run on the
   stored inputs and its outputs replace the hidden input; otherwise the next block's inputs
   are re-captured by forwards of the (partly compressed) model stopped at that block (this
   needs the calibration batches to be kept, which is done only when the probe finds a
   break, e.g. a decoder after an encoder, or per-block arguments such as T5's position
   bias).

``order`` inside a block:

* ``"sequential"`` (default, GPTQ's "true sequential"): targets are grouped in forward order,
  consecutive targets that receive the *same* input tensor (q/k/v projections) forming one
  group; each group's Hessians are collected with the earlier groups already compressed,
  then ``compress_fn`` is called for each member. Costs one block forward per group and batch
  (stopped early after the group's last layer when every target runs once per forward).
* ``"parallel"``: all targets' Hessians come from the block's inputs with the block still
  dense (one block forward per batch), then each is compressed in forward order.

Layers outside the blocks (embeddings, a head) are not visited; compress them with
``collect_hessians``. Transformers models run with ``config.use_cache = False`` here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from itertools import chain
from typing import Any

import torch
from torch import nn

from ..adapters import LayerAdapter, adapter_for, find_layers
from ..core.hessian import HessianAccumulator
from .data import (
    CalibrationError,
    Forward,
    StopForward,
    calibration_mode,
    check_inputs_option,
    empty_error,
    forward_batch,
    iter_batches,
    model_device,
    run_batch,
    to_device,
)
from .hessians import HessianHooks, as_adapter
from .targets import PairedHooks, check_dense_blocks, paired_pass

CompressFn = Callable[[str, nn.Module, list[HessianAccumulator]], None]
ORDERS = ("sequential", "parallel")
Inputs = tuple[tuple, dict]


# --------------------------------------------------------------------------------- blocks ----
def find_blocks(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """The model's blocks as ``[(name, module)]``.

    pattern: a regular expression matched (``re.fullmatch``) against qualified module names,
      e.g. ``r"encoder\\.layer\\.\\d+"``; the outermost matches are returned.
    Without a pattern: the ``nn.ModuleList`` whose items share one class and contain
    compressible layers, with the most parameters (``model.layers`` of Llama,
    ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT, ...). One list: for an
    encoder-decoder pass a pattern matching both stacks.
    """
    if pattern is not None:
        rx = re.compile(pattern)
        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if rx.fullmatch(name) and not any(name.startswith(f + ".") for f, _ in found):
                found.append((name, module))
        if not found:
            raise ValueError(f"no module name matches the block pattern {pattern!r}")
        return found
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(adapter_for(m) is not None for m in module[0].modules()):
            continue
        n = sum(p.numel() for p in module.parameters())
        if best is None or n > best[0]:
            best = (n, name, module)
    if best is None:
        raise ValueError(
            "no block list found (an nn.ModuleList of same-type blocks with compressible "
            "layers); pass a name pattern or the blocks explicitly"
        )
    _, name, lst = best
    prefix = f"{name}." if name else ""
    return [(f"{prefix}{i}", m) for i, m in enumerate(lst)]


# --------------------------------------------------------------------------- fingerprints ----
def _weights(n: int, device: torch.device) -> torch.Tensor:
    return torch.cos(torch.arange(n, device=device, dtype=torch.float64) * 0.7071 + 0.3)


def _fp(obj: Any) -> Any:
    """A cheap, comparable summary of a (nested) block argument."""
    if isinstance(obj, torch.Tensor):
        if obj.is_complex() or obj.numel() == 0:
            return ("t", tuple(obj.shape), str(obj.dtype), id(obj) if obj.numel() else 0)
        t = obj.detach().reshape(-1).double()
        s = torch.stack([t.sum(), t.abs().sum(), (t * _weights(t.numel(), t.device)).sum()])
        return ("t", tuple(obj.shape), str(obj.dtype), tuple(s.tolist()))
    if isinstance(obj, (tuple, list)):
        return ("seq", tuple(_fp(o) for o in obj))
    if isinstance(obj, Mapping):
        return ("map", tuple((k, _fp(v)) for k, v in obj.items()))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return ("v", obj)
    return ("obj", type(obj).__name__, id(obj))


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        if len(a) != len(b):
            return False
        if a and a[0] == "t" and len(a) == 4 and isinstance(a[3], tuple):
            if a[1:3] != b[1:3] or not isinstance(b[3], tuple):
                return False
            scale = 1e-9 * (1.0 + abs(a[3][1]))
            return all(
                math.isclose(x, y, rel_tol=1e-6, abs_tol=scale)
                for x, y in zip(a[3], b[3], strict=True)
            )
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _hidden_loc(args: tuple, kwargs: dict) -> Any:
    if args:
        return 0
    if "hidden_states" in kwargs:
        return "hidden_states"
    return None


def _get_hidden(inp: Inputs, loc: Any) -> Any:
    args, kwargs = inp
    return args[loc] if isinstance(loc, int) else kwargs[loc]


def _with_hidden(inp: Inputs, loc: Any, h: torch.Tensor) -> Inputs:
    args, kwargs = inp
    if isinstance(loc, int):
        return (h, *args[1:]), kwargs
    return args, {**kwargs, loc: h}


def _rest(inp: Inputs, loc: Any) -> Inputs:
    args, kwargs = inp
    if isinstance(loc, int):
        return args[1:], kwargs
    return args, {k: v for k, v in kwargs.items() if k != loc}


def _first_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and out:
        v = next(iter(out.values()))
        return v if isinstance(v, torch.Tensor) else None
    return None


# --------------------------------------------------------------------------------- passes ----
class _Probe:
    """Hooks on every block recording run order, counts and input/output fingerprints."""

    def __init__(self, blocks: list[tuple[str, nn.Module]]) -> None:
        self.blocks = blocks
        self.order: list[int] = []
        self.count = [0] * len(blocks)
        self.loc: list[Any] = [None] * len(blocks)
        self.hidden: list[Any] = [None] * len(blocks)
        self.rest: list[Any] = [None] * len(blocks)
        self.out: list[Any] = [None] * len(blocks)

    def attach(self, handles: list) -> None:
        for b, (_, block) in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(self._pre(b), with_kwargs=True))
            handles.append(block.register_forward_hook(self._post(b)))

    def _pre(self, b: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.count[b] += 1
            if self.count[b] > 1:
                return
            self.order.append(b)
            loc = _hidden_loc(args, kwargs)
            self.loc[b] = loc
            if loc is not None:
                self.hidden[b] = _fp(_get_hidden((args, kwargs), loc))
                self.rest[b] = _fp(_rest((args, kwargs), loc))

        return hook

    def _post(self, b: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if self.count[b] == 1:
                h = _first_output(out)
                self.out[b] = None if h is None else _fp(h)

        return hook

    def check(self) -> None:
        for b, (name, _) in enumerate(self.blocks):
            if self.count[b] != 1:
                raise CalibrationError(
                    f"block {name!r} ran {self.count[b]} times in one forward of calibration "
                    "batch 0; sequential mode needs every block to run exactly once"
                )

    def chained(self, prev: int, b: int) -> bool:
        """Are block b's inputs block prev's inputs with the hidden input replaced?"""
        return (
            self.loc[b] is not None
            and self.loc[b] == self.loc[prev]
            and self.out[prev] is not None
            and _same(self.hidden[b], self.out[prev])
            and _same(self.rest[b], self.rest[prev])
        )


def _capture(
    model: nn.Module,
    block: nn.Module,
    bname: str,
    i: int,
    batch: Any,
    forward: Forward | None,
    inputs: str,
    store: torch.device | str | None,
) -> Inputs:
    """Run the model on one batch until ``block`` is called; return its (args, kwargs)."""
    got: list[Inputs] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        got.append((to_device(args, store), to_device(dict(kwargs), store)))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward_batch(model, i, batch, forward, inputs)
    finally:
        handle.remove()
    if not got:
        raise CalibrationError(f"block {bname!r} was not called in calibration batch {i}", i)
    return got[0]


def _recapture(model: nn.Module, block: nn.Module, bname: str, batches: list, *rest) -> list:
    """``_capture`` of ``block``'s inputs for every batch (``rest``: forward, inputs, store)."""
    return [_capture(model, block, bname, i, b, *rest) for i, b in enumerate(batches)]


def _run_block(
    block: nn.Module, bname: str, i: int, inp: Inputs, device: torch.device | None
) -> Any:
    """``block``'s output on stored input ``i`` (None when a hook stopped it); a failure is a
    ``CalibrationError`` naming the batch and the block."""
    args, kwargs = to_device(inp, device) if device is not None else inp
    out: list[Any] = []
    run_batch(i, lambda: out.append(block(*args, **kwargs)), where=f"in block {bname!r}")
    return out[0] if out else None


def _layer_groups(
    block: nn.Module,
    bname: str,
    adapters: dict[str, LayerAdapter],
    sample: Inputs,
    device: torch.device | None,
    order: str,
) -> tuple[list[list[str]], bool]:
    """Targets in forward order, grouped by shared input; and whether each runs once."""
    seen: list[tuple[str, torch.Tensor]] = []
    counts = dict.fromkeys(adapters, 0)
    handles = []

    def make(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            counts[name] += 1
            if counts[name] == 1:
                seen.append((name, args[0] if args else next(iter(kwargs.values()), None)))

        return hook

    try:
        for n, a in adapters.items():
            handles.append(a.module.register_forward_pre_hook(make(n), with_kwargs=True))
        _run_block(block, bname, 0, sample, device)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, c in counts.items() if c == 0]
    if missing:
        raise CalibrationError(
            f"layer(s) {missing} of block {bname!r} were not called when the block ran on "
            "calibration batch 0 (functional use of the weight or an unused branch)"
        )
    names = [n for n, _ in seen]
    if order == "parallel":
        groups = [names]
    else:
        groups = []
        for k, (n, x) in enumerate(seen):
            if groups and x is seen[k - 1][1]:
                groups[-1].append(n)
            else:
                groups.append([n])
    return groups, all(c == 1 for c in counts.values())


def sequential_compress(
    model: nn.Module,
    calibration: Any,
    blocks: list[tuple[str, nn.Module]] | None,
    targets_in_block: Callable[[nn.Module], Mapping[str, nn.Module]] | None,
    compress_fn: CompressFn,
    *,
    order: str = "sequential",
    forward: Forward | None = None,
    inputs: str = "all",
    store_device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    dense: nn.Module | None = None,
) -> list[str]:
    """Compress ``model`` block by block from calibration data (see the module docstring).

    blocks: ``[(name, block)]`` (e.g. ``find_blocks(model)``; None: ``find_blocks(model)``);
      processed in the order they run.
    targets_in_block: ``block -> {local name: module}`` (None: ``find_layers(block)[0]``).
    compress_fn: ``compress_fn(name, module, hessians)`` with ``name`` the qualified name in
      ``model`` and ``hessians`` one ``HessianAccumulator`` per group; it must write the
      compressed weight into ``module`` (e.g. via ``adapter_for(module).set_weight``).
    order: ``"sequential"`` | ``"parallel"`` inside a block.
    calibration / forward / inputs: the batch convention of ``optbrain.pipeline.data``.
    store_device: where the stored block inputs live between blocks (e.g. ``"cpu"`` to save
      accelerator memory; default: where they were produced).
    dtype: accumulation dtype of the Hessians.
    dense: a dense copy of ``model`` (same names; ``pipeline.targets``) for dense targets: its
      blocks run beside the compressed ones and ``compress_fn`` gets ``CrossAccumulator``s.

    Returns the qualified names of the compressed layers in the order compressed. The model
    runs in eval mode under ``torch.no_grad``; modes and ``config.use_cache`` are restored and
    hooks removed also on errors.
    """
    check_inputs_option(inputs)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    blocks = find_blocks(model) if blocks is None else list(blocks)
    if not blocks:
        raise ValueError("no blocks given")
    for bn, blk in blocks:
        for bn2, blk2 in blocks:
            if blk2 is not blk and any(m is blk for m in blk2.modules()):
                raise ValueError(f"block {bn!r} is inside block {bn2!r}")
    if targets_in_block is None:

        def targets_in_block(block: nn.Module) -> Mapping[str, nn.Module]:
            return find_layers(block)[0]

    dev = model_device(model)
    done: list[str] = []
    if dense is not None:
        check_dense_blocks(model, blocks)
    with calibration_mode(model) as handles, calibration_mode(dense or nn.Module()):
        blocks, links, cur, batches = _start(
            model, calibration, blocks, handles, forward, inputs, store_device
        )
        dcur = None if dense is None else list(cur)  # nothing compressed yet: same inputs
        for k, (bname, block) in enumerate(blocks):
            bdev = next((t.device for t in chain(block.parameters(), block.buffers())), dev)
            dblock = None if dense is None else dense.get_submodule(bname)
            if cur is None:  # not chained to the previous block: re-capture
                cur = _recapture(model, block, bname, batches, forward, inputs, store_device)
                if dense is not None:
                    dcur = _recapture(dense, dblock, bname, batches, forward, inputs, store_device)
            adapters = {
                n: as_adapter(f"{bname}.{n}", m) for n, m in targets_in_block(block).items()
            }
            if adapters:
                groups, once = _layer_groups(block, bname, adapters, cur[0], bdev, order)
                for group in groups:
                    stop, sub = (group[-1] if once else None), {n: adapters[n] for n in group}
                    if dblock is not None:
                        hooks = PairedHooks(sub, dblock, dtype=dtype, stop_after=stop)
                        paired_pass(_run_block, (block, dblock), bname, (cur, dcur), bdev, hooks)
                    else:
                        hooks = HessianHooks(sub, dtype=dtype, stop_after=stop)
                        _block_pass(block, bname, cur, bdev, hooks)
                    for n in group:
                        compress_fn(f"{bname}.{n}", adapters[n].module, hooks.hessians[n])
                        done.append(f"{bname}.{n}")
            if k + 1 < len(blocks) and links[k + 1]:
                _advance(block, bname, cur, bdev, store_device)
                if dblock is not None:
                    _advance(dblock, bname, dcur, bdev, store_device)
            else:
                cur = dcur = None
    return done


def _start(
    model: nn.Module,
    calibration: Any,
    blocks: list[tuple[str, nn.Module]],
    handles: list,
    forward: Forward | None,
    inputs: str,
    store: torch.device | str | None,
) -> tuple[list[tuple[str, nn.Module]], list[bool], list[Inputs], list[Any] | None]:
    """Probe on batch 0, then capture the first block's inputs for every batch.

    Returns the blocks in run order, ``links[b]`` (block b chained to b - 1), the first
    block's inputs per batch, and the batches (kept only when some link is broken).
    """
    batches: list[Any] | None = []
    cur: list[Inputs] = []
    links: list[bool] = []
    for i, batch in iter_batches(calibration):
        if i == 0:
            probe = _Probe(blocks)
            probe.attach(handles)
            forward_batch(model, 0, batch, forward, inputs)
            for h in handles:
                h.remove()
            handles.clear()
            probe.check()
            ordered = probe.order
            blocks = [blocks[b] for b in ordered]
            links = [False] + [
                probe.chained(p, b) for p, b in zip(ordered[:-1], ordered[1:], strict=True)
            ]
            if all(links[1:]):
                batches = None
        if batches is not None:
            batches.append(batch)
        bname, block = blocks[0]
        cur.append(_capture(model, block, bname, i, batch, forward, inputs, store))
    if not cur:
        raise empty_error()
    return blocks, links, cur, batches


def _block_pass(
    block: nn.Module, bname: str, cur: list[Inputs], device: torch.device, hooks: HessianHooks
) -> None:
    """Run ``block`` on every stored input with ``hooks`` attached (removed afterwards)."""
    handles: list = []
    try:
        hooks.attach(handles)
        for i, inp in enumerate(cur):
            _run_block(block, bname, i, inp, device)
    finally:
        for h in handles:
            h.remove()
    hooks.check_seen(f" of block {bname!r}")


def _advance(
    block: nn.Module,
    bname: str,
    cur: list[Inputs],
    device: torch.device,
    store: torch.device | str | None,
) -> None:
    """Replace, batch by batch, the hidden input in ``cur`` by ``block``'s output."""
    loc = _hidden_loc(*cur[0])
    for i, inp in enumerate(cur):
        h = _first_output(_run_block(block, bname, i, inp, device))
        if h is None:
            raise CalibrationError(f"block {bname!r} returned no tensor output", i)
        cur[i] = _with_hidden(inp, loc, to_device(h, store))
