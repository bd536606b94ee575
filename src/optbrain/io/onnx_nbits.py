"""4-bit linear layers as ONNX Runtime's ``com.microsoft.MatMulNBits`` (``export_onnx(...,
matmul_nbits=True)``).

A Linear / HF Conv1D layer ``y = A B (+ bias)`` with ``B (K, N)`` on a grid of at most 4 bits
becomes one fused node that keeps the weight packed and dequantizes it inside the matmul
kernel (``Y = A · dequant(B)ᵀ``), where the ``DequantizeLinear`` path of ``onnx.py`` materialises
the float weight on every call::

    B      uint8 (N, n_blocks, block / 2)   codes along K, two per byte, low nibble first
    scales float32 (N · n_blocks,)          one per (output channel, block of K)
    zp     uint8 (N · ⌈n_blocks / 2⌉,)      zero points, two per byte, low nibble first

``dequant(B)[n, k] = (code − zp) · scale`` over the block of ``k`` — the same float32 product the
solvers wrote, so the weights are **bit-identical**. Blocks: a grid with ``group_size`` g uses
``block_size = g`` (ONNX Runtime needs a power of two ≥ 16); a per-channel grid repeats its one
scale over blocks of the largest of 128, 64, 32, 16 that divides K (4.5 bytes of scale and zero
point per block: 4.28 bits a weight with blocks of 128, 4.56 with 64, instead of 4). 3- and
2-bit grids are stored in 4-bit codes (their values are a subset).

``accuracy_level`` is the node's attribute: 0 (the default here) computes in float32, so the
outputs match torch's to the summation order (~1e-7 relative); 4 quantizes the activations to
int8 per block inside the kernel (ONNX Runtime's int8 dot products; smollm2-135m GPTQ 4-bit,
one token, 2 threads on this AVX2 CPU: 24.3 ms vs 34.6 ms at level 0 and 44.4 ms dense fp32;
logits' relative error 3.8e-2 vs 1.8e-6, perplexity 17.84 vs 17.80). ``ACCURACY_LEVELS`` lists
the values ONNX Runtime defines (1 float32, 2 float16, 3 bfloat16, 4 int8; the CPU kernel runs
1–3 as float32). The rewrite applies where the traced graph reads the weight through one of
``MatMul(A, B)``, ``MatMul(A, Transpose(W))`` or ``Gemm(A, ·, C)`` (alpha = beta = 1, no transA);
anything else (a weight tied to a second use, a convolution) keeps the ``DequantizeLinear`` path,
and ``nbits_plan`` says why.
"""

from __future__ import annotations

from typing import Any

import torch

from . import packing
from .layers import CompressedLayer

DOMAIN = "com.microsoft"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
BLOCKS = (128, 64, 32, 16)  # per-channel grids: the first that divides K


def block_size(layer: CompressedLayer, K: int) -> int | str:
    """The MatMulNBits block for ``layer`` (whose B has ``K`` rows), or why there is none."""
    if layer.kind not in ("linear", "hf_conv1d") or len(layer.groups) != 1:
        return f"a {layer.kind} layer (MatMulNBits takes linear layers)"
    grid = layer.groups[0].grid
    assert grid is not None
    if grid.bits > 4:
        return f"a {grid.bits}-bit grid (MatMulNBits here takes up to 4 bits)"
    gs = grid.group_size
    if gs is not None:
        if gs < 16 or gs & (gs - 1):
            return f"group_size {gs} (ONNX Runtime's blocks are powers of two >= 16)"
        return gs
    for b in BLOCKS:
        if K % b == 0:
            return b
    return f"{K} input features (no block of 16..128 divides them)"


def _consumers(graph: Any, name: str) -> list[tuple[int, Any]]:
    return [(i, n) for i, n in enumerate(graph.node) if name in n.input]


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _site(graph: Any, value: str, v_is_b: bool) -> tuple[list[Any], Any, str | None] | str:
    """``(nodes to remove, the matmul-like node, bias input or None)`` where the graph computes
    ``A @ B`` from the initializer ``value`` (``v_is_b``: it holds B, else Bᵀ), or why not."""
    uses = _consumers(graph, value)
    if len(uses) != 1:
        return f"its weight has {len(uses)} uses in the graph (tied or reshaped)"
    node = uses[0][1]
    if node.op_type == "Transpose" and not v_is_b and _attrs(node).get("perm") == [1, 0]:
        after = _consumers(graph, node.output[0])
        if (
            len(after) == 1
            and after[0][1].op_type == "MatMul"
            and after[0][1].input[1] == (node.output[0])
        ):
            return [node, after[0][1]], after[0][1], None
    if node.op_type == "MatMul" and v_is_b and node.input[1] == value:
        return [node], node, None
    if node.op_type == "Gemm" and node.input[1] == value:
        a = _attrs(node)
        if (
            a.get("alpha", 1.0) == 1.0
            and a.get("beta", 1.0) == 1.0
            and not a.get("transA", 0)
            and bool(a.get("transB", 0)) != v_is_b
        ):
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            return [node], node, bias
    return f"its weight feeds a {node.op_type} node the MatMulNBits rewrite does not take"


