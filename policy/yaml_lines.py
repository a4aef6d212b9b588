"""YAML text → plain values that remember their line: libyaml's composer, YAML 1.2 core-schema scalars.

Policies of 10,000 rules must load in well under a second; a pure-Python round-trip parser took ten.
libyaml (through PyYAML's C binding, with no implicit resolver of its own) composes the node tree;
plain scalars are resolved here with the YAML 1.2 core schema (so `yes`, `on`, `010` or `1:20` stay what YAML 1.2 says, not what 1.1 says), and a key given
twice in one mapping is an error, never a silent last-wins.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

_NULL = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE = frozenset({"true", "True", "TRUE"})
_FALSE = frozenset({"false", "False", "FALSE"})
_INT = re.compile(r"[-+]?[0-9]+")
_OCT = re.compile(r"0o[0-7]+")
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(inf|Inf|INF)")
_NAN = frozenset({".nan", ".NaN", ".NAN"})
_STR_TAG = "tag:yaml.org,2002:str"
_PLAIN_TAGS = frozenset(
    {
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp",
        "tag:yaml.org,2002:value",
        "tag:yaml.org,2002:merge",
        _STR_TAG,
    }
)
_MAX_DEPTH = 64
_MAYBE_NOT_TEXT = frozenset("~nNtTfF0123456789+-.")


_BASE_LOADER: Any = getattr(yaml, "CBaseLoader", yaml.BaseLoader)
_DEFAULT_TAGS = {
    yaml.ScalarNode: "tag:yaml.org,2002:str",
    yaml.SequenceNode: "tag:yaml.org,2002:seq",
    yaml.MappingNode: "tag:yaml.org,2002:map",
}


class _Loader(_BASE_LOADER):  # type: ignore[misc]
    """libyaml's parser and composer; untagged nodes get the default tag, resolved later in _scalar."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        return _DEFAULT_TAGS[kind]


class YamlProblem(ValueError):
    """Text that is not acceptable YAML; `line` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class LineMap(dict[Any, Any]):
    """A mapping that knows its own line and the line of each key (1-based)."""

    line: int
    key_lines: dict[Any, int]


class LineSeq(list[Any]):
    """A sequence that knows its own line and the line of each item (1-based)."""

    line: int
    item_lines: list[int]


def load_yaml(text: str) -> Any:
    """The one document in `text` as LineMap / LineSeq / scalars. Raises YamlProblem."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlProblem(mark.line + 1 if mark else 1, exc.problem or str(exc).splitlines()[0]) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(1, str(exc).splitlines()[0] if str(exc) else "invalid YAML") from None
    if node is None:
        return None
    return _construct(node, 0)


def _construct(node: yaml.Node, depth: int) -> Any:
    line = node.start_mark.line + 1
    if depth > _MAX_DEPTH:
        raise YamlProblem(line, "nested too deeply")
    if isinstance(node, yaml.ScalarNode):
        return _scalar(node, line)
    if isinstance(node, yaml.SequenceNode):
        _check_tag(node, "tag:yaml.org,2002:seq", line)
        seq = LineSeq(_construct(item, depth + 1) for item in node.value)
        seq.line = line
        seq.item_lines = [item.start_mark.line + 1 for item in node.value]
        return seq
    if isinstance(node, yaml.MappingNode):
        _check_tag(node, "tag:yaml.org,2002:map", line)
        mapping = LineMap()
        mapping.line = line
        mapping.key_lines = {}
        for key_node, value_node in node.value:
            key = _construct(key_node, depth + 1)
            key_line = key_node.start_mark.line + 1
            if isinstance(key, LineMap | LineSeq):
                raise YamlProblem(key_line, "a mapping key must be a scalar")
            if key in mapping:
                raise YamlProblem(key_line, f"duplicate key {key!r} (first on line {mapping.key_lines[key]})")
            mapping[key] = _construct(value_node, depth + 1)
            mapping.key_lines[key] = key_line
        return mapping
    raise YamlProblem(line, "unsupported YAML node")  # pragma: no cover


def _check_tag(node: yaml.Node, default: str, line: int) -> None:
    if node.tag != default:
        raise YamlProblem(line, f"unsupported tag {node.tag!r}")


def _scalar(node: yaml.ScalarNode, line: int) -> Any:
    value: str = node.value
    if node.style in ("'", '"', "|", ">"):
        return value
    if node.tag not in _PLAIN_TAGS:
        raise YamlProblem(line, f"unsupported tag {node.tag!r}")
    if value and value[0] not in _MAYBE_NOT_TEXT:
        return value  # the common case (names, hosts, tiers): no other type starts this way
    if value in _NULL:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if _INT.fullmatch(value):
        return int(value)
    if _OCT.fullmatch(value):
        return int(value[2:], 8)
    if _HEX.fullmatch(value):
        return int(value[2:], 16)
    if _FLOAT.fullmatch(value):
        return float(value)
    if _INF.fullmatch(value):
        return -math.inf if value.startswith("-") else math.inf
    if value in _NAN:
        return math.nan
    return value
