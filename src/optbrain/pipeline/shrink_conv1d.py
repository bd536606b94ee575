"""Shrinking GPT-2 style models (transformers' ``Conv1D``) by hand: FFN neurons and heads.

torch-pruning's dependency graph does not trace GPT-2 (its fused ``c_attn`` output is split
three ways and the cache concatenates), and its pruners do not know ``Conv1D``, whose weight is
stored transposed, ``(in, out)``: ``y = x @ weight + bias``. The two structured cases of a GPT-2
block are simple enough to do directly:

* an FFN neuron ``j`` (``channels`` on ``mlp.c_proj``): row ``j`` of ``c_proj.weight`` (its input)
  and column ``j`` of ``c_fc.weight`` plus ``c_fc.bias[j]`` (its producer); the GELU between acts
  per neuron, so removing a neuron whose ``c_proj`` row is all zero leaves the outputs as they
  were;
* a head ``h`` (``heads`` on ``attn.c_proj``): columns ``[s·E + h·d, s·E + (h+1)·d)`` of ``c_attn``
  for ``s = 0, 1, 2`` (query, key, value), the matching bias entries, rows ``[h·d, (h+1)·d)`` of
  ``c_proj``, and the attention's ``num_heads`` / ``split_size`` (``E`` = heads · ``d``).

Both keep exactly the remaining weights, so the outputs are unchanged up to summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import is_hf_conv1d


def conv1d_keep(
    module: nn.Module, keep_in: list[int] | None = None, keep_out: list[int] | None = None
) -> None:
    """Keep only input rows ``keep_in`` / output columns ``keep_out`` of a ``Conv1D`` (new
    parameters; ``nf`` / ``nx`` updated)."""
    w = module.weight.detach()
    b = module.bias
    if keep_in is not None:
        w = w[torch.as_tensor(keep_in, dtype=torch.long)]
    if keep_out is not None:
        idx = torch.as_tensor(keep_out, dtype=torch.long)
        w = w[:, idx]
        if b is not None:
            module.bias = nn.Parameter(b.detach()[idx].clone(), requires_grad=b.requires_grad)
    module.weight = nn.Parameter(w.clone(), requires_grad=module.weight.requires_grad)
    if hasattr(module, "nf"):
        module.nf = w.shape[1]
    if hasattr(module, "nx"):
        module.nx = w.shape[0]


def zero_rows(module: nn.Module) -> list[int]:
    """Input features of a ``Conv1D`` read through all-zero weights (rows of ``weight``)."""
    return (~module.weight.detach().any(1)).nonzero().flatten().tolist()


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def gpt2_ffn_of(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module] | None:
    """``(c_fc, c_proj)`` when layer ``name`` is the ``c_proj`` of a GPT-2 MLP, else None."""
    parent, leaf = _parent(model, name)
    fc, proj = getattr(parent, "c_fc", None), getattr(parent, "c_proj", None)
    if leaf != "c_proj" or fc is None or not (is_hf_conv1d(fc) and is_hf_conv1d(proj)):
        return None
    return fc, proj


def gpt2_attention_of(model: nn.Module, name: str) -> nn.Module | None:
    """The GPT-2 attention whose output projection is layer ``name``, else None."""
    parent, leaf = _parent(model, name)
    if leaf != "c_proj" or not is_hf_conv1d(getattr(parent, "c_attn", None) or nn.Identity()):
        return None
    if not all(isinstance(getattr(parent, a, None), int) for a in ("head_dim", "split_size")):
        return None
    if getattr(parent, "is_cross_attention", False):
        return None
    return parent


def prune_gpt2_ffn(
    model: nn.Module, name: str, idxs: list[int] | None = None, check: bool = True
) -> list[int]:
    """Remove FFN neurons ``idxs`` (None: those whose ``c_proj`` rows are all zero; with
    ``check``, only zero ones) of the GPT-2 MLP whose ``c_proj`` is ``name``; returns them."""
    fc, proj = gpt2_ffn_of(model, name)  # type: ignore[misc]
    zero = set(zero_rows(proj))
    idxs = sorted(zero) if idxs is None else sorted(i for i in idxs if not check or i in zero)
    if not idxs or len(idxs) == proj.weight.shape[0]:
        return []
    gone = set(idxs)
    keep = [i for i in range(proj.weight.shape[0]) if i not in gone]
    conv1d_keep(proj, keep_in=keep)
    conv1d_keep(fc, keep_out=keep)
    return idxs


def prune_gpt2_heads(
    model: nn.Module, name: str, heads: list[int] | None = None, check: bool = True
) -> list[int]:
    """Remove heads ``heads`` (None: all; with ``check``, only those whose ``c_proj`` rows are
    all zero) of the GPT-2 attention whose ``c_proj`` is ``name``; at least one head stays."""
    att = gpt2_attention_of(model, name)
    if att is None:
        raise ValueError("not a GPT-2 attention output projection (attn.c_attn + attn.c_proj)")
    d, E = att.head_dim, att.split_size
    n = E // d
    heads = list(range(n)) if heads is None else list(heads)
    if check:
        w = att.c_proj.weight.detach()
        heads = [h for h in heads if not w[h * d : (h + 1) * d].any()]
    heads = sorted(set(heads))
    if not heads or len(heads) == n:
        return []
    gone = set(heads)
    kept = [h for h in range(n) if h not in gone]
    rows = [h * d + i for h in kept for i in range(d)]
    cols = [s * E + r for s in range(3) for r in rows]
    conv1d_keep(att.c_attn, keep_out=cols)
    conv1d_keep(att.c_proj, keep_in=rows)
    att.split_size = len(rows)  # the forward splits q/k/v by it and views heads as -1
    att.num_heads = len(kept)
    return heads