def nbits_plan(graph: Any, layer: CompressedLayer, init: Any, transposed: bool) -> dict | str:
    """What ``rewrite`` would do for ``layer`` whose weight is ``init``, or why it would not."""
    v_is_b = transposed != (layer.kind == "hf_conv1d")
    W = layer.adapter.weight(0)  # (N, K)
    N, K = W.shape
    block = block_size(layer, K)
    if isinstance(block, str):
        return block
    site = _site(graph, init.name, v_is_b)
    if isinstance(site, str):
        return site
    return {"N": N, "K": K, "block": block, "site": site}


def check_nbits(matmul_nbits: Any, accuracy_level: Any) -> tuple[bool, int]:
    """``(matmul_nbits, accuracy_level)`` checked (``None``: not given, so False and 0); a
    ValueError says what is allowed: True/False, one of ``ACCURACY_LEVELS``, and a level only
    with ``matmul_nbits=True``."""
    if matmul_nbits is not None and not isinstance(matmul_nbits, bool):
        raise ValueError(f"matmul_nbits must be True or False, got {matmul_nbits!r}")
    if accuracy_level is None:
        return bool(matmul_nbits), 0
    if isinstance(accuracy_level, bool) or accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(
            f"accuracy_level must be one of {ACCURACY_LEVELS} (0: float32, 4: int8 activations), "
            f"got {accuracy_level!r}"
        )
    if not matmul_nbits and accuracy_level != 0:
        raise ValueError(
            f"accuracy_level={accuracy_level} sets the MatMulNBits kernels' arithmetic: pass "
            "matmul_nbits=True with it"
        )
    return bool(matmul_nbits), int(accuracy_level)


def rewrite(proto: Any, layer: CompressedLayer, init: Any, plan: dict, accuracy_level: int) -> int:
    """Replace the layer's matmul by MatMulNBits (``plan`` from ``nbits_plan``) computing at
    ``accuracy_level``; returns the bytes of codes, scales and zero points now stored."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    grid = layer.groups[0].grid
    assert grid is not None
    N, K, block = plan["N"], plan["K"], plan["block"]
    remove, node, bias = plan["site"]
    nb = K // block
    q = packing.codes(layer.adapter.weight(0), grid).to(torch.int32)  # (N, K) in [0, maxq]
    reps = nb // grid.scale.shape[1]  # per channel: one scale over all blocks
    scale = grid.scale.float().repeat_interleave(reps, dim=1)  # (N, nb)
    zero = torch.round(grid.zero).to(torch.int32).repeat_interleave(reps, dim=1)
    codes = packing.pack_int4(q).reshape(N, nb, block // 2)
    base = init.name.replace("/", "_")
    names = {k: f"{base}_nbits_{k}" for k in ("b", "scales", "zp")}
    inits = [
        numpy_helper.from_array(codes.numpy(), names["b"]),
        numpy_helper.from_array(scale.reshape(-1).numpy(), names["scales"]),
        numpy_helper.from_array(packing.pack_int4(zero).reshape(-1).numpy(), names["zp"]),
    ]
    out = node.output[0]
    mm_out = f"{out}_nbits" if bias else out
    new = [
        helper.make_node(
            "MatMulNBits",
            [node.input[0], names["b"], names["scales"], names["zp"]],
            [mm_out],
            domain=DOMAIN,
            K=K,
            N=N,
            bits=4,
            block_size=block,
            accuracy_level=accuracy_level,
            name=f"{base}_MatMulNBits",
        )
    ]
    if bias:
        new.append(helper.make_node("Add", [mm_out, bias], [out]))
    for r in remove[:-1]:  # the weight's Transpose
        graph.node.remove(r)
    at = next(i for i, n in enumerate(graph.node) if list(n.output) == [out])  # after A
    del graph.node[at]
    for k, n in enumerate(new):
        graph.node.insert(at + k, n)
    graph.initializer.remove(init)
    graph.initializer.extend(inits)
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return sum(len(t.raw_data) for t in inits)
