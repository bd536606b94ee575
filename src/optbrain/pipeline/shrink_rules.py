"""Which members of a torch-pruning group ``shrink`` can prune exactly (the rules of a tied group).

A channel passes unchanged (per channel) through batch norms, element-wise activations, adds,
pooling, a spatial-only pad and a global spatial mean; a grouped convolution other than a
depthwise one, a normalisation over channels or an unknown operation ties the channels in a
way ``shrink`` does not follow, and the group is left alone (``_item_problem`` says why).
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: torch-pruning's element-wise ops (by autograd node name) that act per channel.
PER_CHANNEL_OPS = (
    "Relu", "Gelu", "Silu", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "LeakyRelu", "Elu",
    "Hardtanh", "Softplus", "Mish", "Clamp", "Neg", "Add", "Sub", "Mul", "Clone", "Alias",
    "AdaptiveAvgPool", "AvgPool", "MaxPool", "AdaptiveMaxPool", "Upsample", "T", "Permute",
    "Transpose", "Unsqueeze", "Squeeze", "Dropout", "NativeDropout", "ToCopy",
)  # fmt: skip


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution (``groups == in == out``): channel ``c`` of its output reads only
    channel ``c`` of its input, so removing it removes one filter (and bias) and passes the
    channel on to its producers (EfficientNet / MobileNet: a project conv's input channels are
    the depthwise conv's channels and the expand conv's rows). Other grouped convolutions in
    a tied group are refused (``_item_problem``)."""
    g = getattr(module, "groups", 1)
    return (
        isinstance(module, nn.Conv1d | nn.Conv2d)
        and g > 1
        and g == module.in_channels == module.out_channels
    )


def conv_spatial(group: Any) -> int | None:
    """The spatial dimensions ``s`` of a tied group whose layers are all convolutions of one
    kind (their tensors are ``(n, channels, *s dims)``: the channel dimension is 1), else None
    (a Linear in the group: its channels are the last dimension)."""
    dims = set()
    for item in group.items:
        m = item.dep.target.module
        if isinstance(m, nn.Linear):
            return None
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            dims.add(len(m.kernel_size))
    return dims.pop() if len(dims) == 1 else None


def _pads_space_only(grad_fn: Any, spatial: int | None) -> bool:
    """Whether a constant pad (``F.pad``, ``_saved_pad``: 2 numbers per dimension from the
    last) pads only the spatial dimensions of a conv-layout tensor: then channel ``c`` of its
    output is channel ``c`` of its input with a border (TF "same" padding of a strided conv)."""
    pad = getattr(grad_fn, "_saved_pad", None)
    return spatial is not None and pad is not None and len(pad) <= 2 * spatial


def _global_pool(grad_fn: Any) -> bool:
    """Whether a mean (``_saved_dim``, ``_saved_self_sym_sizes``) reduces every dimension after
    the channel dimension of an ``(n, C, *spatial)`` tensor: global average pooling
    (``AdaptiveAvgPool2d(1)``, ``x.mean((2, 3))``), channel ``c`` of its output is the mean of
    input channel ``c``."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    dims = getattr(grad_fn, "_saved_dim", None)
    if sizes is None or dims is None or len(sizes) < 3:
        return False
    nd = len(sizes)
    red = {(int(d) - (1 << 64) if int(d) >= 1 << 63 else int(d)) % nd for d in dims}
    return red == set(range(2, nd))


def _item_problem(
    module: Any, handler: str, grad_fn: Any = None, spatial: int | None = None
) -> str | None:
    """Why a member of a tied group cannot be pruned exactly; None when it can. ``grad_fn``:
    the autograd node of an operation (its saved arguments), ``spatial``: ``conv_spatial``."""
    from torch_pruning import ops

    if isinstance(module, nn.Linear | nn.modules.batchnorm._BatchNorm):
        return None
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        g = module.groups
        if g == 1 or is_depthwise(module):
            return None
        return f"grouped convolution (groups={g}) in the tied group"
    if isinstance(module, ops._ElementWiseOp):
        op = str(module._grad_fn).removesuffix("Backward0").removesuffix("Backward1")
        if op.rstrip("0123456789") in PER_CHANNEL_OPS:
            return None
        if op == "ConstantPadNd" and _pads_space_only(grad_fn, spatial):
            return None
        if op == "Mean" and _global_pool(grad_fn):
            return None
        return f"operation {op} in the tied group mixes or normalises channels"
    if isinstance(module, ops._ConcatOp | ops._SplitOp | ops._ReshapeOp | ops._UnbindOp):
        return None
    if isinstance(module, ops._OutputOp):
        return "the channels are a model output"
    return f"{type(module).__name__} in the tied group (not known to act per channel)"


def _is_linear_matmul(dep: Any) -> bool:
    """Whether ``dep`` leads from a Linear's input channels to the matmul it runs as (a Linear
    without bias on a 3-D input is recorded as ``view`` + ``mm`` of the transposed weight)."""
    from torch_pruning import ops

    target = dep.target.module
    return (
        isinstance(dep.source.module, nn.Linear)
        and isinstance(target, ops._ElementWiseOp)
        and str(target._grad_fn).startswith(("MmBackward", "AddmmBackward"))
    )
