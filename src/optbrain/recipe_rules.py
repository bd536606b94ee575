"""Recipe rules: the keys a rule may set, their defaults, matching module names, and the data
classes (Rule, LayerPlan; the global settings are in ``recipe_globals``). Settings are
validated by ``optbrain.core.spec``."""

from __future__ import annotations

import copy
import difflib
import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .core.methods import METHODS, check_method
from .core.patterns import parse_pattern
from .core.spec import (
    DEFAULT_METHOD,
    SETTING_DEFAULTS,
    CompressSpec,
    PatternSparsityError,
    SettingError,
    check_bits,
    check_bits_sym,
    check_damp,
    check_dtype,
    check_group_size,
    check_on_singular,
    check_pattern,
    check_pattern_sparsity,
    check_sparsity,
    check_sym,
    dtype_name,
    make_spec,
)

RECIPE_VERSION = 1

#: The built-in method names (the registry, ``optbrain.core.methods.METHODS``, may add more).
KNOWN_METHODS = tuple(METHODS)
CALIBRATION_MODES = ("independent", "sequential")

#: Per-layer settings a rule may set, with the value a module starts from (``make_spec``'s
#: defaults, dtype by name), plus the method, its options and ``skip``.
DEFAULTS: dict[str, Any] = {
    "method": DEFAULT_METHOD,
    **{k: dtype_name(v) if k == "dtype" else v for k, v in SETTING_DEFAULTS.items()},
    "options": {},
    "skip": False,
}
SETTINGS = tuple(DEFAULTS)
RULE_KEYS = ("targets", "ignore", "preset", *SETTINGS)

#: ``preset: NAME`` in a rule: the settings it stands for (keys the rule sets itself win).
#: ``wXa16``: X-bit weights in groups of 128, activations left in 16-bit (llm-compressor's
#: names); ``N:M``: semi-structured sparsity; ``N%``: unstructured sparsity (any percentage).
PRESETS: dict[str, dict[str, Any]] = {
    "w4a16": {"bits": 4, "group_size": 128},
    "w8a16": {"bits": 8, "group_size": 128},
    "w3a16": {"bits": 3, "group_size": 128},
    "2:4": {"pattern": "2:4"},
    "2:4+w4": {"pattern": "2:4", "bits": 4, "group_size": 128},
    "2:4+w8": {"pattern": "2:4", "bits": 8, "group_size": 128},
}
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
CALIBRATION_KEYS = ("mode", "samples", "batch_size", "targets")
GLOBAL_KEYS = (
    "version",
    "calibration",
    "seed",
    "bn_recalibration",
    "refit",
    "allocation",
    "ignore",
    "rules",
)
# options are passed to make_spec / compress_layer as keyword arguments: these names are taken
_RESERVED_OPTIONS = ("cols", "method", "W", "H", *SETTINGS)


class RecipeError(ValueError):
    """An invalid recipe. ``path`` locates the offending key, e.g. ``("rules", 1, "sparsity")``."""

    def __init__(self, message: str, path: tuple = ()) -> None:
        super().__init__(message)
        self.path = tuple(path)


# ----------------------------------------------------------------------------- small checks


