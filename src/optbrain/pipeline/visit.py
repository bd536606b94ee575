"""The one sequential traversal of a model's layers: each layer is visited with the Hessians of
the model as the visits before it left it (block by block where the model has a block list,
layer by layer otherwise).

``compress`` (sequential mode) solves each layer in its visit; ``refit`` re-solves each layer
against the dense outputs in its visit. With a dense copy (``dense``, ``pipeline.targets``) the
visit gets ``CrossAccumulator``s pairing the model's inputs with the dense model's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..adapters import LayerAdapter
from ..core.hessian import HessianAccumulator
from .data import Forward
from .hessians import collect_hessians
from .sequential import find_blocks, sequential_compress
from .targets import collect_paired

Visit = Callable[[str, nn.Module, list[HessianAccumulator]], None]


def visit_sequential(
    model: nn.Module,
    batches: list[Any],
    adapters: Mapping[str, LayerAdapter],
    visit: Visit,
    *,
    forward: Forward | None = None,
    inputs: str = "all",
    dense: nn.Module | None = None,
) -> list[str]:
    """Call ``visit(name, module, hessians)`` for the layers ``adapters`` (qualified names)
    in forward order, each layer's ``hessians`` (one per group) from the calibration
    ``batches`` run through ``model`` with the layers visited before already changed.

    Layers inside the blocks (``find_blocks``) go block by block (``sequential_compress``);
    without a block list every layer goes one by one (a full forward per layer). Layers
    outside the blocks: with ``dense`` each is visited one by one — those registered before
    the first block (a stem, a patch embedding) before the blocks, the others after them;
    without ``dense``, they are returned unvisited (for one independent pass by the caller).
    """
    try:
        blocks = find_blocks(model)
    except ValueError:  # no block list (an MLP, a plain CNN): layer by layer below
        blocks = []
    inside = {f"{b}.{n}" for b, blk in blocks for n, _ in blk.named_modules()}
    in_blocks = [n for n in adapters if n in inside]
    done: set[str] = set()

    def one_by_one(names: list[str]) -> None:
        for n in names:  # each layer's H from the model with the layers before visited
            if dense is not None:
                hess = collect_paired(
                    model, dense, {n: adapters[n]}, batches, forward, inputs=inputs
                )
            else:
                hess = collect_hessians(model, {n: adapters[n]}, batches, forward, inputs=inputs)
            visit(n, adapters[n].module, hess[n])
            done.add(n)

    if in_blocks and dense is not None:  # the stem first: the blocks see its visited outputs
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        first = min(order[b] for b, _ in blocks)
        one_by_one([n for n in adapters if n not in inside and order.get(n, first) < first])
    if in_blocks:
        prefix = {b: blk for b, blk in blocks}

        def targets_in_block(block: nn.Module) -> dict[str, nn.Module]:
            bname = next(b for b, blk in prefix.items() if blk is block)
            return {
                n[len(bname) + 1 :]: adapters[n].module
                for n in in_blocks
                if n.startswith(bname + ".")
            }

        done.update(
            sequential_compress(
                model,
                batches,
                blocks,
                targets_in_block,
                visit,
                forward=forward,
                inputs=inputs,
                dense=dense,
            )
        )
    rest = [n for n in adapters if n not in done]
    if blocks and dense is None:
        return rest
    one_by_one(rest)
    return []
