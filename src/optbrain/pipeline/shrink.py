"""Shrink a model for real: remove the channels, neurons and heads that structured masks zeroed.

``shrink(model, example_inputs)`` (public as ``optbrain.shrink``) reads what ``compress`` did
with a ``channels`` / ``heads`` pattern (the model's ``ModelState``) and removes, for each such
layer, its removed input channels AND the producers' matching output channels:

* ``heads`` on an attention output projection (HF Llama-style ``q/k/v/o_proj``, BERT-style
  ``self.query/key/value`` + ``output.dense``): the head's ``head_dim`` columns of the output
  projection and its q/k/v rows (k/v only when every query head sharing them goes: GQA), and
  the module's head count. Exact: the removed head's output was multiplied by zero columns.
* GPT-2 style models (transformers' ``Conv1D``): FFN neurons and heads by hand
  (``optbrain.pipeline.shrink_conv1d``), as torch-pruning traces neither.
* ``channels`` everywhere else, through ``torch-pruning``'s ``DependencyGraph`` (traced from a
  real forward on ``example_inputs``): the consumer's input channels, every other consumer of
  the same tensor (a residual add, a concat, a grouped conv tie them), and the producers'
  output rows, their bias and a BatchNorm between (an FFN neuron: the rows of the up and gate
  projections). A channel is removed only when EVERY consumer of it reads it through zero
  weights (so the outputs do not change); a tied group passing through a normalisation over
  channels (LayerNorm, RMSNorm's mean, softmax) or an op not known to act per channel is left
  alone. Each skipped layer is reported with its reason.

Why torch-pruning rather than ``torch.fx``: transformers models do not trace symbolically with
plain fx (data-dependent control flow), while the DependencyGraph traces the autograd graph
of a forward that runs, and already maps indices through concat / split / flatten / reshape,
BatchNorm and grouped convolutions. The head bookkeeping it leaves to the caller (its
``num_heads`` support needs a hand-written map per model), so heads are done here.

After shrinking, the outputs on ``example_inputs`` are compared with the masked model's: a
relative error over ``tol`` raises ``ShrinkCheckError``, and then, as after any failure part-way,
the model is put back as it was (``Snapshot``: the old tensors by reference, no copy). The
operations are recorded in ``ModelState.shrink`` so that ``optbrain.save`` / ``load`` can
replay them on a fresh dense model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import is_hf_conv1d
from ..core.patterns import parse_pattern
from .cost import call, count_macs, count_params
from .shrink_conv1d import (
    gpt2_attention_of,
    gpt2_ffn_of,
    prune_gpt2_ffn,
    prune_gpt2_heads,
    zero_rows,
)
from .shrink_rules import (
    _is_linear_matmul,
    _item_problem,
    conv_spatial,
    is_depthwise,
)
from .state import compressed_state


class ShrinkCheckError(RuntimeError):
    """The shrunk model's outputs differ from the masked model's by more than the tolerance
    (the model has been put back as it was)."""


@dataclass
class ShrinkReport:
    """What ``shrink`` removed: per layer the channels (heads) removed, the layers left alone
    with the reason, parameter and multiply-accumulate counts before and after (on the
    example inputs), the relative output change, and the replayable operations."""

    removed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    max_rel_error: float = 0.0
    ops: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ------------------------------------------------------------------------- model calls ----
def first_tensor(out: Any) -> torch.Tensor:
    """The main output tensor: itself, ``logits`` / ``last_hidden_state``, or the first one."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, torch.Tensor):
            return t
    items = out.values() if isinstance(out, Mapping) else out
    for t in items:
        if isinstance(t, torch.Tensor):
            return t
    raise TypeError(f"no tensor in the model's output of type {type(out).__name__}")


# ----------------------------------------------------------------------- what was zeroed ----
def structured_layers(model: nn.Module) -> dict[str, str]:
    """The layers of the model's state compressed with a ``channels`` / ``heads`` pattern, in
    module order: ``{name: "channels" | "heads"}``."""
    state = compressed_state(model)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    out = {}
    for name, entry in state.layers.items():
        pat = parse_pattern(entry.plan.get("pattern", "unstructured"))
        if pat.structured and name in order:
            out[name] = pat.kind
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))


def zero_inputs(module: nn.Module) -> list[int]:
    """Input channels (features) of a Linear / Conv / HF Conv1D read through all-zero weights."""
    if is_hf_conv1d(module):
        return zero_rows(module)
    w = module.weight.detach()
    cols = w.transpose(0, 1).reshape(w.shape[1], -1)
    return (~cols.any(1)).nonzero().flatten().tolist()


