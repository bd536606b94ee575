"""CompressSpec, what to do to one layer: the defaults of every layer setting, the one validator
of each setting, and make_spec; every failure is a ValueError naming the setting.

The recipe (``optbrain.recipe``) validates its settings with the same functions, passing
``plain=True`` (values as written in YAML: no strings for numbers, dtype by name), and re-words
a ``SettingError`` with where the setting is (``rules[1].sparsity must be ...``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .patterns import Pattern, parse_pattern, structured_group_size

#: The layer solver used when none is named (``core.methods.METHODS``).
DEFAULT_METHOD = "obc"
#: Relative damping of H (λ = damp · mean diag H) when none is given.
DEFAULT_DAMP = 0.01
#: What to do when H cannot be inverted (see ``core.hessian.prepare_hessian``).
ON_SINGULAR = ("raise", "damp", "eig")
DEFAULT_ON_SINGULAR = "damp"
#: Whose outputs a layer is fitted to in sequential mode (``core.targets``): its own outputs
#: on the compressed model's inputs, or the dense model's outputs (GPTAQ-style).
TARGETS = ("compressed", "dense")
DEFAULT_TARGETS = "compressed"
#: Compute dtypes by name (the recipe's spelling) and the default.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_DTYPE = torch.float32
MAX_BITS = 16

#: Every layer setting of ``make_spec`` with its default, in the recipe's order.
SETTING_DEFAULTS: dict[str, Any] = {
    "sparsity": None,
    "pattern": "unstructured",
    "bits": None,
    "sym": True,
    "group_size": None,
    "damp": DEFAULT_DAMP,
    "on_singular": DEFAULT_ON_SINGULAR,
    "dtype": DEFAULT_DTYPE,
}


class SettingError(ValueError):
    """A bad layer setting: ``key`` must be ``what``, got ``value`` (``detail``: a message of
    its own, e.g. from the pattern parser). Callers with more context re-word it."""

    def __init__(self, key: str, what: str, value: object, detail: str | None = None) -> None:
        super().__init__(detail or f"{key} must be {what}, got {value!r}")
        self.key, self.what, self.value, self.detail = key, what, value, detail


class PatternSparsityError(ValueError):
    """A sparsity that does not fit the pattern: N:M with a different sparsity (``fixed`` is
    the one N:M implies), or a block pattern without a sparsity (``fixed`` None)."""

    def __init__(self, pattern: Pattern, sparsity: float | None, message: str) -> None:
        super().__init__(message)
        self.pattern, self.sparsity = pattern, sparsity
        self.fixed = pattern.fixed_sparsity if pattern.kind == "nm" else None


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_whole(v: object) -> bool:
    """A finite number with no fractional part (``4.0``; not inf / NaN)."""
    return _is_number(v) and math.isfinite(v) and int(v) == v  # type: ignore[arg-type]


def first_nonfinite(x: torch.Tensor, block: int = 256) -> tuple[int, ...] | None:
    """The index of the first NaN / Inf of ``x`` (row-major), or None when all are finite.

    Read ``block`` rows (first-dimension slices) at a time: ``torch.isfinite`` of a whole
    tensor makes temporaries of its full size (``|x|`` and masks), which for a ``(C, C)``
    Hessian is as much memory as the Hessian itself."""
    if x.dim() == 0:
        return None if bool(torch.isfinite(x)) else ()
    for i in range(0, x.shape[0], block):
        ok = torch.isfinite(x[i : i + block])
        if not bool(ok.all()):
            bad = (~ok).nonzero()[0].tolist()
            return (i + bad[0], *bad[1:])
    return None


def all_finite(x: torch.Tensor) -> bool:
    """No NaN / Inf in ``x`` (``first_nonfinite``: without full-size temporaries)."""
    return first_nonfinite(x) is None


def _scale_and_asymmetry(H: torch.Tensor, block: int = 256) -> tuple[float, float]:
    """``(max |H_ij| (at least 1e-30), max |H_ij − H_ji|)`` in float64, read ``block`` rows
    at a time: the temporaries are ``(block, C)``, not ``(C, C)`` (a 5504-column Hessian is
    242 MB in float64)."""
    scale = asym = 0.0
    for i in range(0, H.shape[0], block):
        rows = H[i : i + block].double()
        scale = max(scale, float(rows.abs().max()))
        asym = max(asym, float((rows - H[:, i : i + block].double().T).abs().max()))
    return max(scale, 1e-30), asym


def check_weight_hessian(W: torch.Tensor, H: torch.Tensor) -> None:
    """Validate a layer problem: ``W (rows, cols)`` and ``H (cols, cols)``, finite, floating."""
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if not isinstance(H, torch.Tensor):
        raise ValueError(f"H must be a torch.Tensor, got {type(H).__name__}")
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (rows, cols), got shape {tuple(W.shape)}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square (cols, cols), got shape {tuple(H.shape)}")
    if H.shape[0] != W.shape[1]:
        raise ValueError(
            f"H has shape {tuple(H.shape)} but W has {W.shape[1]} columns; H must be (cols, cols)"
        )
    if W.numel() == 0:
        raise ValueError(f"W is empty (shape {tuple(W.shape)})")
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got dtype {W.dtype}")
    if not H.is_floating_point():
        raise ValueError(f"H must be a floating-point tensor, got dtype {H.dtype}")
    bad = first_nonfinite(W)
    if bad is not None:
        raise ValueError(f"W contains NaN or Inf (first at row {bad[0]}, col {bad[1]})")
    bad = first_nonfinite(H)
    if bad is not None:
        raise ValueError(f"H contains NaN or Inf (first at [{bad[0]}, {bad[1]}])")
    if W.device != H.device:
        raise ValueError(f"W is on {W.device} but H is on {H.device}; put both on one device")
    scale, asym = _scale_and_asymmetry(H)
    if asym > 1e-4 * scale:
        raise ValueError("H must be symmetric (H = 2 X X^T / N); got an asymmetric matrix")
    if (torch.diagonal(H).double() < -1e-6 * scale).any():
        raise ValueError("H has negative diagonal entries; it is not a valid Hessian 2 X X^T / N")


def check_sparsity(sparsity: object, name: str = "sparsity", plain: bool = False) -> float:
    """Sparsity is the pruned fraction, in [0, 1)."""
    what = "a number in [0, 1) (the pruned fraction)"
    if plain and not _is_number(sparsity):
        raise SettingError(name, what, sparsity)
    try:
        s = float(sparsity)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingError(name, what, sparsity) from None
    if not (0.0 <= s < 1.0):
        raise SettingError(name, what, sparsity)
    return s


def check_pattern(pattern: object, plain: bool = False) -> Pattern:
    """A pattern string (or ``Pattern``): "unstructured", "N:M" (N < M) or "blockB"."""
    what = (
        "'unstructured', 'N:M' (e.g. '2:4', N < M), 'blockB' (e.g. 'block4'), 'channels' or 'heads'"
    )
    if plain and not isinstance(pattern, str):
        raise SettingError("pattern", what + " (quote N:M in YAML)", pattern)
    if not plain:
        return parse_pattern(pattern)  # type: ignore[arg-type]
    try:
        return parse_pattern(pattern)  # type: ignore[arg-type]
    except ValueError as e:
        raise SettingError("pattern", what, pattern, detail=str(e)) from None


def check_bits(bits: object, plain: bool = False) -> int:
    """Bit width: an integer in [1, 16] (a whole float is accepted unless ``plain``)."""
    ok = _is_int(bits) or (not plain and _is_whole(bits))
    if not ok or not (1 <= int(bits) <= MAX_BITS):  # type: ignore[arg-type]
        raise SettingError(
            "bits", f"an integer in [1, {MAX_BITS}] (or null for no quantization)", bits
        )
    return int(bits)  # type: ignore[arg-type]


def check_sym(sym: object) -> bool:
    """Symmetric grid: True or False."""
    if not isinstance(sym, bool):
        raise SettingError("sym", "true or false", sym)
    return sym


def check_bits_sym(bits: int | None, sym: bool) -> None:
    """A symmetric grid needs 2 bits or more: with ``maxq = 1`` its zero point is 1, so its
    only levels are ``{−scale, 0}`` and every weight rounds to 0 or to one sign."""
    if bits == 1 and sym:
        raise SettingError(
            "sym",
            "false for bits=1",
            sym,
            detail="bits=1 needs sym: false (a symmetric 1-bit grid has only the levels "
            "-scale and 0); use an asymmetric grid or 2 bits or more",
        )


def check_group_size(group_size: object, cols: int | None = None, plain: bool = False) -> int:
    """Columns per quantization group: a positive integer (dividing ``cols`` when given)."""
    g = group_size
    ok = _is_int(g) or (not plain and _is_whole(g))
    if not ok or int(group_size) < 1:  # type: ignore[arg-type]
        raise SettingError("group_size", "a positive integer (or null for per-channel)", group_size)
    g = int(group_size)  # type: ignore[arg-type]
    if cols is not None and cols % g != 0:
        raise ValueError(f"group_size={group_size} does not divide the {cols} columns of W")
    return g


def check_damp(damp: object, plain: bool = False) -> float:
    """Relative damping: a finite number >= 0."""
    what = "a finite number >= 0 (relative damping)"
    if plain and not _is_number(damp):
        raise SettingError("damp", what, damp)
    try:
        d = float(damp)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingError("damp", what, damp) from None
    if not math.isfinite(d) or d < 0.0:
        raise SettingError("damp", what, damp)
    return d


def check_on_singular(on_singular: object) -> str:
    """Policy when H cannot be inverted: one of ``ON_SINGULAR``."""
    if on_singular not in ON_SINGULAR:
        raise SettingError("on_singular", f"one of {list(ON_SINGULAR)}", on_singular)
    return on_singular  # type: ignore[return-value]


def check_targets(targets: object) -> str:
    """Sequential-mode targets: one of ``TARGETS``."""
    if targets not in TARGETS:
        raise SettingError("targets", f"one of {list(TARGETS)}", targets)
    return targets  # type: ignore[return-value]


def check_dtype(dtype: object, plain: bool = False) -> torch.dtype:
    """Compute dtype: torch.float32 (default) or torch.float64; by name too when ``plain``."""
    if plain and isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise SettingError("dtype", f"one of {list(DTYPES)}", dtype)
    return dtype  # type: ignore[return-value]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the recipe's spelling)."""
    return str(dtype).removeprefix("torch.")


