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
    refit: false                         # true: then refit every layer to the dense outputs
    allocation: uniform                  # or owl: per-block sparsity from activation outliers
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
A pattern that is a bare identifier starting with a capital (``Linear``, ``Conv2d``,
``Conv1D``) is also a class-name target: it matches every module of that class or a subclass
(``targets: [Linear]``, ``ignore: [Conv2d]``).

**Presets.** ``preset: NAME`` in a rule (or in the short form) stands for settings
(``recipe_rules.PRESETS``): ``w4a16`` / ``w8a16`` (4 / 8-bit weights in groups of 128),
``2:4``, ``2:4+w4`` (2:4 sparsity and 4-bit groups of 128) and ``N%`` (unstructured sparsity,
e.g. ``50%``). Keys the rule sets itself override the preset's; the expanded settings are
validated like any other and written out in ``to_dict`` (the preset name is not kept).

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

**Allocation.** ``allocation: owl`` (or ``{method: owl, outlier_m: 5, lam: 0.08}``) moves the
unstructured sparsity of every pruned layer by its block's OWL offset (blocks with more
activation outliers pruned less, the parameter-weighted mean unchanged;
``optbrain.pipeline.owl``); ``uniform`` (the default) keeps the rules' sparsities as they are.

YAML is read with YAML 1.1 rules except that ``2:4`` is a string (not the base-60 integer 124)
and ``1e-3`` is a float (not a string); duplicate keys are an error.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import recipe_yaml
from .core.patterns import parse_pattern
from .core.spec import DTYPES
from .core.targets import NO_REFIT_METHODS
from .recipe_globals import CalibrationConfig, SparsityAllocation
from .recipe_rules import (
    CALIBRATION_MODES,
    DEFAULTS,
    GLOBAL_KEYS,
    KNOWN_METHODS,
    RECIPE_VERSION,
    RULE_KEYS,
    SETTINGS,
    LayerPlan,
    RecipeError,
    Rule,
    _check_keys,
    _check_patterns,
    _fail,
    _is_int,
    _matches,
    _matches_some,
    _normalize_rule,
    allowed_methods,
    check_merged,
)


@dataclass
class Recipe:
    """A versioned, validated compression recipe (see the module docstring for the format)."""

    version: int = RECIPE_VERSION
    rules: list[Rule] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    seed: int = 0
    bn_recalibration: bool = False
    refit: bool = False
    allocation: SparsityAllocation = field(default_factory=SparsityAllocation)

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
        if self.calibration.targets == "dense":
            for i, r in enumerate(self.rules):
                if r.method in NO_REFIT_METHODS:
                    raise RecipeError(
                        f"recipe.rules[{i}].method: {r.method!r} does not refit weights from H, "
                        "so calibration targets: dense cannot apply to it; use obc, gptq, "
                        "sparsegpt or auto, or targets: compressed",
                        ("rules", i, "method"),
                    )
        if not _is_int(self.seed):
            raise _fail((), "seed", "an integer", self.seed)
        if not isinstance(self.bn_recalibration, bool):
            raise _fail((), "bn_recalibration", "true or false", self.bn_recalibration)
        if not isinstance(self.refit, bool):
            raise _fail((), "refit", "true or false", self.refit)
        self.allocation = SparsityAllocation.from_value(self.allocation)

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
        for key in ("version", "seed", "bn_recalibration", "refit"):
            if d.get(key) is not None:
                kw[key] = d[key]
        if d.get("ignore") is not None:
            kw["ignore"] = _check_patterns(d["ignore"], (), "ignore", "recipe", True)
        kw["calibration"] = CalibrationConfig.from_dict(d.get("calibration"))
        kw["allocation"] = SparsityAllocation.from_value(d.get("allocation"))
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The full form as plain data; ``Recipe.from_dict(r.to_dict()) == r``."""
        out: dict[str, Any] = {
            "version": self.version,
            "calibration": self.calibration.to_dict(),
            "seed": self.seed,
            "bn_recalibration": self.bn_recalibration,
        }
        if self.refit:  # written only when set: older dicts (journal keys) stay equal
            out["refit"] = True
        if self.allocation.method != "uniform":  # written only when set: older dicts stay equal
            out["allocation"] = self.allocation.to_value()
        if self.ignore:
            out["ignore"] = list(self.ignore)
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> Recipe:
        """Load from a YAML file path, or from YAML text (a string with a newline, or one that
        is not an existing file and does not end in .yaml / .yml / .json). Errors name the file
        and line."""
        text, name = recipe_yaml.read_source(source)
        try:
            data = recipe_yaml.load(text)
        except yaml.YAMLError as e:
            raise RecipeError(recipe_yaml.yaml_message(e, name)) from None
        if data is None:
            raise RecipeError(f"{name}: the recipe is empty (expected a mapping)")
        try:
            return cls.from_dict(data)
        except RecipeError as e:
            line = recipe_yaml.line_of(text, e.path)
            at = f", line {line}" if line else ""
            raise RecipeError(f"{name}{at}: {e}", e.path) from None

    def to_yaml(self) -> str:
        """Human-friendly YAML (unset keys omitted); ``Recipe.from_yaml(r.to_yaml()) == r``."""
        body = recipe_yaml.dump(self.to_dict())
        return f"# optbrain compression recipe (format version {self.version})\n{body}"

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``to_yaml()`` to ``path`` atomically (UTF-8); returns the path."""
        from ._files import atomic_write

        p = Path(path)
        atomic_write(p, self.to_yaml())
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

    def plan(self, name: str, classes: Iterable[str] = ()) -> LayerPlan | None:
        """Merged settings for module ``name`` (whose class and bases are named ``classes``,
        for class-name targets); None if it is not targeted, is ignored or skipped, or
        nothing (sparsity > 0, N:M or bits) is asked of it."""
        classes = tuple(classes)
        if _matches(name, self.ignore, classes):
            return None
        merged = copy.deepcopy(DEFAULTS)
        applied: list[int] = []
        for i, rule in enumerate(self.rules):
            if not rule.matches(name, classes):
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
        if not (sp or pat.kind == "nm" or merged["bits"] is not None):
            return None
        where = f"module {name!r} (rules {applied})"
        check_merged(merged["pattern"], sp, where, merged["bits"], merged["sym"])
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

    def unmatched(self, names: Iterable[str], classes: Iterable[str] = ()) -> list[str]:
        """Patterns (other than ``*``) that match none of ``names`` (nor, for a class-name
        pattern, any of ``classes``), e.g. ``rules[1].targets 'encoder.*.dens'``: likely
        typos worth reporting."""
        names = list(names)
        classes = set(classes)
        out = []
        for i, rule in enumerate(self.rules):
            for key in ("targets", "ignore"):
                for p in getattr(rule, key):
                    if p != "*" and not _matches_some(p, names, classes):
                        out.append(f"rules[{i}].{key} {p!r}")
        out += [f"ignore {p!r}" for p in self.ignore if not _matches_some(p, names, classes)]
        return out


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
