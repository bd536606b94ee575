"""The recipe's YAML dialect: a loader (``2:4`` a string, ``1e-3`` a float, no duplicate keys),
a dumper that quotes what the loader would misread, and error locations (file and line)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

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


class Loader(yaml.SafeLoader):
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


Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
Loader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))


class Dumper(yaml.SafeDumper):
    """Quotes any string that either YAML 1.1 or ``Loader`` would read as a non-string."""


Dumper.yaml_implicit_resolvers = {
    ch: list(resolvers) for ch, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()
}
Dumper.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


def read_source(source: str | os.PathLike) -> tuple[str, str]:
    """(text, name used in error messages) for a path or YAML text."""
    if isinstance(source, os.PathLike) or (
        isinstance(source, str)
        and "\n" not in source
        and (os.path.isfile(source) or source.lower().endswith((".yaml", ".yml", ".json")))
    ):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"recipe file {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                "save it as UTF-8"
            ) from None
    if not isinstance(source, str):
        raise TypeError(f"expected a path or YAML text, got {type(source).__name__}")
    return source, "recipe YAML"


def yaml_message(e: yaml.YAMLError, name: str) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    msg = f"{context}: {problem}" if context else problem
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{name}{at}: invalid YAML: {msg}"


def line_of(text: str, path: tuple) -> int | None:
    """1-based line of the node at ``path`` (or of its deepest existing ancestor)."""
    try:
        node = yaml.compose(text, Loader=Loader)
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


def load(text: str) -> object:
    """Parse recipe YAML text with ``Loader`` (a SafeLoader subclass)."""
    return yaml.load(text, Loader=Loader)


def dump(data: object) -> str:
    """Human-friendly YAML of plain data, readable back by ``load``."""
    return yaml.dump(
        data,
        Dumper=Dumper,
        sort_keys=False,
        default_flow_style=None,
        allow_unicode=True,
        width=100,
    )