def check_pattern_sparsity(pattern: Pattern, sparsity: float | None) -> float | None:
    """The sparsity a pattern implies: N:M fixes it (a different one > 0 is an error); a block
    pattern needs one. Otherwise ``sparsity`` as given."""
    if pattern.kind == "nm":
        fixed = pattern.fixed_sparsity
        if sparsity is not None and sparsity > 0 and abs(sparsity - fixed) > 1e-9:
            raise PatternSparsityError(
                pattern,
                sparsity,
                f"sparsity={sparsity} contradicts pattern {pattern} (which fixes sparsity "
                f"{fixed:g}); leave sparsity unset for N:M",
            )
        return fixed
    if (pattern.kind == "block" or pattern.structured) and not sparsity:
        what = "blocks" if pattern.kind == "block" else pattern.kind
        raise PatternSparsityError(
            pattern, None, f"pattern {pattern} needs a sparsity > 0 (the fraction of {what} to "
            "remove)",
        )  # fmt: skip
    return sparsity


def check_structured(
    pattern: Pattern,
    cols: int,
    sparsity: float | None,
    bits: int | None = None,
    kernel_positions: int = 1,
    layer_groups: int = 1,
) -> int:
    """Columns per removed group of a ``channels`` / ``heads`` pattern (1 otherwise), after
    checking the layer can shrink: not a grouped convolution (``layer_groups > 1``: its input
    channels are tied to its output channels group by group), heads on a Linear only
    (``kernel_positions == 1``), a head size dividing ``cols``, at least one group left, no
    ``bits`` (structured levels compound with quantization in the budget, not in one solve)."""
    if not pattern.structured:
        return 1
    if layer_groups > 1:
        raise ValueError(
            f"pattern {pattern}: a grouped convolution (groups={layer_groups}) cannot shrink its "
            "input channels (each is tied to its group's output channels); use 'unstructured' "
            "or leave the layer out"
        )
    if pattern.kind == "heads" and kernel_positions != 1:
        raise ValueError(
            f"pattern {pattern} applies to attention output projections (Linear), not to a "
            f"convolution ({kernel_positions} kernel positions per channel)"
        )
    if bits is not None:
        raise ValueError(
            f"pattern {pattern} prunes only: bits={bits} cannot be solved together with it "
            "(compound structured levels with quantization through the budget)"
        )
    g = structured_group_size(pattern, cols, kernel_positions)  # type: ignore[arg-type]
    n = cols // g
    k = int(round(float(sparsity or 0.0) * n))
    if k >= n:
        raise ValueError(
            f"sparsity={sparsity} removes all {n} {pattern.kind} of the layer; at least one "
            "must stay"
        )
    return g


