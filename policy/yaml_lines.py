"""YAML text → plain values that remember their line: libyaml's parser, YAML 1.2 core-schema scalars.

A pure-Python round-trip parser took ten seconds for a 10,000-rule policy. libyaml (through PyYAML's
C binding) parses into events, built into values here; plain scalars are resolved with the YAML 1.2
core schema (so `yes`, `on`, `010` or `1:20` mean what YAML 1.2 says, not what 1.1 says), and a key
given twice in one mapping is an error, never a silent last-wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
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


# libyaml's parser through PyYAML's C binding (the pure-Python one when libyaml is missing).
_Loader: Any = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


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
        return _build(yaml.parse(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlProblem(mark.line + 1 if mark else 1, exc.problem or str(exc).splitlines()[0]) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(1, str(exc).splitlines()[0] if str(exc) else "invalid YAML") from None


_NO_KEY = object()
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_VALUE_EVENTS = (yaml.ScalarEvent, yaml.AliasEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)


def _build(events: Iterator[yaml.Event]) -> Any:
    """Values from libyaml's event stream. Events come one at a time from C, so a thread loading a big
    policy gives the GIL back between them (a whole-document compose held it ~100 ms at a time)."""
    stack: list[tuple[LineMap | LineSeq, list[Any]]] = []  # container, [pending key, its line]
    anchors: dict[str, Any] = {}
    document: Any = None
    documents = 0
    for event in events:
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, _VALUE_EVENTS):
            value = _value(event, line, anchors, depth=len(stack))
            anchor = getattr(event, "anchor", None)
            if anchor and not isinstance(event, yaml.AliasEvent):
                anchors[anchor] = value
            if stack:
                _add(stack[-1], value, line)
            else:
                document = value
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                stack.append((value, [_NO_KEY, 0]))
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            stack.pop()
        elif isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise YamlProblem(line, "only one YAML document is allowed")
    return document


def _value(event: yaml.Event, line: int, anchors: dict[str, Any], *, depth: int) -> Any:
    if isinstance(event, yaml.AliasEvent):
        if event.anchor not in anchors:
            raise YamlProblem(line, f"unknown alias {event.anchor!r}")
        return anchors[event.anchor]
    if isinstance(event, yaml.ScalarEvent):
        return _scalar(event, line)
    assert isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent)
    default = _MAP_TAG if isinstance(event, yaml.MappingStartEvent) else _SEQ_TAG
    if event.tag not in (None, "!", default):
        raise YamlProblem(line, f"unsupported tag {event.tag!r}")
    if depth >= _MAX_DEPTH:
        raise YamlProblem(line, "nested too deeply")
    if isinstance(event, yaml.MappingStartEvent):
        mapping = LineMap()
        mapping.line, mapping.key_lines = line, {}
        return mapping
    seq = LineSeq()
    seq.line, seq.item_lines = line, []
    return seq


def _add(top: tuple[LineMap | LineSeq, list[Any]], value: Any, line: int) -> None:
    container, pending = top
    if isinstance(container, LineSeq):
        container.append(value)
        container.item_lines.append(line)
        return
    if pending[0] is _NO_KEY:
        if isinstance(value, LineMap | LineSeq):
            raise YamlProblem(line, "a mapping key must be a scalar")
        if value in container:
            raise YamlProblem(line, f"duplicate key {value!r} (first on line {container.key_lines[value]})")
        pending[0], pending[1] = value, line
        return
    container[pending[0]] = value
    container.key_lines[pending[0]] = pending[1]
    pending[0] = _NO_KEY


def _scalar(event: yaml.ScalarEvent, line: int) -> Any:
    value: str = event.value
    if event.style in ("'", '"', "|", ">"):
        if event.tag not in (None, "!", _STR_TAG):
            raise YamlProblem(line, f"unsupported tag {event.tag!r}")
        return value
    if event.tag is not None and event.tag not in _PLAIN_TAGS:
        raise YamlProblem(line, f"unsupported tag {event.tag!r}")
    if event.tag == _STR_TAG:
        return value  # an explicit `!!str`: the text stays text
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
