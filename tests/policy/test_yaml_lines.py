"""The policy YAML loader: YAML 1.2 core-schema scalars, lines for every key and item, no silent duplicates."""

from __future__ import annotations

import math
import time

import pytest

from policy.rules import load_rules
from policy.yaml_lines import LineMap, LineSeq, YamlProblem, load_yaml


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("yes", "yes"),  # YAML 1.1 would say True: a host or id named `yes` stays text
        ("on", "on"),
        ("No", "No"),
        ("true", True),
        ("FALSE", False),
        ("~", None),
        ("null", None),
        ("010", 10),  # 1.2 decimal, not 1.1 octal
        ("0o17", 15),
        ("0x1F", 31),
        ("1:20", "1:20"),  # 1.1 sexagesimal would make it 80
        ("1.10", 1.1),
        ("-3", -3),
        ("'123'", "123"),
        ('"true"', "true"),
        ("api.example.com", "api.example.com"),
        ("T0", "T0"),
        ("2001-12-14", "2001-12-14"),
    ],
)
def test_plain_scalars_follow_the_yaml_1_2_core_schema(text: str, value: object) -> None:
    assert load_yaml(f"k: {text}\n")["k"] == value


def test_infinity_and_nan() -> None:
    loaded = load_yaml("a: .inf\nb: -.Inf\nc: .nan\n")
    assert loaded["a"] == math.inf and loaded["b"] == -math.inf and math.isnan(loaded["c"])


def test_every_key_and_item_knows_its_line() -> None:
    loaded = load_yaml("version: 1\nrules:\n  - id: a\n    tier: T0\n  - id: b\n")
    assert isinstance(loaded, LineMap) and loaded.key_lines == {"version": 1, "rules": 2}
    rules = loaded["rules"]
    assert isinstance(rules, LineSeq) and rules.item_lines == [3, 5]
    assert rules[0].key_lines == {"id": 3, "tier": 4}


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a' (first on line 1)"),
        ("a: !!binary aGVsbG8=\n", 1, "unsupported tag"),
        ("a: !custom x\n", 1, "unsupported tag"),
        ("a: [1, 2\n", 2, "expected"),
        ("? [1]\n: x\n", 1, "mapping key must be a scalar"),
    ],
)
def test_bad_documents_name_their_line(text: str, line: int, words: str) -> None:
    with pytest.raises(YamlProblem) as raised:
        load_yaml(text)
    assert raised.value.line == line
    assert words in raised.value.message


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    with pytest.raises(YamlProblem, match="nested too deeply"):
        load_yaml("a: " + "[" * 200 + "]" * 200 + "\n")


def test_aliases_resolve_to_the_same_values() -> None:
    loaded = load_yaml("hosts: &h [a.example, b.example]\nagain: *h\n")
    assert loaded["again"] == ["a.example", "b.example"]


def test_ten_thousand_rules_load_and_index() -> None:
    lines = ["version: 1", "default_tier: T3", "rules:"]
    for i in range(10_000):
        lines += [
            f"  - id: r{i}",
            f'    match: {{hosts: [h{i}.example.com], methods: [GET], paths: ["/a/{{x}}/b{i}"]}}',
            f"    action: a.r{i}",
            "    tier: T1",
        ]
    started = time.perf_counter()
    rules = load_rules("\n".join(lines) + "\n")
    elapsed = time.perf_counter() - started
    assert len(rules.rules) == 10_000 and rules.by_exact_host["h9999.example.com"] == (9999,)
    print(f"10,000 rules loaded in {elapsed:.2f} s")  # measured in bench/decide.py, never asserted