def check_options(method: str, options: dict, allowed: Iterable[str]) -> None:
    """Unknown option names are a ValueError naming the method (catches typos early)."""
    allowed = sorted(allowed)
    bad = sorted(set(options) - set(allowed))
    if bad:
        close = [m for b in bad for m in difflib.get_close_matches(b, allowed, n=1)]
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(
            f"method {method!r} does not take option(s) {bad}{hint}; its options are {allowed}"
        )


@dataclass(frozen=True)
class CompressSpec:
    """What to do to one layer. Built and validated by ``make_spec``.

    sparsity: pruned fraction in [0, 1) or None (no pruning; for N:M it is fixed by the pattern).
    pattern: parsed pruning pattern. bits: None for no quantization. sym / group_size: grid.
    damp: relative damping (λ = damp · mean diag H). dtype: compute dtype (float32 / float64).
    on_singular: policy when H cannot be inverted ("raise" | "damp" | "eig").
    options: method-specific knobs (e.g. ``block_size`` for GPTQ, ``act_order``).
    channel_size: columns per removed group of a ``channels`` / ``heads`` pattern (1 for a
    Linear input feature, ``kh·kw`` for a conv input channel, ``head_dim`` for a head).
    """

    sparsity: float | None = None
    pattern: Pattern = field(default_factory=lambda: Pattern("unstructured"))
    bits: int | None = None
    sym: bool = True
    group_size: int | None = None
    damp: float = DEFAULT_DAMP
    dtype: torch.dtype = DEFAULT_DTYPE
    on_singular: str = DEFAULT_ON_SINGULAR
    options: dict[str, Any] = field(default_factory=dict)
    channel_size: int = 1

    @property
    def prunes(self) -> bool:
        return self.pattern.kind == "nm" or (self.sparsity is not None and self.sparsity > 0)

    @property
    def quantizes(self) -> bool:
        return self.bits is not None


