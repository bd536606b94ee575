"""Layer adapters: each compressible layer type seen as weight matrices ``W (rows, cols)`` and
calibration inputs as rows ``X (n, cols)``, plus write-back.

One adapter class per layer type, looked up by type (walking the MRO, so subclasses work);
there is no per-model code. Supported:

====================  =====================================================================
``nn.Linear``         ``W = weight (out, in)``; rows of X are the last dim of the input.
``nn.Conv1d/Conv2d``  any stride, padding (int, tuple, ``"same"``, ``"valid"``), padding_mode
                      (``zeros``, ``reflect``, ``replicate``, ``circular``), dilation, groups.
                      Compressed **per group**: group ``g`` is its own problem with
                      ``W_g (out/groups, in/groups · kh · kw)`` and its own ``H_g``.
HF ``Conv1D``         transformers' GPT-2 style layer, weight stored transposed ``(in, out)``;
                      recognised by class name/module, so transformers is never imported here.
====================  =====================================================================

Interface (``LayerAdapter``)::

    adapter = adapter_for(module)          # None when unsupported; skip_reason(module) says why
    adapter.kind, adapter.groups           # "linear" | "conv1d" | "conv2d" | "hf_conv1d", G
    adapter.rows, adapter.cols             # shape of ONE group's weight matrix
    adapter.weight(g) -> (rows, cols)      # float copy (half/bfloat16 promoted to float32)
    adapter.set_weight(g, W)               # write back in the module's dtype/device; bias kept
    adapter.input_rows(x) -> [X_g (n, cols)] * G     # the layer's input tensor as rows
    adapter.tokens(x)                      # n = rows per group = batch · output positions
    adapter.output_shape(x)                # spatial output size per sample (() for Linear)
    adapter.positions(x)                   # prod(output_shape) · (sequence length for Linear)
    adapter.params, adapter.macs_per_token, adapter.macs(x)   # for cost models

``x`` in ``tokens`` / ``output_shape`` / ``positions`` / ``macs`` may be a tensor or a shape.

Conv as a matrix product (the identity the tests check): with ``U = unfold(pad(x))`` of shape
``(N, C·kh·kw, L)`` and channel-major column order ``c·kh·kw + i·kw + j``, the output channels
of group ``g`` are ``W_g @ U[:, g-th block of C/G·kh·kw columns]`` (+ bias), i.e. the rows
``input_rows(x)[g] (N·L, C/G·kh·kw)`` times ``W_gᵀ`` give ``conv(x)`` reshaped to
``(N·L, out/G)``. Padding (also ``"same"`` and non-zero padding modes) is applied explicitly
with ``F.pad`` before ``F.unfold``, exactly as ``nn.Conv*`` does for non-zero padding modes.

``find_layers(model)`` returns the compressible layers of a model by name and, separately,
the layers that own a weight but are skipped, each with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

ShapeLike = torch.Tensor | torch.Size | Sequence[int]

__all__ = [
    "Conv1DAdapter",
    "ConvAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "adapter_for",
    "find_layers",
    "is_hf_conv1d",
    "register_adapter",
    "skip_reason",
]


def _shape(x: ShapeLike) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(int(s) for s in x)


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class LayerAdapter:
    """Base class: a layer viewed as ``groups`` weight matrices of shape ``(rows, cols)``.

    Subclasses implement ``weight``, ``set_weight``, ``input_rows`` and ``output_shape``.
    """

    kind: str = "?"

    def __init__(self, module: nn.Module, groups: int, rows: int, cols: int) -> None:
        self.module = module
        self.groups = int(groups)
        self.rows = int(rows)
        self.cols = int(cols)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.module).__name__}, groups={self.groups}, "
            f"rows={self.rows}, cols={self.cols})"
        )

    # -- weights -----------------------------------------------------------------------------
    def _check_group(self, g: int) -> int:
        if isinstance(g, bool) or int(g) != g or not 0 <= g < self.groups:
            raise IndexError(f"group must be in [0, {self.groups}), got {g!r}")
        return int(g)

    def _check_new(self, W: torch.Tensor) -> None:
        if tuple(W.shape) != (self.rows, self.cols):
            raise ValueError(
                f"weight for {self!r} must have shape ({self.rows}, {self.cols}), "
                f"got {tuple(W.shape)}"
            )
        if not torch.isfinite(W).all():
            raise ValueError(f"refusing to write a weight with NaN or Inf into {self!r}")

    def weight(self, g: int = 0) -> torch.Tensor:
        """Group ``g``'s weight matrix ``(rows, cols)``, a float copy on the module's device."""
        raise NotImplementedError

    def weights(self) -> list[torch.Tensor]:
        """``[weight(g) for g in range(groups)]``."""
        return [self.weight(g) for g in range(self.groups)]

    def set_weight(self, g: int, W: torch.Tensor) -> None:
        """Write ``W (rows, cols)`` back as group ``g``'s weight (module dtype/device, no grad)."""
        raise NotImplementedError

    # -- inputs ------------------------------------------------------------------------------
    def input_rows(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The layer's input tensor → one ``X_g (n, cols)`` per group (views where possible)."""
        raise NotImplementedError

    def output_shape(self, x: ShapeLike) -> tuple[int, ...]:
        """Spatial output size per sample: ``()`` for Linear, ``(L_out,)``, ``(H_out, W_out)``."""
        raise NotImplementedError

    def batch_size(self, x: ShapeLike) -> int:
        """Number of samples in ``x`` (1 for unbatched input)."""
        raise NotImplementedError

    def positions(self, x: ShapeLike) -> int:
        """Output positions per sample (tokens per sample): ``tokens(x) / batch_size(x)``."""
        return self.tokens(x) // max(1, self.batch_size(x))

    def tokens(self, x: ShapeLike) -> int:
        """Rows of ``input_rows(x)[g]`` (the same for every group): all output positions."""
        raise NotImplementedError

    # -- cost --------------------------------------------------------------------------------
    @property
    def params(self) -> int:
        """Number of weights (all groups, bias excluded) = ``groups · rows · cols``."""
        return self.groups * self.rows * self.cols

    @property
    def macs_per_token(self) -> int:
        """Multiply-accumulates per output position (all output channels): ``params``."""
        return self.params

    def macs(self, x: ShapeLike) -> int:
        """Multiply-accumulates of one forward on ``x``: ``tokens(x) · macs_per_token``."""
        return self.tokens(x) * self.macs_per_token


# ---------------------------------------------------------------------------------------------
class LinearAdapter(LayerAdapter):
    """``nn.Linear``: one group, ``W = weight (out, in)``, input ``(..., in)``."""

    kind = "linear"

    def __init__(self, module: nn.Linear) -> None:
        out_f, in_f = module.weight.shape
        super().__init__(module, 1, out_f, in_f)

    def weight(self, g: int = 0) -> torch.Tensor:
        self._check_group(g)
        w = self.module.weight.detach()
        return w.to(_float_dtype(w.dtype), copy=True)

    def set_weight(self, g: int, W: torch.Tensor) -> None:
        self._check_group(g)
        self._check_new(W)
        p = self.module.weight
        with torch.no_grad():
            p.copy_(W.to(device=p.device, dtype=p.dtype))

    def input_rows(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] != self.cols:
            raise ValueError(f"{self!r} got an input with last dim {x.shape[-1]}")
        return [x.reshape(-1, self.cols)]

    def output_shape(self, x: ShapeLike) -> tuple[int, ...]:
        return ()

    def batch_size(self, x: ShapeLike) -> int:
        s = _shape(x)
        return s[0] if len(s) >= 2 else 1

    def tokens(self, x: ShapeLike) -> int:
        return math.prod(_shape(x)[:-1])


class Conv1DAdapter(LinearAdapter):
    """transformers' ``Conv1D`` (GPT-2): ``weight (in, out)`` stored transposed; ``W = weightᵀ``."""

    kind = "hf_conv1d"

    def __init__(self, module: nn.Module) -> None:
        in_f, out_f = module.weight.shape
        LayerAdapter.__init__(self, module, 1, out_f, in_f)

    def weight(self, g: int = 0) -> torch.Tensor:
        self._check_group(g)
        w = self.module.weight.detach().T
        return w.to(_float_dtype(w.dtype), copy=True).contiguous()

    def set_weight(self, g: int, W: torch.Tensor) -> None:
        self._check_group(g)
        self._check_new(W)
        p = self.module.weight
        with torch.no_grad():
            p.copy_(W.T.to(device=p.device, dtype=p.dtype))


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d`` / ``nn.Conv2d``, per group: ``W_g (out/G, in/G · prod(kernel))``.

    Inputs are padded explicitly (``F.pad`` with the module's padding mode, "same" split as
    ``left = total // 2``, ``right = total - left`` with ``total = dilation · (k - 1)``, like
    PyTorch) and unfolded with ``F.unfold``; Conv1d is treated as a Conv2d of height 1.
    """

    def __init__(self, module: nn.Conv1d | nn.Conv2d) -> None:
        self.nd = 1 if isinstance(module, nn.Conv1d) else 2
        self.kind = f"conv{self.nd}d"
        G = module.groups
        out_c, in_per_g = module.weight.shape[:2]
        self.kernel = tuple(module.kernel_size)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.in_channels = module.in_channels
        super().__init__(module, G, out_c // G, in_per_g * math.prod(self.kernel))
        # per spatial dim (in forward order): (left, right)
        pad = module.padding
        if pad == "valid":
            self.pad = [(0, 0)] * self.nd
        elif pad == "same":
            self.pad = []
            for d, k in zip(self.dilation, self.kernel, strict=True):
                total = d * (k - 1)
                self.pad.append((total // 2, total - total // 2))
        else:
            self.pad = [(int(p), int(p)) for p in pad]
        self.mode = "constant" if module.padding_mode == "zeros" else module.padding_mode

    def _rows_slice(self, g: int) -> slice:
        return slice(g * self.rows, (g + 1) * self.rows)

    def weight(self, g: int = 0) -> torch.Tensor:
        self._check_group(g)
        w = self.module.weight.detach()[self._rows_slice(g)]
        return w.reshape(self.rows, self.cols).to(_float_dtype(w.dtype), copy=True)

    def set_weight(self, g: int, W: torch.Tensor) -> None:
        self._check_group(g)
        self._check_new(W)
        p = self.module.weight
        with torch.no_grad():
            p[self._rows_slice(g)] = W.reshape(p[self._rows_slice(g)].shape).to(
                device=p.device, dtype=p.dtype
            )

    def _batched(self, s: tuple[int, ...]) -> tuple[int, ...]:
        if len(s) == self.nd + 1:  # unbatched
            return (1, *s)
        if len(s) != self.nd + 2:
            raise ValueError(f"{self!r} expects a {self.nd + 2}-D input, got shape {s}")
        return s

    def output_shape(self, x: ShapeLike) -> tuple[int, ...]:
        s = self._batched(_shape(x))
        out = []
        for i in range(self.nd):
            n = s[2 + i] + sum(self.pad[i])
            span = self.dilation[i] * (self.kernel[i] - 1) + 1
            out.append((n - span) // self.stride[i] + 1)
        return tuple(out)

    def batch_size(self, x: ShapeLike) -> int:
        return self._batched(_shape(x))[0]

    def tokens(self, x: ShapeLike) -> int:
        return self.batch_size(x) * math.prod(self.output_shape(x))

    def input_rows(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.reshape(self._batched(tuple(x.shape)))
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{self!r} got {x.shape[1]} input channels")
        pad: list[int] = []
        for left, right in reversed(self.pad):  # F.pad wants the last dim first
            pad += [left, right]
        if any(pad):
            x = F.pad(x, pad, mode=self.mode)
        if self.nd == 1:
            x = x.unsqueeze(2)
            k, st, dl = (1, *self.kernel), (1, *self.stride), (1, *self.dilation)
        else:
            k, st, dl = self.kernel, self.stride, self.dilation
        U = F.unfold(x, kernel_size=k, dilation=dl, stride=st)  # (N, C·k, L)
        N, _, L = U.shape
        U = U.view(N, self.groups, self.cols, L).permute(1, 0, 3, 2)  # (G, N, L, cols)
        return [U[g].reshape(N * L, self.cols) for g in range(self.groups)]


# ---------------------------------------------------------------------------------------------
_ADAPTERS: dict[type, Callable[[nn.Module], LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv1d: ConvAdapter,
    nn.Conv2d: ConvAdapter,
}


def register_adapter(
    module_type: type,
) -> Callable[[Callable[[nn.Module], LayerAdapter]], Callable[[nn.Module], LayerAdapter]]:
    """Register ``factory(module) -> LayerAdapter`` for ``module_type`` (and its subclasses)."""

    def deco(factory: Callable[[nn.Module], LayerAdapter]) -> Callable[[nn.Module], LayerAdapter]:
        _ADAPTERS[module_type] = factory
        return factory

    return deco


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (or a subclass), without importing transformers."""
    return any(
        c.__name__ == "Conv1D" and c.__module__.split(".")[0] == "transformers"
        for c in type(module).__mro__
    )


def _factory(module: nn.Module) -> Callable[[nn.Module], LayerAdapter] | None:
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    if is_hf_conv1d(module):
        return Conv1DAdapter
    return None


_NO_ADAPTER_REASONS: list[tuple[tuple[type, ...], str]] = [
    ((nn.Conv3d,), "3-D convolution is not supported (F.unfold handles 1-D and 2-D only)"),
    (
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        "transposed convolution is not supported",
    ),
    ((nn.Embedding, nn.EmbeddingBag), "embedding is a table lookup, not a product with inputs"),
    (
        (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm),
        "normalisation layer (elementwise scale), not a matrix product",
    ),
    ((nn.Bilinear,), "bilinear layer is not supported"),
    (
        (nn.MultiheadAttention,),
        "nn.MultiheadAttention packs q/k/v in in_proj_weight and calls "
        "F.multi_head_attention_forward; its projections never run as modules",
    ),
]
if hasattr(nn, "RMSNorm"):
    _NO_ADAPTER_REASONS.append(((nn.RMSNorm,), "normalisation layer (elementwise scale)"))


def skip_reason(module: nn.Module) -> str | None:
    """Why ``module``, which owns a weight, cannot be compressed; None if it can (or has none).

    "Owns a weight" means a tensor attribute ``weight`` (or ``in_proj_weight``).
    """
    from torch.nn.parameter import UninitializedParameter
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return "weight is parametrized (torch.nn.utils.parametrize); remove it first"
    if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
        return "weight is reparametrized by weight_norm; remove it first"
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        w = getattr(module, "in_proj_weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    factory = _factory(module)
    if factory is None:
        for types, reason in _NO_ADAPTER_REASONS:
            if isinstance(module, types):
                return reason
        return f"no layer adapter for {type(module).__name__}"
    if isinstance(w, UninitializedParameter):
        return "weight is an uninitialised lazy parameter; run one forward first"
    if w.device.type == "meta" and not _PLAN_ON_META.get():
        return "weight is on the meta device (not materialised)"
    if not w.is_floating_point():
        return f"weight has dtype {w.dtype}, not floating point (already quantized?)"
    if w.dim() < 2 or w.numel() == 0:
        return f"weight has shape {tuple(w.shape)}"
    return None


_PLAN_ON_META: ContextVar[bool] = ContextVar("optbrain_plan_on_meta", default=False)


@contextmanager
def planning_on_meta() -> Iterator[None]:
    """Inside, layers whose weight is on the ``meta`` device count as compressible: a model
    planned before its weights are read (``pipeline.offload``), solved once they are."""
    token = _PLAN_ON_META.set(True)
    try:
        yield
    finally:
        _PLAN_ON_META.reset(token)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module``, or None when it is unsupported (see ``skip_reason``)."""
    factory = _factory(module)
    if factory is None or skip_reason(module) is not None:
        return None
    return factory(module)


def find_layers(
    model: nn.Module,
    include: Callable[[str, nn.Module], bool] | None = None,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Compressible layers of ``model`` by qualified name, and skipped ones with their reason.

    Returns ``(targets, skipped)`` in ``named_modules`` order. Modules that own no weight are
    in neither. ``include(name, module)`` filters both (e.g. a recipe's targets/ignore).
    Submodules of ``nn.MultiheadAttention`` (its ``out_proj``) are skipped: they are used
    through the functional attention, so a module hook never sees their inputs. A layer whose
    weight is tied to another module's (a GPT-2 ``lm_head`` sharing the token embedding) is
    skipped too: writing it would change both.
    """
    targets: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    mha_prefixes: list[str] = []
    owners: dict[int, dict[int, str]] = {}  # parameter → {owning module → its first name}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), {}).setdefault(id(module), name)
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            mha_prefixes.append(name + "." if name else "")
        if include is not None and not include(name, module):
            continue
        inside_mha = any(name.startswith(p) and name != p[:-1] for p in mha_prefixes)
        if inside_mha and _factory(module) is not None:
            skipped[name] = "inside nn.MultiheadAttention (weights used functionally)"
            continue
        reason = skip_reason(module)
        if reason is None and _factory(module) is not None:
            others = [n for m, n in owners.get(id(module.weight), {}).items() if m != id(module)]
            if others:
                reason = f"weight is tied to {others} (shared parameter)"
        if reason is not None:
            skipped[name] = reason
        elif _factory(module) is not None:
            targets[name] = module
    return targets, skipped


def head_dim_of(model: nn.Module) -> int | None:
    """The attention head size of a transformers model (``config.head_dim``, else
    ``hidden_size / num_attention_heads``), None when the model has no such config."""
    cfg = getattr(model, "config", None)
    hd = getattr(cfg, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None
