"""Compression recipes: which layers get which method and settings; validated, versioned, YAML.

A recipe is an ordered list of rules plus global settings. Shortest form (one rule, every
compressible layer)::

    method: obc
    sparsity: 0.5

Full form::

    version: 1
    calibration: {mode: sequential, samples: 128, batch_size: 8}
    seed: 0
    bn_recalibration: false
    ignore: [classifier]                 # never compressed, whatever the rules say
    rules:
      - targets: ["*"]                   # every layer: 4-bit GPTQ, groups of 128
        method: gptq
        bits: 4
        group_size: 128
        options: {act_order: true}
      - targets: ["re:encoder\\.layer\\.[0-5]\\..*"]
        ignore: ["*.attention.*"]        # this rule does not apply to these
        group_size: null                 # null: back to the default (per output channel)
      - targets: [pooler.dense]
        skip: true                       # leave this layer dense

**Matching.** Patterns are matched against the full dotted module name (``encoder.layer.0.dense``).
A plain pattern is a case-sensitive glob (``fnmatch.fnmatchcase``): ``*`` matches any run of
characters *including dots* (``encoder.*.dense`` matches ``encoder.layer.0.attention.dense``),
``?`` one character, ``[abc]`` one of a set. A pattern starting with ``re:`` is a Python regular
expression that must match the *whole* name (``re.fullmatch``). A rule applies to a module when
one of its ``targets`` matches (no ``targets`` means ``["*"]``, every layer) and none of its
``ignore`` patterns does. The top-level ``ignore`` excludes a module from every rule.

**Refinement.** For a module, every rule that applies is taken in order, starting from the
defaults (``DEFAULTS``). A key a rule sets overrides the value so far; a key it leaves out keeps
it; a key it sets to ``null`` goes back to its default (so ``bits: null`` turns quantization off
and ``group_size: null`` means per output channel). ``options`` merge key by key (an option set to
``null`` is removed) and start afresh when a rule switches to a different method, since options
belong to a method. ``skip: true`` leaves the module uncompressed unless a later rule sets
``skip: false``. A module gets no plan (``Recipe.plan`` returns None) when no rule applies, it is
ignored or skipped, or the merged settings ask for nothing (no sparsity > 0, no N:M, no bits).

**Validation.** Unknown keys and bad values are a ``ValueError`` (``RecipeError``) naming the key,
where it is (``rules[1]``, ``calibration``) and what is allowed; from YAML, also the file and line.
Combinations that only arise after merging (an N:M pattern with a contradicting sparsity, a block
pattern without a sparsity) are reported by ``plan`` with the module name and the rules applied.

YAML is read with YAML 1.1 rules except that ``2:4`` is a string (not the base-60 integer 124)
and ``1e-3`` is a float (not a string); duplicate keys are an error.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import functools
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .core.methods import METHODS
from .core.patterns import parse_pattern
from .core.spec import CompressSpec, make_spec

RECIPE_VERSION = 1

#: Method names always accepted (the registry may add more: ``optbrain.core.methods.METHODS``).
KNOWN_METHODS = ("obc", "gptq", "sparsegpt", "magnitude", "obd", "rtn", "auto")
CALIBRATION_MODES = ("independent", "sequential")
ON_SINGULAR = ("raise", "damp", "eig")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Per-layer settings a rule may set, with the value a module starts from.
DEFAULTS: dict[str, Any] = {
    "method": "obc",
    "sparsity": None,
    "pattern": "unstructured",
    "bits": None,
    "sym": True,
    "group_size": None,
    "damp": 0.01,
    "on_singular": "damp",
    "dtype": "float32",
    "options": {},
    "skip": False,
}
SETTINGS = tuple(DEFAULTS)
RULE_KEYS = ("targets", "ignore", *SETTINGS)
CALIBRATION_KEYS = ("mode", "samples", "batch_size")
GLOBAL_KEYS = ("version", "calibration", "seed", "bn_recalibration", "ignore", "rules")
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


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fail(path: tuple, key: str, what: str, value: object, root: str = "recipe") -> RecipeError:
    return RecipeError(f"{_where((*path, key), root)} must be {what}, got {value!r}", (*path, key))


def allowed_methods() -> list[str]:
    """Every method name a recipe may use: the built-ins and anything registered."""
    return sorted(set(KNOWN_METHODS) | set(METHODS))


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(_compile(p).fullmatch(name) for p in patterns)


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


def _check_setting(key: str, v: object, path: tuple, root: str) -> object:
    """Validate and normalise one non-None per-layer setting."""
    if key == "method":
        methods = allowed_methods()
        if v not in methods:
            raise _fail(path, key, f"one of {methods}", v, root)
        return v
    if key == "sparsity":
        if not _is_number(v) or not (0.0 <= v < 1.0):
            raise _fail(path, key, "a number in [0, 1) (the pruned fraction)", v, root)
        return float(v)
    if key == "pattern":
        what = "'unstructured', 'N:M' (e.g. '2:4', N < M) or 'blockB' (e.g. 'block4')"
        if not isinstance(v, str):
            raise _fail(path, key, what + " (quote N:M in YAML)", v, root)
        try:
            return str(parse_pattern(v))
        except ValueError as e:
            raise RecipeError(f"{_where((*path, key), root)}: {e}", (*path, key)) from None
    if key == "bits":
        if not _is_int(v) or not (1 <= v <= 16):
            raise _fail(path, key, "an integer in [1, 16] (or null for no quantization)", v, root)
        return int(v)
    if key == "group_size":
        if not _is_int(v) or v < 1:
            raise _fail(path, key, "a positive integer (or null for per-channel)", v, root)
        return int(v)
    if key in ("sym", "skip"):
        if not isinstance(v, bool):
            raise _fail(path, key, "true or false", v, root)
        return v
    if key == "damp":
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise _fail(path, key, "a finite number >= 0 (relative damping)", v, root)
        return float(v)
    if key == "on_singular":
        if v not in ON_SINGULAR:
            raise _fail(path, key, f"one of {list(ON_SINGULAR)}", v, root)
        return v
    if key == "dtype":
        if isinstance(v, torch.dtype):
            v = str(v).removeprefix("torch.")
        if v not in DTYPES:
            raise _fail(path, key, f"one of {list(DTYPES)}", v, root)
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
    if pat is not None and out.get("sparsity") is not None:
        fixed = parse_pattern(pat).fixed_sparsity
        if fixed is not None and out["sparsity"] > 0 and abs(out["sparsity"] - fixed) > 1e-9:
            raise RecipeError(
                f"{_where((*path, 'sparsity'), root)}={out['sparsity']:g} contradicts pattern "
                f"{pat!r} (which fixes sparsity {fixed:g}); leave sparsity out for N:M",
                (*path, "sparsity"),
            )
    return out


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
        d["dtype"] = str(self.dtype).removeprefix("torch.")
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

    def matches(self, name: str) -> bool:
        """Whether this rule applies to module ``name`` (a target matches, no ignore does)."""
        return _matches(name, self.targets) and not _matches(name, self.ignore)


@dataclass
class CalibrationConfig:
    """How calibration data is used.

    mode: "independent" (every layer's H from the dense model, one pass; OBC) or "sequential"
    (block by block, each block fed the already-compressed model's outputs; GPTQ).
    samples: number of calibration samples. batch_size: samples per forward pass (None: library
    default).
    """

    mode: str = "independent"
    samples: int = 128
    batch_size: int | None = None

    def __post_init__(self) -> None:
        self._normalize(("calibration",))

    def _normalize(self, path: tuple) -> None:
        if self.mode not in CALIBRATION_MODES:
            raise _fail(path, "mode", f"one of {list(CALIBRATION_MODES)}", self.mode)
        if not _is_int(self.samples) or self.samples < 1:
            raise _fail(path, "samples", "a positive integer", self.samples)
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise _fail(path, "batch_size", "a positive integer or null", self.batch_size)

    @classmethod
    def from_dict(cls, d: Mapping | None, path: tuple = ("calibration",)) -> CalibrationConfig:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise RecipeError(
                f"{_where(path)} must be a mapping with keys {', '.join(CALIBRATION_KEYS)}, "
                f"got {d!r}",
                path,
            )
        _check_keys(d, CALIBRATION_KEYS, path)
        # null means "the default"; validation errors then name calibration.<key>
        return cls(**{k: d[k] for k in CALIBRATION_KEYS if d.get(k) is not None})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "samples": self.samples}
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        return out


@dataclass
class Recipe:
    """A versioned, validated compression recipe (see the module docstring for the format)."""

    version: int = RECIPE_VERSION
    rules: list[Rule] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    seed: int = 0
    bn_recalibration: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.version) or self.version < 1:
            raise _fail((), "version", "a positive integer", self.version)
        if self.version > RECIPE_VERSION:
            raise RecipeError(
                f"version {self.version} is newer than this optbrain understands "
                f"(it reads recipe version {RECIPE_VERSION}); upgrade optbrain",
                ("version",),
            )
        if not isinstance(self.rules, list | tuple):
            raise _fail((), "rules", "a list of rules (mappings)", self.rules)
        rules = []
        for i, r in enumerate(self.rules):
            if isinstance(r, Rule):
                r._normalize(("rules", i), "recipe")
            elif isinstance(r, Mapping):
                r = Rule(**_normalize_rule(r, ("rules", i)))
            else:
                raise _fail(("rules",), i, "a mapping of rule keys", r)
            rules.append(r)
        self.rules = rules
        self.ignore = _check_patterns(self.ignore, (), "ignore", "recipe", True)
        if isinstance(self.calibration, Mapping):
            self.calibration = CalibrationConfig.from_dict(self.calibration)
        elif isinstance(self.calibration, CalibrationConfig):
            self.calibration._normalize(("calibration",))
        else:
            raise _fail((), "calibration", "a mapping", self.calibration)
        if not _is_int(self.seed):
            raise _fail((), "seed", "an integer", self.seed)
        if not isinstance(self.bn_recalibration, bool):
            raise _fail((), "bn_recalibration", "true or false", self.bn_recalibration)

    # ---------------------------------------------------------------- construction / output

    @classmethod
    def from_dict(cls, d: Mapping) -> Recipe:
        """Build from the full form (``rules: [...]``) or the short form (rule keys at top level,
        one rule targeting every layer; global keys may be mixed in)."""
        if not isinstance(d, Mapping):
            hint = " (if this is a file name, there is no such file)" if isinstance(d, str) else ""
            raise RecipeError(
                f"a recipe must be a mapping (e.g. {{method: obc, sparsity: 0.5}}), got {d!r}{hint}"
            )
        short = [k for k in d if k in RULE_KEYS and k != "ignore"]
        if "rules" in d and short:
            raise RecipeError(
                f"recipe: key {short[0]!r} belongs inside a rule when 'rules' is given "
                "(or drop 'rules' for the one-rule short form)",
                (short[0],),
            )
        allowed = GLOBAL_KEYS if "rules" in d else (*GLOBAL_KEYS, *short, *RULE_KEYS)
        _check_keys(d, dict.fromkeys(allowed), ())
        if "rules" in d:
            raw = d["rules"]
            if raw is None:
                raw = []
            if not isinstance(raw, list | tuple):
                raise _fail((), "rules", "a list of rules (mappings)", raw)
            rules = []
            for i, r in enumerate(raw):
                if not isinstance(r, Mapping):
                    raise _fail(("rules",), i, "a mapping of rule keys", r)
                rules.append(Rule(**_normalize_rule(r, ("rules", i))))
        elif short:
            rules = [Rule(**_normalize_rule({k: d[k] for k in short}, ()))]
        else:
            rules = []
        kw: dict[str, Any] = {"rules": rules}
        for key in ("version", "seed", "bn_recalibration"):
            if d.get(key) is not None:
                kw[key] = d[key]
        if d.get("ignore") is not None:
            kw["ignore"] = _check_patterns(d["ignore"], (), "ignore", "recipe", True)
        kw["calibration"] = CalibrationConfig.from_dict(d.get("calibration"))
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The full form as plain data; ``Recipe.from_dict(r.to_dict()) == r``."""
        out: dict[str, Any] = {
            "version": self.version,
            "calibration": self.calibration.to_dict(),
            "seed": self.seed,
            "bn_recalibration": self.bn_recalibration,
        }
        if self.ignore:
            out["ignore"] = list(self.ignore)
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> Recipe:
        """Load from a YAML file path, or from YAML text (a string with a newline, or one that
        is not an existing file and does not end in .yaml / .yml / .json). Errors name the file
        and line."""
        text, name = _read_source(source)
        try:
            data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
        except yaml.YAMLError as e:
            raise RecipeError(_yaml_message(e, name)) from None
        if data is None:
            raise RecipeError(f"{name}: the recipe is empty (expected a mapping)")
        try:
            return cls.from_dict(data)
        except RecipeError as e:
            line = _line_of(text, e.path)
            at = f", line {line}" if line else ""
            raise RecipeError(f"{name}{at}: {e}", e.path) from None

    def to_yaml(self) -> str:
        """Human-friendly YAML (unset keys omitted); ``Recipe.from_yaml(r.to_yaml()) == r``."""
        body = yaml.dump(
            self.to_dict(),
            Dumper=_Dumper,
            sort_keys=False,
            default_flow_style=None,
            allow_unicode=True,
            width=100,
        )
        return f"# optbrain compression recipe (format version {self.version})\n{body}"

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``to_yaml()`` to ``path``; returns the path."""
        p = Path(path)
        p.write_text(self.to_yaml(), encoding="utf-8")
        return p

    @classmethod
    def coerce(cls, x: Recipe | Mapping | str | os.PathLike) -> Recipe:
        """A Recipe as is; a mapping via ``from_dict``; a path or YAML text via ``from_yaml``."""
        if isinstance(x, Recipe):
            return x
        if isinstance(x, Mapping):
            return cls.from_dict(x)
        if isinstance(x, str | os.PathLike):
            return cls.from_yaml(x)
        raise TypeError(
            f"expected a Recipe, a mapping, or a YAML path/text, got {type(x).__name__}"
        )

    # ---------------------------------------------------------------- planning

    def plan(self, name: str) -> LayerPlan | None:
        """Merged settings for module ``name``; None if it is not targeted, is ignored or
        skipped, or nothing (sparsity > 0, N:M or bits) is asked of it."""
        if _matches(name, self.ignore):
            return None
        merged = copy.deepcopy(DEFAULTS)
        applied: list[int] = []
        for i, rule in enumerate(self.rules):
            if not rule.matches(name):
                continue
            applied.append(i)
            for key in rule.reset:
                merged[key] = copy.deepcopy(DEFAULTS[key])
            if rule.method is not None and rule.method != merged["method"]:
                merged["options"] = {}
            for key in SETTINGS:
                v = getattr(rule, key)
                if v is None:
                    continue
                if key == "options":
                    merged["options"].update(copy.deepcopy(v))
                    merged["options"] = {
                        k: x for k, x in merged["options"].items() if x is not None
                    }
                else:
                    merged[key] = v
        if not applied or merged["skip"]:
            return None
        pat = parse_pattern(merged["pattern"])
        sp = merged["sparsity"]
        if not ((sp is not None and sp > 0) or pat.kind == "nm" or merged["bits"] is not None):
            return None
        where = f"module {name!r} (rules {applied})"
        if pat.kind == "nm" and sp is not None and sp > 0 and abs(sp - pat.fixed_sparsity) > 1e-9:
            raise RecipeError(
                f"{where}: sparsity {sp:g} contradicts pattern {pat} (which fixes sparsity "
                f"{pat.fixed_sparsity:g}); set 'sparsity: null' in the rule that sets the pattern"
            )
        if pat.kind == "block" and (sp is None or sp == 0):
            raise RecipeError(f"{where}: pattern {pat} needs a sparsity > 0 (fraction of blocks)")
        return LayerPlan(
            method=merged["method"],
            sparsity=sp,
            pattern=str(pat),
            bits=merged["bits"],
            sym=merged["sym"],
            group_size=merged["group_size"],
            damp=merged["damp"],
            on_singular=merged["on_singular"],
            dtype=DTYPES[merged["dtype"]],
            options=merged["options"],
            rules=tuple(applied),
        )

    def plans(self, names: Iterable[str]) -> dict[str, LayerPlan]:
        """``{name: plan}`` for the given (compressible) module names that get a plan, in order."""
        out = {}
        for name in names:
            p = self.plan(name)
            if p is not None:
                out[name] = p
        return out

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """Patterns (other than ``*``) that match none of ``names``, e.g. ``rules[1].targets
        'encoder.*.dens'``: likely typos worth reporting."""
        names = list(names)
        out = []
        for i, rule in enumerate(self.rules):
            for key in ("targets", "ignore"):
                for p in getattr(rule, key):
                    if p != "*" and not _matches_some(p, names):
                        out.append(f"rules[{i}].{key} {p!r}")
        out += [f"ignore {p!r}" for p in self.ignore if not _matches_some(p, names)]
        return out


def _matches_some(pattern: str, names: list[str]) -> bool:
    return any(_compile(pattern).fullmatch(n) for n in names)


# ----------------------------------------------------------------------------- YAML plumbing

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_INT_RE = re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"
)
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader without base-60 numbers (``2:4`` stays a string), with ``1e-3`` as a float,
    and rejecting duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark,
                )
            if isinstance(key, str):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
_Loader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))


class _Dumper(yaml.SafeDumper):
    """Quotes any string that either YAML 1.1 or ``_Loader`` would read as a non-string."""


_Dumper.yaml_implicit_resolvers = {
    ch: list(resolvers) for ch, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()
}
_Dumper.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


def _read_source(source: str | os.PathLike) -> tuple[str, str]:
    """(text, name used in error messages) for a path or YAML text."""
    if isinstance(source, os.PathLike) or (
        isinstance(source, str)
        and "\n" not in source
        and (os.path.isfile(source) or source.lower().endswith((".yaml", ".yml", ".json")))
    ):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        return path.read_text(encoding="utf-8"), str(path)
    if not isinstance(source, str):
        raise TypeError(f"expected a path or YAML text, got {type(source).__name__}")
    return source, "recipe YAML"


def _yaml_message(e: yaml.YAMLError, name: str) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    msg = f"{context}: {problem}" if context else problem
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{name}{at}: invalid YAML: {msg}"


def _line_of(text: str, path: tuple) -> int | None:
    """1-based line of the node at ``path`` (or of its deepest existing ancestor)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:  # pragma: no cover - text already parsed once
        return None
    if node is None:
        return None
    line = node.start_mark.line + 1
    for step in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(step):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value)
        ):
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            return line
    return line


__all__ = [
    "CALIBRATION_MODES",
    "DEFAULTS",
    "KNOWN_METHODS",
    "RECIPE_VERSION",
    "CalibrationConfig",
    "LayerPlan",
    "Recipe",
    "RecipeError",
    "Rule",
    "allowed_methods",
]