def make_spec(
    cols: int,
    sparsity: float | None = None,
    pattern: str | Pattern = "unstructured",
    bits: int | None = None,
    sym: bool = True,
    group_size: int | None = None,
    damp: float = DEFAULT_DAMP,
    dtype: torch.dtype = DEFAULT_DTYPE,
    on_singular: str = DEFAULT_ON_SINGULAR,
    *,
    head_dim: int | None = None,
    kernel_positions: int = 1,
    layer_groups: int = 1,
    **options: object,
) -> CompressSpec:
    """Validate arguments into a ``CompressSpec`` for a layer with ``cols`` input columns.

    For ``channels`` / ``heads``: ``kernel_positions`` (``kh·kw`` of a conv, 1 for a Linear) and
    ``layer_groups`` (a conv's groups) describe the layer, ``head_dim`` the head size when the
    pattern does not name it (``check_structured``).
    """
    pat = check_pattern(pattern)
    if head_dim is not None:
        pat = parse_pattern(pat, head_dim)
    pat.check_cols(cols)
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    sparsity = check_pattern_sparsity(pat, sparsity)
    channel_size = check_structured(pat, cols, sparsity, bits, kernel_positions, layer_groups)
    bits = None if bits is None else check_bits(bits)
    check_bits_sym(bits, check_sym(sym))
    return CompressSpec(
        sparsity=sparsity,
        pattern=pat,
        bits=bits,
        sym=sym,
        group_size=None if group_size is None else check_group_size(group_size, cols),
        damp=check_damp(damp),
        dtype=check_dtype(dtype),
        on_singular=check_on_singular(on_singular),
        options=dict(options),
        channel_size=channel_size,
    )
