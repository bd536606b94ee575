"""Where ``shrink`` can remove a layer's input channels on its own (the budget's channel levels).

``channel_sites(model, example_inputs)`` asks torch-pruning's dependency graph (the one
``shrink`` uses, ``pipeline/shrink.py``) for the pruning group of each Linear / Conv layer's
input channel and accepts the layer only when removing ANY subset of its input channels
touches no other layer's input: one consumer, only per-channel operations between it and its
producers (``shrink``'s own rule, ``_item_problem``), one producer channel per input channel.
A depthwise convolution between them is one of the producers (EfficientNet / MobileNet: the
project conv's input channels are the depthwise conv's channels and the expand conv's rows).
HF ``Conv1D`` layers (GPT-2, shrunk by hand in ``shrink_conv1d``) are not offered.

``tied_groups(model, example_inputs)``: the channel sets tied by a residual add (or any other
tensor read by several layers): every Linear / Conv reading them (the consumers) and every
layer writing them (the producers). ``shrink`` removes such a channel when ALL consumers read
it through zero weights; the group solver (``core/structured_group.py``) zeroes it in all of
them at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .shrink import _graph, _in_fn
from .shrink_rules import _is_linear_matmul, _item_problem, conv_spatial, is_depthwise

__all__ = ["PRODUCERS", "TiedGroup", "channel_sites", "tied_groups"]


def channel_sites(model: nn.Module, example_inputs: Any) -> dict[str, list[str] | str]:
    """Which Linear / Conv layers can have input channels removed ON THEIR OWN by ``shrink``.

    Per layer: the names of the producers (Linear / Conv / Embedding modules whose output
    channels go with its input channels, one for one) when removing any subset of its input
    channels is honoured by ``shrink`` without touching another layer's weights, else the
    reason why not (a str): a grouped convolution, another consumer of the same tensor (a
    residual add or a shared input tie them), an operation that mixes channels (as
    ``plan_channels``), no producer (the model's input), or channels that do not map one to
    one onto the producers' (a flatten / reshape between them). The budget's channel levels
    are offered only to the layers with producers.
    """
    names = {id(m): n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    try:
        dg = _graph(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - torch-pruning cannot trace this model
        why = f"the dependency graph could not be traced ({type(e).__name__}: {e})"
        return {n: why for n, m in model.named_modules() if _in_fn(m) is not None}
    finally:
        model.train(was_training)
    out: dict[str, list[str] | str] = {}
    for name, module in model.named_modules():
        fn = _in_fn(module)
        if fn is None:
            continue
        out[name] = _site(dg, module, fn, names)
    return out


#: modules whose output channels (rows) go with a consumer's removed input channels
PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _site(dg: Any, module: nn.Module, fn: Any, names: dict[int, str]) -> list[str] | str:
    if getattr(module, "groups", 1) > 1:
        return f"grouped convolution (groups={module.groups})"
    producers: list[nn.Module] = []
    group = dg.get_pruning_group(module, fn, idxs=[0])
    spatial = conv_spatial(group)
    for item in group.items:
        target = item.dep.target.module
        handler = getattr(item.dep.handler, "__name__", "")
        problem = _item_problem(target, handler, item.dep.target.grad_fn, spatial)
        if problem is not None and not _is_linear_matmul(item.dep):
            return problem
        if handler == "prune_in_channels" and isinstance(target, nn.Linear | nn.Conv1d | nn.Conv2d):
            if is_depthwise(target):
                continue  # its output channel c reads only input c: it shrinks with them
            if target is not module:
                return f"its input is also read by {names.get(id(target), '?')} (tied channels)"
            continue
        if len(item.idxs) != 1:
            return "its input channels do not map one to one onto the producer's (a reshape)"
        if handler == "prune_out_channels" and isinstance(target, PRODUCERS):
            producers.append(target)
    if all(is_depthwise(m) for m in producers):
        return "no producer layer: its input channels are the model's input"
    return [names.get(id(m), "?") for m in producers]


@dataclass
class TiedGroup:
    """A channel set read by several layers: ``consumers`` (Linear / Conv names, module order)
    with ``index[name][c]`` the input channel of that consumer holding group channel ``c``
    (``c`` counts the first consumer's input channels), ``producers`` (the layers whose output
    rows go with them), ``channels`` (n). ``reason``: why ``shrink`` cannot remove them
    (None: it can)."""

    consumers: list[str]
    producers: list[str]
    channels: int
    index: dict[str, list[int]] = field(default_factory=dict)
    reason: str | None = None

    @property
    def name(self) -> str:
        """``"tied:" + the consumers joined by "+"`` (the key of the group's database unit)."""
        return "tied:" + "+".join(self.consumers)


def tied_groups(model: nn.Module, example_inputs: Any) -> list[TiedGroup]:
    """Every tied channel set of ``model`` (two or more consumers), in module order.

    Traced with torch-pruning's dependency graph (``shrink``'s). A group is refused (its
    ``reason`` set) with a member that is not known to act per channel (``_item_problem``),
    a depthwise or grouped convolution in it, channels that do not map one to one (a flatten),
    or no producer layer (the model's input). Raises what the tracer raises.
    """
    names = {id(m): n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    was_training = model.training
    model.eval()
    try:
        dg = _graph(model, example_inputs)
    finally:
        model.train(was_training)
    out: list[TiedGroup] = []
    seen: set[str] = set()
    for name, module in model.named_modules():
        fn = _in_fn(module)
        if fn is None or name in seen or getattr(module, "groups", 1) > 1:
            continue
        n = module.weight.shape[1]
        grp = _tied(dg, module, fn, n, names)
        seen.update(grp.consumers)
        if len(grp.consumers) > 1:
            grp.consumers.sort(key=order.__getitem__)
            grp.producers.sort(key=order.__getitem__)
            out.append(grp)
    return out


def _tied(dg: Any, module: nn.Module, fn: Any, n: int, names: dict[int, str]) -> TiedGroup:
    group = dg.get_pruning_group(module, fn, idxs=list(range(n)))
    spatial = conv_spatial(group)
    consumers, producers, index, reason = [], [], {}, None
    for item in group.items:
        target = item.dep.target.module
        handler = getattr(item.dep.handler, "__name__", "")
        problem = _item_problem(target, handler, item.dep.target.grad_fn, spatial)
        if problem is not None and not _is_linear_matmul(item.dep):
            reason = reason or problem
        if len(item.idxs) != n or sorted(int(r) for r in item.root_idxs) != list(range(n)):
            reason = reason or "the channels do not map one to one onto each layer's (a reshape)"
        tname = names.get(id(target), "?")
        if isinstance(target, nn.Linear | nn.Conv1d | nn.Conv2d) and is_depthwise(target):
            reason = reason or f"depthwise convolution {tname} in the tied group"
        elif handler == "prune_in_channels" and isinstance(
            target, nn.Linear | nn.Conv1d | nn.Conv2d
        ):
            consumers.append(tname)
            idx = [0] * n
            for root, i in zip(item.root_idxs, item.idxs, strict=True):
                idx[int(root)] = int(i)
            index[tname] = idx
        elif handler == "prune_out_channels" and isinstance(target, PRODUCERS):
            producers.append(tname)
    if not producers:
        reason = reason or "no producer layer: the channels are the model's input"
    return TiedGroup(consumers, producers, n, index, reason)