def _where(path: tuple, root: str = "recipe") -> str:
    """``("rules", 1, "bits")`` -> ``rules[1].bits``; ``()`` -> ``root``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or root


def _check_keys(d: Mapping, allowed: Iterable[str], path: tuple, root: str = "recipe") -> None:
    allowed = list(allowed)
    for key in d:
        if key in allowed:
            continue
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
            elif path == () and key in CALIBRATION_KEYS:
                hint = f" (it belongs under calibration: {{{key}: ...}})"
        raise RecipeError(
            f"{_where(path, root)}: unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}",
            (*path, key),
        )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(path: tuple, key: str, what: str, value: object, root: str = "recipe") -> RecipeError:
    return RecipeError(f"{_where((*path, key), root)} must be {what}, got {value!r}", (*path, key))


def allowed_methods() -> list[str]:
    """Every method name a recipe may use: the built-ins and anything registered."""
    return sorted(METHODS)


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


_CLASS_NAME = re.compile(r"^[A-Z]\w*$")


def is_class_pattern(pattern: str) -> bool:
    """A bare identifier starting with a capital (``Linear``, ``Conv1D``): a class-name target,
    matching modules of that class or a subclass (module names are lower case by convention)."""
    return _CLASS_NAME.match(pattern) is not None


def _matches(name: str, patterns: Iterable[str], classes: Iterable[str] = ()) -> bool:
    """Whether a pattern matches the dotted ``name``, or a class-name pattern one of the
    module's ``classes`` (the names in its class's MRO)."""
    classes = tuple(classes)
    return any(
        _compile(p).fullmatch(name) or (p in classes and is_class_pattern(p)) for p in patterns
    )


def expand_preset(value: object, path: tuple, root: str = "recipe") -> dict[str, Any]:
    """The settings of ``preset: value`` (see ``PRESETS``)."""
    if isinstance(value, str):
        if value in PRESETS:
            return dict(PRESETS[value])
        m = _PERCENT.match(value.strip())
        if m and 0 <= float(m[1]) < 100:
            return {"sparsity": check_sparsity(float(m[1]) / 100)}
    raise _fail(path, "preset", f"one of {[*PRESETS, '50%']} (any N% below 100%)", value, root)


def _check_patterns(value: object, path: tuple, key: str, root: str, empty_ok: bool) -> list[str]:
    """targets / ignore: a list of glob or ``re:`` patterns (one string is wrapped)."""
    if isinstance(value, str):
        value = [value]
    what = "a list of module-name patterns (globs, or 're:' + a regular expression)"
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
        raise _fail(path, key, what, value, root)
    if not value and not empty_ok:
        raise _fail(path, key, "a non-empty list (leave it out to target every layer)", value, root)
    for i, p in enumerate(value):
        if not p.strip() or p == "re:":
            raise RecipeError(
                f"{_where((*path, key), root)}[{i}] is an empty pattern", (*path, key)
            )
        if p.startswith("re:"):
            try:
                _compile(p)
            except re.error as e:
                raise RecipeError(
                    f"{_where((*path, key), root)}[{i}]: bad regular expression {p[3:]!r}: {e}",
                    (*path, key),
                ) from None
    return list(value)


def _yaml_safe(v: object) -> bool:
    if v is None or isinstance(v, bool | int | float | str):
        return True
    if isinstance(v, list | tuple):
        return all(_yaml_safe(x) for x in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and _yaml_safe(x) for k, x in v.items())
    return False


#: The one validator (``optbrain.core.spec``) of each layer setting, on values as written.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "method": check_method,
    "sparsity": lambda v: check_sparsity(v, plain=True),
    "pattern": lambda v: str(check_pattern(v, plain=True)),
    "bits": lambda v: check_bits(v, plain=True),
    "sym": check_sym,
    "group_size": lambda v: check_group_size(v, plain=True),
    "damp": lambda v: check_damp(v, plain=True),
    "on_singular": check_on_singular,
    "dtype": lambda v: dtype_name(check_dtype(v, plain=True)),
}


def _check_setting(key: str, v: object, path: tuple, root: str) -> object:
    """Validate and normalise one non-None per-layer setting."""
    if key in _CHECKS:
        try:
            return _CHECKS[key](v)
        except SettingError as e:
            where = _where((*path, key), root)
            msg = f"{where}: {e.detail}" if e.detail else f"{where} must be {e.what}, got {v!r}"
            raise RecipeError(msg, (*path, key)) from None
    if key == "skip":
        if not isinstance(v, bool):
            raise _fail(path, key, "true or false", v, root)
        return v
    if key == "options":
        if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
            raise _fail(path, key, "a mapping of option names to values", v, root)
        for k, x in v.items():
            if k in _RESERVED_OPTIONS:
                raise RecipeError(
                    f"{_where((*path, key), root)}: {k!r} is not an option; "
                    f"set it as a rule key ({k}: ...) instead",
                    (*path, key, k),
                )
            if not _yaml_safe(x):
                raise RecipeError(
                    f"{_where((*path, key, k), root)} must be a plain value (number, string, "
                    f"bool, null, list or mapping), got {x!r}",
                    (*path, key, k),
                )
        return copy.deepcopy(dict(v))
    raise AssertionError(key)  # pragma: no cover


def _normalize_rule(d: Mapping, path: tuple, root: str = "recipe") -> dict:
    """Validate a rule mapping (``None`` = reset to default) into Rule keyword arguments."""
    _check_keys(d, RULE_KEYS, path, root)
    if d.get("preset") is not None:
        preset = expand_preset(d["preset"], path, root)
        d = {**preset, **{k: v for k, v in d.items() if k != "preset"}}
    targets = d.get("targets")
    ignore = d.get("ignore")
    out: dict[str, Any] = {
        "targets": ["*"]
        if targets is None
        else _check_patterns(targets, path, "targets", root, False),
        "ignore": [] if ignore is None else _check_patterns(ignore, path, "ignore", root, True),
        "reset": [],
    }
    for key in SETTINGS:
        if key not in d:
            continue
        if d[key] is None:
            out["reset"].append(key)
        else:
            out[key] = _check_setting(key, d[key], path, root)
    pat = out.get("pattern")
    # N:M against a sparsity in the same rule; the other combinations are checked once the
    # rules are merged (``check_merged``), as another rule may set the sparsity
    if pat is not None and out.get("sparsity") is not None and parse_pattern(pat).kind == "nm":
        try:
            check_pattern_sparsity(parse_pattern(pat), out["sparsity"])
        except PatternSparsityError as e:
            raise RecipeError(
                f"{_where((*path, 'sparsity'), root)}={out['sparsity']:g} contradicts pattern "
                f"{pat!r} (which fixes sparsity {e.fixed:g}); leave sparsity out for N:M",
                (*path, "sparsity"),
            ) from None
    return out


def check_merged(
    pattern: str, sparsity: float | None, where: str, bits: int | None = None, sym: bool = True
) -> None:
    """The combinations of merged settings (``Recipe.plan``): pattern/sparsity and bits/sym,
    via the spec's one check of each, re-worded with the module and the rules applied
    (``where``)."""
    pat = parse_pattern(pattern)
    try:
        check_pattern_sparsity(pat, sparsity)
    except PatternSparsityError as e:
        if e.fixed is None:
            raise RecipeError(f"{where}: {e}") from None
        raise RecipeError(
            f"{where}: sparsity {sparsity:g} contradicts pattern {pat} (which fixes sparsity "
            f"{e.fixed:g}); set 'sparsity: null' in the rule that sets the pattern"
        ) from None
    try:
        check_bits_sym(bits, sym)
    except SettingError as e:
        raise RecipeError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class LayerPlan:
    """The merged settings for one module: what ``compress_layer`` is called with.

    ``pattern`` is the canonical pattern string, ``dtype`` a torch dtype, ``options`` the
    method-specific knobs. ``rules`` lists the indices of the rules that applied (for reports).
    """

    method: str
    sparsity: float | None
    pattern: str
    bits: int | None
    sym: bool
    group_size: int | None
    damp: float
    on_singular: str
    dtype: torch.dtype
    options: dict[str, Any] = field(default_factory=dict)
    rules: tuple[int, ...] = field(default=(), compare=False)

    def spec_kwargs(self, with_method: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``make_spec(cols, **kw)`` / ``compress_layer(W, H, **kw)``.

        ``method`` is left out unless ``with_method`` (``make_spec`` does not take it), so:
        ``compress_layer(W, H, method=plan.method, **plan.spec_kwargs())``.
        """
        kw: dict[str, Any] = {
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "bits": self.bits,
            "sym": self.sym,
            "group_size": self.group_size,
            "damp": self.damp,
            "dtype": self.dtype,
            "on_singular": self.on_singular,
            **copy.deepcopy(self.options),
        }
        if with_method:
            kw["method"] = self.method
        return kw

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly settings (dtype as its name), e.g. for reports."""
        d = self.spec_kwargs(with_method=True)
        d = {k: d[k] for k in ("method", *SETTINGS[1:-2])}
        d["dtype"] = dtype_name(self.dtype)
        d["options"] = copy.deepcopy(self.options)
        return d

    def spec(self, cols: int) -> CompressSpec:
        """The validated ``CompressSpec`` for a layer with ``cols`` input columns."""
        return make_spec(cols, **self.spec_kwargs())


@dataclass
class Rule:
    """One rule: the modules it applies to and the settings it sets (None = left unset).

    ``reset`` names settings this rule puts back to their default (written ``key: null``).
    """

    targets: list[str] = field(default_factory=lambda: ["*"])
    ignore: list[str] = field(default_factory=list)
    method: str | None = None
    sparsity: float | None = None
    pattern: str | None = None
    bits: int | None = None
    sym: bool | None = None
    group_size: int | None = None
    damp: float | None = None
    on_singular: str | None = None
    dtype: str | None = None
    options: dict[str, Any] | None = None
    skip: bool | None = None
    reset: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._normalize((), "Rule")

    def _normalize(self, path: tuple, root: str) -> None:
        reset = self.reset
        if isinstance(reset, str):
            reset = [reset]
        if not isinstance(reset, list | tuple):
            raise _fail(
                path, "reset", f"a list of setting names from {list(SETTINGS)}", reset, root
            )
        for key in reset:
            if key not in SETTINGS:
                raise _fail(
                    path, "reset", f"a list of setting names from {list(SETTINGS)}", key, root
                )
            if getattr(self, key) is not None:
                raise RecipeError(f"{_where(path, root)}: {key!r} is both set and reset", path)
        d: dict[str, Any] = {"targets": self.targets, "ignore": self.ignore}
        d.update({k: getattr(self, k) for k in SETTINGS if getattr(self, k) is not None})
        d.update({k: None for k in reset})
        for k, v in _normalize_rule(d, path, root).items():
            setattr(self, k, v)
        self.reset = [k for k in SETTINGS if k in reset]

    @classmethod
    def from_dict(cls, d: Mapping) -> Rule:
        if not isinstance(d, Mapping):
            raise RecipeError(f"a rule must be a mapping, got {d!r}")
        return cls(**_normalize_rule(d, (), "rule"))

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping; settings left unset are omitted, reset ones written as None."""
        out: dict[str, Any] = {"targets": list(self.targets)}
        if self.ignore:
            out["ignore"] = list(self.ignore)
        for key in SETTINGS:
            v = getattr(self, key)
            if v is not None:
                out[key] = copy.deepcopy(v)
            elif key in self.reset:
                out[key] = None
        return out

    def matches(self, name: str, classes: Iterable[str] = ()) -> bool:
        """Whether this rule applies to module ``name`` (of the classes named ``classes``):
        a target matches, no ignore does."""
        return _matches(name, self.targets, classes) and not _matches(name, self.ignore, classes)


def _matches_some(pattern: str, names: list[str], classes: Iterable[str] = ()) -> bool:
    if is_class_pattern(pattern) and pattern in set(classes):
        return True
    return any(_compile(pattern).fullmatch(n) for n in names)


def class_names(module: object) -> tuple[str, ...]:
    """The class names a class-name target can match: the module's class and its bases."""
    return tuple(c.__name__ for c in type(module).__mro__)
