"""Tests for policy.rules: broken documents name file, line and field; lint; valid documents load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.model import Tier
from policy.rules import (
    DEFAULT_TARGET,
    PolicyError,
    PolicyIssue,
    Rule,
    cel_inputs,
    lint,
    load_rules,
    parse_duration,
    parse_host_pattern,
    parse_rate,
)

FIXTURES = Path(__file__).parent / "fixtures"
BROKEN = FIXTURES / "broken"
LINT = FIXTURES / "lint"
EXAMPLES = Path(__file__).parents[2] / "examples" / "policies"


def _issues(text: str, file: str = "policy.yaml") -> list[PolicyIssue]:
    with pytest.raises(PolicyError) as caught:
        load_rules(text, file=file)
    assert str(caught.value) == "\n".join(str(issue) for issue in caught.value.issues)
    return caught.value.issues


# -- broken fixtures -------------------------------------------------------------------------

# (fixture, line, field, message). A message ending in "…" is a prefix: the rest comes from the
# YAML or CEL library and is not ours to pin.
BROKEN_CASES: list[tuple[str, int, str, str]] = [
    ("bad_tier", 20, "rules[3].tier", "'T9' is not one of T0, T1, T2, T3, deny"),
    ("unknown_field", 11, "rules[1].priority", "unknown field"),
    ("bad_version", 1, "version", "2 is not a supported version (1)"),
    ("missing_rules", 1, "rules", "must be a list of rules"),
    (
        "bad_host",
        7,
        "rules[0].match.hosts[1]",
        "'api.github.com/repos' is a URL, not a host: write 'api.github.com' (paths go in match.paths)",
    ),
    (
        "wildcard_in_middle",
        5,
        "rules[0].match.hosts[0]",
        "'api.*.example.com': '*' is allowed only as a leading '*.' label",
    ),
    ("lower_case_method", 7, "rules[0].match.methods[1]", "'head' must be an upper-case HTTP method"),
    (
        "bad_path_template",
        8,
        "rules[0].match.paths[1]",
        "'/repos/{owner}/**/hooks': '**' is allowed only as the last segment",
    ),
    ("invalid_cel", 5, "rules[0].when", "invalid CEL: …"),
    ("unknown_cel_variable", 5, "rules[0].when", "unknown variable(s) form; use request or agent"),
    ("limits_on_t2", 8, "rules[0].limits", "limits apply to T1 rules only, this rule is T2"),
    ("bad_rate", 8, "rules[0].limits.rate", "'10/week' is not a rate like 10/m"),
    ("bad_ttl", 8, "rules[0].warrant.ttl", "'15 minutes' is not a duration like 30s, 15m or 1h"),
    (
        "warrant_on_t0",
        7,
        "rules[0].warrant",
        "warrant settings apply to T2/T3 rules only, this rule is T0",
    ),
    ("invalid_yaml", 4, "", "invalid YAML: did not find expected ',' or ']'"),
    (
        "duplicate_key",
        7,
        "",
        "invalid YAML: duplicate key 'tier' (first on line 6)",
    ),
    (
        "uncaptured_target",
        6,
        "rules[0].target",
        "'{owner}/{repo}' uses repo, which no path template of the rule captures",
    ),
    ("bad_default_tier", 2, "default_tier", "'t2' is not one of T0, T1, T2, T3, deny"),
    ("wildcard_ip", 4, "rules[0].match.hosts[0]", "'*.254.169.254': a wildcard cannot cover IP addresses"),
    ("numeric_host", 6, "rules[0].match.hosts[0]", "10.1 must be a string (quote it)"),
    ("max_uses_zero", 8, "rules[0].warrant.max_uses", "must be an integer 1-1000"),
    ("bad_bind", 8, "rules[0].warrant.bind", "'anything' is not one of exact, path, host, mcp"),
    ("empty_hosts", 5, "rules[0].match.hosts", "must be a non-empty list"),
    ("not_a_mapping", 1, "", "the document must be a mapping with version and rules"),
    ("bad_port", 4, "rules[0].match.hosts[0]", "'api.example.com:70000': port must be 1-65535"),
    ("missing_action", 3, "rules[0].action", "None must be a name like github.delete_repo"),
]


def test_every_broken_fixture_has_an_expectation() -> None:
    assert sorted(path.stem for path in BROKEN.glob("*.yaml")) == sorted(case[0] for case in BROKEN_CASES)
    assert len(BROKEN_CASES) >= 12


@pytest.mark.parametrize(
    ("fixture", "line", "field", "message"), BROKEN_CASES, ids=[c[0] for c in BROKEN_CASES]
)
def test_broken_policy_is_refused_with_file_line_and_field(
    fixture: str, line: int, field: str, message: str
) -> None:
    name = f"{fixture}.yaml"
    issues = _issues((BROKEN / name).read_text(), file=name)
    assert len(issues) == 1, [str(issue) for issue in issues]
    issue = issues[0]
    assert (issue.file, issue.line, issue.field) == (name, line, field)
    where = f"{field}: " if field else ""
    if message.endswith("…"):
        assert issue.message.startswith(message[:-1])
        assert str(issue).startswith(f"{name}:{line}: {where}{message[:-1]}")
    else:
        assert issue.message == message
        assert str(issue) == f"{name}:{line}: {where}{message}"


def test_every_problem_in_a_document_is_reported_in_order() -> None:
    text = (
        "version: 3\n"  # 1
        "shape: round\n"  # 2
        "rules:\n"  # 3
        "  - id: a\n"  # 4
        "    action: x\n"  # 5
        "    tier: T7\n"  # 6
        "  - id: b\n"  # 7
        "    match: {methods: [get], hosts: ['*']}\n"  # 8
        "    action: y\n"  # 9
        "    tier: T0\n"  # 10
    )
    assert [(issue.line, issue.field) for issue in _issues(text)] == [
        (2, "shape"),
        (1, "version"),
        (6, "rules[0].tier"),
        (8, "rules[1].match.hosts[0]"),
        (8, "rules[1].match.methods[0]"),
    ]


@pytest.mark.parametrize(
    ("rule", "field", "message"),
    [
        pytest.param("{id: 'a b', action: x, tier: T0}", "rules[0].id", "must be a name", id="id-with-space"),
        pytest.param("{id: a, action: 'x y', tier: T0}", "rules[0].action", "must be a name", id="action"),
        pytest.param("{id: a, action: x, tier: 2}", "rules[0].tier", "'2' is not one of", id="numeric-tier"),
        pytest.param(
            "{id: a, action: x, tier: T0, match: [GET]}",
            "rules[0].match",
            "must be a mapping",
            id="match-list",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, match: {verbs: [GET]}}",
            "rules[0].match.verbs",
            "unknown field",
            id="match-key",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, when: 3}",
            "rules[0].when",
            "must be a CEL expression",
            id="when-int",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, target: ''}",
            "rules[0].target",
            "must be a non-empty",
            id="empty-target",
        ),
        pytest.param(
            "{id: a, action: x, tier: T1, limits: {burst: 3}}",
            "rules[0].limits",
            "must be a mapping with rate",
            id="limits-key",
        ),
        pytest.param(
            "{id: a, action: x, tier: T2, warrant: {uses: 3}}",
            "rules[0].warrant.uses",
            "unknown field",
            id="warrant-key",
        ),
        pytest.param(
            "{id: a, action: x, tier: T2, warrant: 5m}",
            "rules[0].warrant",
            "must be a mapping",
            id="warrant-scalar",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, match: {paths: [a/b]}}",
            "rules[0].match.paths[0]",
            "must start with '/'",
            id="relative-path",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, match: {paths: ['/a/{x}/{x}']}}",
            "rules[0].match.paths[0]",
            "appears twice",
            id="variable-twice",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, match: {paths: ['/a/b*']}}",
            "rules[0].match.paths[0]",
            "'*' is allowed only",
            id="star-in-segment",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, match: {hosts: ['*.a.com']}}",
            None,
            None,
            id="wildcard-two-labels-ok",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, match: {hosts: ['*.com']}}",
            "rules[0].match.hosts[0]",
            "at least two labels",
            id="wildcard-one-label",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, match: {methods: ['GE T']}}",
            "rules[0].match.methods[0]",
            "upper-case HTTP method",
            id="method-space",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, match: {methods: [5]}}",
            "rules[0].match.methods[0]",
            "must be a string",
            id="method-number",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, when: 'request.headers.exists(h, h == \"x-admin\")'}",
            None,
            None,
            id="cel-macro-variable-ok",
        ),
        pytest.param(
            "{id: a, action: x, tier: T0, when: '[1].map(x, y) == [1]'}",
            "rules[0].when",
            "unknown variable(s) y",
            id="cel-free-variable-in-macro",
        ),
    ],
)
def test_rule_field_validation(rule: str, field: str | None, message: str | None) -> None:
    text = f"version: 1\nrules:\n  - {rule}\n"
    if field is None:
        load_rules(text)
        return
    issues = _issues(text)
    assert [(issue.line, issue.field) for issue in issues] == [(3, field)]
    assert message is not None
    assert message in issues[0].message


@pytest.mark.parametrize(
    "version", ["'1'", "1.5", "true", "null", "[1]"], ids=["string", "float", "bool", "null", "list"]
)
def test_only_integer_version_1_is_supported(version: str) -> None:
    issues = _issues(f"version: {version}\nrules: []\n")
    assert [(issue.line, issue.field) for issue in issues] == [(1, "version")]


# -- valid documents -------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_policy_loads_without_warnings(path: Path) -> None:
    text = path.read_text()
    rules = load_rules(text, file=path.name)
    assert rules.version == 1
    assert rules.rules
    assert rules.warnings == ()
    assert rules.revision == hashlib.sha256(text.encode()).hexdigest()
    assert rules.source == path.name


def test_revision_is_sha256_of_the_exact_text() -> None:
    text = "version: 1\nrules: []\n"
    assert load_rules(text).revision == hashlib.sha256(text.encode()).hexdigest()
    assert load_rules(text + "# comment\n").revision != load_rules(text).revision


def test_rule_fields_are_parsed() -> None:
    rules = load_rules((EXAMPLES / "github.yaml").read_text())
    delete = next(rule for rule in rules.rules if rule.id == "github-delete-repo")
    assert delete.index == 4
    assert delete.line == 26
    assert delete.tier is Tier.T3
    assert delete.methods == frozenset({"DELETE"})
    assert delete.target == "{owner}/{repo}"
    assert delete.paths is not None
    assert [p.source for p in delete.paths] == ["/repos/{owner}/{repo}"]
    assert delete.hosts is not None
    assert [(h.host, h.port, h.wildcard) for h in delete.hosts] == [("api.github.com", None, False)]
    comment = next(rule for rule in rules.rules if rule.id == "github-comment")
    assert comment.limits is not None
    assert (comment.limits.count, comment.limits.per_seconds) == (30, 60)
    merge = next(rule for rule in rules.rules if rule.id == "github-merge-pr")
    assert merge.warrant.ttl_seconds == 600
    read = rules.rules[0]
    assert read.target == DEFAULT_TARGET
    assert rules.default_tier is Tier.T3


def test_defaults_when_optional_fields_are_absent() -> None:
    rules = load_rules("version: 1\nrules:\n  - {id: a, action: x, tier: T2}\n")
    assert rules.default_tier is Tier.T3
    (rule,) = rules.rules
    assert (rule.hosts, rule.methods, rule.paths, rule.when) == (None, None, None, None)
    assert (rule.warrant.ttl_seconds, rule.warrant.max_uses, rule.warrant.bind) == (None, 1, "exact")
    assert rules.any_host == (0,)


def test_host_index_lists_rules_in_document_order() -> None:
    text = json.dumps(
        {
            "version": 1,
            "rules": [
                {
                    "id": "a",
                    "match": {"hosts": ["API.Example.com.", "api.example.com:8443"]},
                    "action": "x",
                    "tier": "T0",
                },
                {"id": "b", "match": {"hosts": ["*.example.com"]}, "action": "x", "tier": "T0"},
                {"id": "c", "action": "x", "tier": "T0"},
                {
                    "id": "d",
                    "match": {"hosts": ["api.example.com", "*.example.com"]},
                    "action": "x",
                    "tier": "T0",
                },
            ],
        }
    )
    rules = load_rules(text)
    assert dict(rules.by_exact_host) == {"api.example.com": (0, 3)}
    assert dict(rules.by_wildcard_suffix) == {"example.com": (1, 3)}
    assert rules.any_host == (2,)
    assert rules.named_hosts == frozenset({"api.example.com", "api.example.com:8443"})


@pytest.mark.parametrize(
    ("text", "host", "port", "wildcard"),
    [
        ("api.github.com", "api.github.com", None, False),
        ("API.GitHub.COM.", "api.github.com", None, False),
        ("api.github.com:8443", "api.github.com", 8443, False),
        ("*.example.com", "example.com", None, True),
        ("169.254.169.254", "169.254.169.254", None, False),
        ("0xa9fea9fe", "169.254.169.254", None, False),
        ("[fd00:ec2::254]:80", "fd00:ec2::254", 80, False),
        ("fd00:ec2::254", "fd00:ec2::254", None, False),
        ("bücher.example", "xn--bcher-kva.example", None, False),
    ],
)
def test_host_pattern_is_canonical(text: str, host: str, port: int | None, wildcard: bool) -> None:
    pattern = parse_host_pattern(text)
    assert (pattern.host, pattern.port, pattern.wildcard) == (host, port, wildcard)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " api.github.com",
        "a b",
        "api.*.com",
        "*",
        "*.",
        "a.com:0",
        "a.com:x",
        "[::1",
        "[::1]x",
        "*.10.0.0.1",
    ],
)
def test_bad_host_pattern_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_host_pattern(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("9999999s", 9999999)]
)
def test_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0s", "15", "15 m", "1d", "-1m", "1.5m", "", "10000000s"])
def test_bad_duration(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "count", "per"), [("10/m", 10, 60), ("1/s", 1, 1), ("500/h", 500, 3600)])
def test_rate(text: str, count: int, per: int) -> None:
    rate = parse_rate(text)
    assert (rate.count, rate.per_seconds) == (count, per)


@pytest.mark.parametrize("text", ["10", "0/m", "10/d", "10 / m", "m/10"])
def test_bad_rate(text: str) -> None:
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("source", "inputs"),
    [
        ("request.form.amount > 100000", frozenset({"form"})),
        ("agent.id == 'x' && request . json.a > 1", frozenset({"agent", "json"})),
        ("true", frozenset()),
        ("x.request.form == 1", frozenset()),
        ("request['form'].amount > 1", None),
        ("size(request) > 1", None),
        ("request.exists(k, k == 'a')", None),
        ("request.nope == 1", None),
        ("request.path == '/a' // request", None),
    ],
)
def test_cel_inputs_names_what_a_when_reads(source: str, inputs: frozenset[str] | None) -> None:
    assert cel_inputs(source) == inputs


# -- lint ------------------------------------------------------------------------------------


def test_shadowed_rule_is_a_warning_not_an_error() -> None:
    rules = load_rules((LINT / "shadowed.yaml").read_text(), file="shadowed.yaml")
    assert [str(w) for w in rules.warnings] == [
        "shadowed.yaml:9: rules[1]: rule 'github-delete-repo' is unreachable: "
        "rule 'github-writes' (line 5) matches everything it matches"
    ]


def test_duplicate_id_is_an_error() -> None:
    # rules are found again by id (warrant terms, rate limits), so a duplicate would borrow settings
    with pytest.raises(PolicyError) as raised:
        load_rules((LINT / "duplicate_id.yaml").read_text(), file="duplicate_id.yaml")
    assert [str(issue) for issue in raised.value.issues] == [
        "duplicate_id.yaml:7: rules[1].id: duplicate id 'read' (first on line 3)"
    ]


def _lint_of(rules: list[dict[str, object]]) -> list[str]:
    loaded = load_rules(json.dumps({"version": 1, "rules": rules}, indent=1))
    return [f"{w.field}: {w.message}" for w in loaded.warnings]


def _rule(rule_id: str, **fields: object) -> dict[str, object]:
    return {"id": rule_id, "action": "x", "tier": "T1", **fields}


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        pytest.param({}, {"match": {"hosts": ["a.com"]}}, True, id="any-host-covers-host"),
        pytest.param({"match": {"hosts": ["a.com"]}}, {}, False, id="host-does-not-cover-any-host"),
        pytest.param(
            {"match": {"hosts": ["*.a.com"]}},
            {"match": {"hosts": ["x.a.com"]}},
            True,
            id="wildcard-covers-name",
        ),
        pytest.param(
            {"match": {"hosts": ["*.a.com"]}}, {"match": {"hosts": ["a.com"]}}, False, id="wildcard-not-apex"
        ),
        pytest.param(
            {"match": {"hosts": ["*.a.com"]}}, {"match": {"hosts": ["*.a.com"]}}, True, id="same-wildcard"
        ),
        pytest.param(
            {"match": {"hosts": ["*.a.com"]}}, {"match": {"hosts": ["*.x.a.com"]}}, True, id="wider-wildcard"
        ),
        pytest.param(
            {"match": {"hosts": ["*.x.a.com"]}},
            {"match": {"hosts": ["*.a.com"]}},
            False,
            id="narrower-wildcard",
        ),
        pytest.param(
            {"match": {"hosts": ["a.com"]}},
            {"match": {"hosts": ["a.com", "b.com"]}},
            False,
            id="partial-hosts",
        ),
        pytest.param(
            {"match": {"hosts": ["a.com", "b.com"]}}, {"match": {"hosts": ["b.com"]}}, True, id="second-host"
        ),
        pytest.param(
            {"match": {"hosts": ["a.com:8443"]}}, {"match": {"hosts": ["a.com"]}}, False, id="port-narrower"
        ),
        pytest.param(
            {"match": {"hosts": ["a.com"]}},
            {"match": {"hosts": ["a.com:8443"]}},
            True,
            id="any-port-covers-port",
        ),
        pytest.param(
            {"match": {"methods": ["GET", "POST"]}},
            {"match": {"methods": ["GET"]}},
            True,
            id="methods-superset",
        ),
        pytest.param(
            {"match": {"methods": ["GET"]}},
            {"match": {"methods": ["GET", "POST"]}},
            False,
            id="methods-subset",
        ),
        pytest.param(
            {"match": {"paths": ["/a/**"]}}, {"match": {"paths": ["/a/{x}"]}}, True, id="rest-covers-variable"
        ),
        pytest.param(
            {"match": {"paths": ["/a/{x}"]}},
            {"match": {"paths": ["/a/b"]}},
            True,
            id="variable-covers-literal",
        ),
        pytest.param(
            {"match": {"paths": ["/a/b"]}}, {"match": {"paths": ["/a/{x}"]}}, False, id="literal-not-variable"
        ),
        pytest.param({"match": {"paths": ["/A/b"]}}, {"match": {"paths": ["/a/B"]}}, True, id="literal-case"),
        pytest.param({"when": "request.method == 'GET'"}, {}, False, id="when-never-shadows"),
        pytest.param({}, {"when": "request.method == 'GET'"}, True, id="when-rule-can-be-shadowed"),
    ],
)
def test_lint_shadowing(earlier: dict[str, object], later: dict[str, object], shadowed: bool) -> None:
    warnings = _lint_of([_rule("first", **earlier), _rule("second", **later)])
    expected = ["rules[1]: rule 'second' is unreachable: rule 'first' (line 4) matches everything it matches"]
    assert warnings == (expected if shadowed else [])


def test_lint_names_the_first_covering_rule() -> None:
    warnings = _lint_of(
        [
            _rule("host", match={"hosts": ["a.com"], "methods": ["POST"]}),
            _rule("any"),
            _rule("wild", match={"hosts": ["*.x.com"]}),
            _rule("late", match={"hosts": ["y.x.com"], "methods": ["GET"]}),
        ]
    )
    assert [w.split(":")[0] for w in warnings] == ["rules[2]", "rules[3]"]
    assert "rule 'any'" in warnings[1]


_LINT_HOSTS = ["a.com", "b.a.com", "c.b.a.com", "*.a.com", "*.b.a.com", "a.com:8443", "*.a.com:8443", "c.org"]
_LINT_RULE = st.fixed_dictionaries(
    {},
    optional={
        "hosts": st.lists(st.sampled_from(_LINT_HOSTS), min_size=1, max_size=3),
        "methods": st.lists(st.sampled_from(["GET", "POST", "PUT"]), min_size=1, max_size=3, unique=True),
        "paths": st.lists(
            st.sampled_from(["/", "/a", "/a/{x}", "/a/**", "/**", "/{x}/b"]), min_size=1, max_size=2
        ),
        "when": st.just("request.method == 'GET'"),
    },
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_LINT_RULE, max_size=12))
def test_indexed_lint_equals_comparing_every_pair(specs: list[dict[str, object]]) -> None:
    rules: list[dict[str, object]] = []
    for number, spec in enumerate(specs):
        when = spec.pop("when", None)
        rule = _rule(f"r{number}", match=spec) if spec else _rule(f"r{number}")
        if when is not None:
            rule["when"] = when
        rules.append(rule)
    loaded = load_rules(json.dumps({"version": 1, "rules": rules}))
    assert lint(loaded.rules) == list(loaded.warnings)
    assert [w.message for w in loaded.warnings] == _naive_lint(loaded.rules)


def _naive_lint(rules: tuple[Rule, ...]) -> list[str]:
    """The pairwise reference: every earlier rule is compared with every later one."""
    from policy.rules import _covers  # the relation itself is what the index must preserve

    messages = []
    for position, rule in enumerate(rules):
        for earlier in rules[:position]:
            if earlier.when is None and _covers(earlier, rule):
                messages.append(
                    f"rule {rule.id!r} is unreachable: rule {earlier.id!r} (line {earlier.line}) matches everything it matches"
                )
                break
    return messages