# --------------------------------------------------------------------------------- heads ----
def attention_of(model: nn.Module, name: str) -> dict[str, Any] | None:
    """The attention block whose output projection is layer ``name``: ``q, k, v, o`` modules,
    the module holding the head counts, ``head_dim`` and the query heads per k/v head; None
    for an unknown layout."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf == "o_proj" and all(hasattr(parent, a) for a in ("q_proj", "k_proj", "v_proj")):
        hd = getattr(parent, "head_dim", None)
        if not isinstance(hd, int):
            return None
        rep = int(getattr(parent, "num_key_value_groups", 1) or 1)
        return {"q": parent.q_proj, "k": parent.k_proj, "v": parent.v_proj,
                "o": parent.o_proj, "holder": parent, "head_dim": hd, "rep": rep}  # fmt: skip
    grand_name, _, mid = parent_name.rpartition(".")
    grand = model.get_submodule(grand_name) if grand_name else model
    sa = getattr(grand, "self", None)
    if leaf == "dense" and mid == "output" and sa is not None and hasattr(sa, "query"):
        hd = getattr(sa, "attention_head_size", None)
        if not isinstance(hd, int):
            return None
        return {"q": sa.query, "k": sa.key, "v": sa.value, "o": parent.dense,
                "holder": sa, "head_dim": hd, "rep": 1}  # fmt: skip
    return None


def _rows(heads: list[int], hd: int) -> list[int]:
    return [h * hd + i for h in heads for i in range(hd)]


def prune_heads(
    model: nn.Module, name: str, heads: list[int] | None, check: bool = True
) -> list[int]:
    """Remove query heads ``heads`` (None: all) of the attention whose output projection is ``name``
    (with ``check``, only those whose output columns are all zero, and under GQA only whole
    k/v groups); returns the heads removed. ValueError for an unknown attention layout."""
    import torch_pruning as tp

    att = attention_of(model, name)
    if att is None:
        raise ValueError("not an attention output projection of a known layout (q/k/v/o_proj "
                         "or BERT self.query/key/value + output.dense)")  # fmt: skip
    hd, rep, o = att["head_dim"], att["rep"], att["o"]
    if heads is None:
        heads = list(range(o.in_features // hd))
    if check:
        w = o.weight.detach()
        heads = [h for h in heads if not w[:, h * hd : (h + 1) * hd].any()]
    gone = set(heads)
    kv = sorted(
        {h // rep for h in gone if gone.issuperset(range(h // rep * rep, h // rep * rep + rep))}
    )
    heads = sorted(q for k in kv for q in range(k * rep, (k + 1) * rep))
    if not heads:
        return []
    tp.prune_linear_in_channels(o, _rows(heads, hd))
    tp.prune_linear_out_channels(att["q"], _rows(heads, hd))
    tp.prune_linear_out_channels(att["k"], _rows(kv, hd))
    tp.prune_linear_out_channels(att["v"], _rows(kv, hd))
    holder = att["holder"]
    n_q = att["q"].out_features // hd
    counts = {"num_heads": n_q, "num_attention_heads": n_q, "num_key_value_heads": n_q // rep,
              "all_head_size": n_q * hd}  # fmt: skip
    for attr, value in counts.items():
        if isinstance(getattr(holder, attr, None), int):
            setattr(holder, attr, value)
    return heads


# ------------------------------------------------------------------------------ channels ----
def _graph(model: nn.Module, inputs: Any) -> Any:
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(
        model,
        example_inputs=inputs,
        forward_fn=call,
        output_transform=first_tensor,
        verbose=False,
    )


def _in_fn(module: nn.Module) -> Any:
    import torch_pruning as tp

    if isinstance(module, nn.Linear):
        return tp.prune_linear_in_channels
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return tp.prune_conv_in_channels
    return None


def _consumer_nonzero(module: nn.Module, idxs: list[int]) -> list[bool]:
    """Per input index of a Linear / Conv consumer: whether its weights are not all zero."""
    zero = set(zero_inputs(module))
    return [i not in zero for i in idxs]


def plan_channels(dg: Any, module: nn.Module, idxs: list[int]) -> tuple[list[int], str | None]:
    """The input channels of ``module`` that can go (every consumer of each reads it through
    zero weights and the tied group has only per-channel members), or ``([], reason)``."""
    fn = _in_fn(module)
    if fn is None:
        return [], f"{type(module).__name__} has no input-channel pruner"
    group = dg.get_pruning_group(module, fn, idxs=idxs)
    producers = [
        it
        for it in group.items
        if getattr(it.dep.handler, "__name__", "") == "prune_out_channels"
        and isinstance(it.dep.target.module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Embedding)
        and not is_depthwise(it.dep.target.module)  # a depthwise conv passes them on
    ]
    if not producers:  # removing them would change the shape the model is called with
        return [], "its input channels are the model's own input (no layer produces them)"
    bad: set[int] = set()
    spatial = conv_spatial(group)
    for item in group.items:
        target = item.dep.target.module
        handler = getattr(item.dep.handler, "__name__", "")
        problem = _item_problem(target, handler, item.dep.target.grad_fn, spatial)
        if problem is not None and _is_linear_matmul(item.dep):
            problem = None  # the product a bias-free Linear runs as (its own input channels)
        if problem is not None:
            return [], problem
        if handler == "prune_in_channels" and isinstance(target, nn.Linear | nn.Conv1d | nn.Conv2d):
            if is_depthwise(target):
                continue  # depthwise: its output channels' consumers are in the group
            for root, live in zip(
                item.root_idxs, _consumer_nonzero(target, item.idxs), strict=True
            ):
                if live:
                    bad.add(int(root))
    keep = [i for i in idxs if i not in bad]
    if not keep:
        return [], "every removed channel is still read by another consumer of the same tensor"
    return keep, None


def prune_channels(dg: Any, module: nn.Module, idxs: list[int]) -> None:
    """Remove input channels ``idxs`` of ``module`` and everything tied to them."""
    dg.get_pruning_group(module, _in_fn(module), idxs=idxs).prune()


# ---------------------------------------------------------------------------------- shrink ----
def apply_ops(model: nn.Module, inputs: Any, ops: list[dict[str, Any]]) -> None:
    """Replay recorded shrink operations on ``model`` (the dense one: no zero checks)."""
    for op in ops:
        if op["kind"] == "heads":
            gpt2 = gpt2_attention_of(model, op["layer"]) is not None
            (prune_gpt2_heads if gpt2 else prune_heads)(
                model, op["layer"], list(op["idxs"]), check=False
            )
        elif op["kind"] == "channels" and gpt2_ffn_of(model, op["layer"]) is not None:
            prune_gpt2_ffn(model, op["layer"], list(op["idxs"]), check=False)
    channel_ops = [
        op for op in ops if op["kind"] == "channels" and gpt2_ffn_of(model, op["layer"]) is None
    ]
    if channel_ops:
        dg = _graph(model, inputs)
        for op in channel_ops:
            prune_channels(dg, model.get_submodule(op["layer"]), list(op["idxs"]))


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


class Snapshot:
    """Every module's parameters, buffers and plain attributes (``in_features``, ``num_heads``)
    as they are now, by reference: shrinking puts new tensors in place (torch-pruning and
    ``prune_heads`` assign new ``Parameter`` objects, they do not write into the old ones), so
    keeping the old objects is enough to put the model back, with no copy of its weights.
    ``restore()`` checks the shapes it puts back are those it took."""

    def __init__(self, model: nn.Module) -> None:
        self.items = []
        for m in model.modules():
            attrs = {k: v for k, v in vars(m).items() if not k.startswith("_")}
            self.items.append((m, dict(m._parameters), dict(m._buffers), attrs))
        self.shapes = [
            {k: tuple(v.shape) for k, v in (*p.items(), *b.items()) if v is not None}
            for _, p, b, _ in self.items
        ]

    def restore(self) -> None:
        for (m, params, buffers, attrs), shapes in zip(self.items, self.shapes, strict=True):
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            for k in [k for k in vars(m) if not k.startswith("_") and k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():
                object.__setattr__(m, k, v)
            now = {
                k: tuple(v.shape) for k, v in (*params.items(), *buffers.items()) if v is not None
            }
            if now != shapes:  # pragma: no cover - an op wrote into a tensor in place
                raise RuntimeError("shrink could not roll back: a tensor was changed in place")


def shrink(model: nn.Module, example_inputs: Any, *, tol: float = 1e-4) -> ShrinkReport:
    """Physically remove what the structured masks of ``optbrain.compress`` zeroed (see the
    module docstring), in place; returns a ``ShrinkReport``.

    example_inputs: one model input (a tensor, a tuple of positional arguments or a dict of
    keyword arguments, as ``compress`` takes calibration batches), used to trace the
    dependency graph, count MACs and check that the outputs did not change (relative error
    ``≤ tol``, else RuntimeError). A model with no structured layer is left as it is.
    """
    state = compressed_state(model)
    targets = structured_layers(model)
    rep = ShrinkReport(params_before=count_params(model))
    width: dict[str, int] = {}
    was_training = model.training
    snap = Snapshot(model)
    model.eval()
    try:
        with torch.no_grad():
            ref = first_tensor(call(model, example_inputs)).detach().clone()
        rep.macs_before = count_macs(model, example_inputs)
        for name, kind in targets.items():
            if kind != "heads":
                continue
            gpt2 = gpt2_attention_of(model, name) is not None
            try:
                done = (prune_gpt2_heads if gpt2 else prune_heads)(model, name, None)
            except ValueError as e:
                rep.skipped[name] = str(e)
                continue
            if done:
                rep.removed[name] = len(done)
                rep.ops.append({"kind": "heads", "layer": name, "idxs": done})
            else:
                rep.skipped[name] = "no head can go (k/v shared with kept heads, or not zero)"
        channel_layers = []
        for name in (n for n, k in targets.items() if k == "channels"):
            if attention_of(model, name) is not None or gpt2_attention_of(model, name) is not None:
                # its inputs are the heads' outputs (through softmax · V, reshapes, repeated
                # k/v): not a per-channel tie torch-pruning can follow (its group search does
                # not end on a Llama attention); heads are removed whole by 'heads'
                rep.skipped[name] = (
                    "an attention output projection: its input channels are slices of the "
                    "heads; use pattern 'heads' to remove whole heads"
                )
                continue
            if gpt2_ffn_of(model, name) is None:
                channel_layers.append(name)
                continue
            done = prune_gpt2_ffn(model, name)
            if done:
                rep.removed[name] = len(done)
                rep.ops.append({"kind": "channels", "layer": name, "idxs": done})
            else:
                rep.skipped[name] = "no FFN neuron can go (none is zero, or all are)"
        dg = None
        if channel_layers:
            try:
                dg = _graph(model, example_inputs)
            except Exception as e:  # noqa: BLE001 - torch-pruning cannot trace this model
                why = f"the dependency graph could not be traced ({type(e).__name__}: {e})"
                rep.skipped.update(dict.fromkeys(channel_layers, why))
                channel_layers = []
        width = {n: model.get_submodule(n).weight.shape[1] for n in channel_layers}
        if channel_layers:
            for name in channel_layers:
                module = model.get_submodule(name)
                idxs = zero_inputs(module)  # now: earlier groups may have removed some
                if not idxs:
                    took = width[name] - module.weight.shape[1]
                    if took:  # every zeroed channel went with an earlier layer's tied group
                        rep.removed[name] = took
                    else:
                        rep.skipped[name] = "no input channel left to remove"
                    continue
                keep, reason = plan_channels(dg, module, idxs)
                if reason is not None:
                    rep.skipped[name] = reason
                    continue
                prune_channels(dg, module, keep)
                rep.removed[name] = len(keep)
                rep.ops.append({"kind": "channels", "layer": name, "idxs": keep})
        with torch.no_grad():
            out = first_tensor(call(model, example_inputs))
        rep.max_rel_error = _rel_error(out, ref)
        if rep.max_rel_error > tol:
            raise ShrinkCheckError(
                f"shrink changed the model's output by {rep.max_rel_error:.3g} (relative) > "
                f"{tol}; the model was put back as it was; operations: {rep.ops}"
            )
        rep.params_after = count_params(model)
        rep.macs_after = count_macs(model, example_inputs)
    except BaseException:  # a failed check, a tracing error, an interrupt: put the model back
        snap.restore()
        raise
    finally:
        model.train(was_training)
    narrower = {n for n, w in width.items() if model.get_submodule(n).weight.shape[1] != w}
    for name in {*rep.removed, *narrower}:  # physically smaller now: no mask to keep
        for grp in state.layers[name].groups:
            grp.mask = None
    state.shrink = {**rep.to_dict(), "ops": [*(state.shrink or {}).get("ops", []), *rep.ops]}
    state.shrink_example = example_inputs
    return rep
