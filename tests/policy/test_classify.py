"""Tests for policy.classify: first match in document order through the host index, CEL failing closed."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.classify import Classification, candidate_rules, cel_context, classify
from policy.model import Request, Tier, highest_tier
from policy.rules import HostPattern, Rule, RuleSet, load_rules
from policy.templates import render_target
from tests.policy.golden import GoldenCase, load_cases

AGENT = "agent-1"
FORM = (("content-type", "application/x-www-form-urlencoded"),)
JSON = (("content-type", "application/json"),)


def _policy(rules: Sequence[Mapping[str, object]], default_tier: str = "T3") -> RuleSet:
    return load_rules(json.dumps({"version": 1, "default_tier": default_tier, "rules": rules}, indent=1))


def _request(
    method: str = "GET",
    host: str = "api.example.com",
    path: str = "/",
    *,
    port: int = 443,
    query: str = "",
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
    scheme: str = "https",
) -> Request:
    return Request(
        method=method, scheme=scheme, host=host, port=port, path=path, query=query, headers=headers, body=body
    )


def _summary(found: Classification) -> tuple[str | None, str, str, Tier, str]:
    return (found.intent.rule, found.intent.action, found.intent.target, found.tier, found.reason_code)


# -- golden ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", load_cases(), ids=lambda case: case.name)
def test_golden_intent(case: GoldenCase) -> None:
    found = classify(case.request(), case.rules(), agent=AGENT)
    expect = case.expect
    assert (found.intent.action, found.intent.target, found.intent.rule) == (
        expect["action"],
        expect["target"],
        expect["rule"],
    )
    assert found.rule is None if expect["rule"] is None else found.rule is not None
    if case.classified is not None:
        assert found.reason_code == case.classified


# -- first match, hosts, methods, paths, targets ---------------------------------------------

TABLE_POLICY: list[dict[str, object]] = [
    {"id": "deny-admin", "match": {"paths": ["/admin/**"]}, "action": "admin", "tier": "deny"},
    {"id": "alt-port", "match": {"hosts": ["api.example.com:8443"]}, "action": "alt", "tier": "T2"},
    {
        "id": "item",
        "match": {"hosts": ["api.example.com"], "methods": ["DELETE"], "paths": ["/items/{item}"]},
        "action": "item.delete",
        "target": "{item}",
        "tier": "T3",
    },
    {
        "id": "nested",
        "match": {"hosts": ["api.example.com"], "paths": ["/orgs/{org}/**"]},
        "action": "org",
        "target": "{org} via {method} {scheme}://{host}:{port}{path}?{query}",
        "tier": "T2",
    },
    {
        "id": "read",
        "match": {"hosts": ["api.example.com", "*.example.org"], "methods": ["GET"]},
        "action": "read",
        "tier": "T0",
    },
    {
        "id": "wild-write",
        "match": {"hosts": ["*.example.org"]},
        "action": "org.write",
        "target": "fixed",
        "tier": "T1",
    },
    {"id": "any-post", "match": {"methods": ["POST"]}, "action": "post", "tier": "T2"},
]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        pytest.param(_request("GET"), ("read", "read", "api.example.com/", Tier.T0), id="exact-host"),
        pytest.param(
            _request("GET", path="/admin/users"),
            ("deny-admin", "admin", "api.example.com/admin/users", Tier.DENY),
            id="earlier-any-host-rule-wins",
        ),
        pytest.param(
            _request("GET", path="/admin"),
            ("deny-admin", "admin", "api.example.com/admin", Tier.DENY),
            id="rest-matches-empty",
        ),
        pytest.param(
            _request("GET", path="/ADMIN/x"),
            ("deny-admin", "admin", "api.example.com/ADMIN/x", Tier.DENY),
            id="literal-case-insensitive",
        ),
        pytest.param(
            _request("GET", port=8443), ("alt-port", "alt", "api.example.com/", Tier.T2), id="port-pattern"
        ),
        pytest.param(
            _request("DELETE", path="/items/42"), ("item", "item.delete", "42", Tier.T3), id="captured-target"
        ),
        pytest.param(
            _request("DELETE", path="/items/42/"), ("item", "item.delete", "42", Tier.T3), id="trailing-slash"
        ),
        pytest.param(
            _request("DELETE", path="/items/Ab%20c"),
            ("item", "item.delete", "Ab%20c", Tier.T3),
            id="capture-keeps-case-and-escapes",
        ),
        pytest.param(
            _request("DELETE", path="/items"),
            (None, "unmatched", "api.example.com/items", Tier.T3),
            id="missing-segment-default",
        ),
        pytest.param(
            _request("DELETE", path="/items/42/x"),
            (None, "unmatched", "api.example.com/items/42/x", Tier.T3),
            id="extra-segment-default",
        ),
        pytest.param(
            _request("PUT", path="/orgs/acme/teams", query="page=2"),
            ("nested", "org", "acme via PUT https://api.example.com:443/orgs/acme/teams?page=2", Tier.T2),
            id="builtin-target-variables",
        ),
        pytest.param(
            _request("GET", host="eu.example.org"),
            ("read", "read", "eu.example.org/", Tier.T0),
            id="wildcard-in-same-rule",
        ),
        pytest.param(
            _request("PATCH", host="a.b.example.org"),
            ("wild-write", "org.write", "fixed", Tier.T1),
            id="wildcard-deep",
        ),
        pytest.param(
            _request("PATCH", host="example.org"),
            (None, "unmatched", "example.org/", Tier.T3),
            id="wildcard-not-apex",
        ),
        pytest.param(
            _request("PATCH", host="badexample.org"),
            (None, "unmatched", "badexample.org/", Tier.T3),
            id="wildcard-label-boundary",
        ),
        pytest.param(
            _request("POST", host="other.net"),
            ("any-post", "post", "other.net/", Tier.T2),
            id="any-host-rule",
        ),
        pytest.param(
            _request("POST", host="api.example.com"),
            ("any-post", "post", "api.example.com/", Tier.T2),
            id="host-rules-then-any-host",
        ),
        pytest.param(
            _request("GET", host="other.net"), (None, "unmatched", "other.net/", Tier.T3), id="default-tier"
        ),
    ],
)
def test_first_matching_rule_in_document_order(
    request_: Request, expected: tuple[str | None, str, str, Tier]
) -> None:
    found = classify(request_, _policy(TABLE_POLICY), agent=AGENT)
    assert (found.intent.rule, found.intent.action, found.intent.target, found.tier) == expected
    assert found.reason_code == ("policy.rule" if expected[0] else "policy.default_tier")
    assert (found.rule.id if found.rule else None) == expected[0]


def test_default_tier_applies_when_nothing_matches() -> None:
    for tier in ("T0", "T1", "T2", "T3", "deny"):
        found = classify(_request(), _policy([], default_tier=tier), agent=AGENT)
        assert found.tier is Tier.parse(tier)
        assert (found.intent.action, found.intent.rule, found.reason_code) == (
            "unmatched",
            None,
            "policy.default_tier",
        )


def test_candidates_come_in_document_order_without_duplicates() -> None:
    rules = _policy(
        [
            {"id": "r0", "action": "x", "tier": "T0"},
            {
                "id": "r1",
                "match": {"hosts": ["a.b.example.com", "*.example.com", "*.b.example.com"]},
                "action": "x",
                "tier": "T0",
            },
            {"id": "r2", "match": {"hosts": ["*.b.example.com"]}, "action": "x", "tier": "T0"},
            {"id": "r3", "match": {"hosts": ["other.com"]}, "action": "x", "tier": "T0"},
            {"id": "r4", "action": "x", "tier": "T0"},
            {"id": "r5", "match": {"hosts": ["a.b.example.com"]}, "action": "x", "tier": "T0"},
        ]
    )
    assert list(candidate_rules(rules, "a.b.example.com")) == [0, 1, 2, 4, 5]
    assert list(candidate_rules(rules, "other.com")) == [0, 3, 4]
    assert list(candidate_rules(rules, "nowhere.net")) == [0, 4]
    assert list(candidate_rules(_policy([]), "nowhere.net")) == []


def test_long_candidate_lists_are_merged_in_order() -> None:
    rules = _policy(
        [
            rule
            for number in range(60)
            for rule in (
                {"id": f"host-{number}", "match": {"hosts": ["a.example.com"]}, "action": "x", "tier": "T0"},
                {"id": f"wild-{number}", "match": {"hosts": ["*.example.com"]}, "action": "x", "tier": "T0"},
                {"id": f"any-{number}", "action": "x", "tier": "T0"},
            )
        ]
    )
    assert list(candidate_rules(rules, "a.example.com")) == list(range(180))


# -- when ------------------------------------------------------------------------------------


def _when_policy(
    when: str, tier: str = "T0", default_tier: str = "T3", later_tier: str | None = None
) -> RuleSet:
    rules: list[dict[str, object]] = [
        {
            "id": "conditional",
            "match": {"hosts": ["api.example.com"]},
            "when": when,
            "action": "cond",
            "tier": tier,
        }
    ]
    if later_tier is not None:
        rules.append(
            {"id": "later", "match": {"hosts": ["api.example.com"]}, "action": "later", "tier": later_tier}
        )
    return _policy(rules, default_tier=default_tier)


@pytest.mark.parametrize(
    ("when", "request_", "matched"),
    [
        pytest.param(
            "request.form.amount > 100000",
            _request("POST", headers=FORM, body=b"amount=100001"),
            True,
            id="form-int-coerced",
        ),
        pytest.param(
            "request.form.amount > 100000",
            _request("POST", headers=FORM, body=b"amount=100000"),
            False,
            id="form-threshold",
        ),
        pytest.param(
            "request.json.amount > 5", _request("POST", headers=JSON, body=b'{"amount": 6}'), True, id="json"
        ),
        pytest.param(
            "request.json.user.name == 'x'",
            _request(
                "POST",
                headers=(("content-type", "application/merge-patch+json"),),
                body=b'{"user": {"name": "x"}}',
            ),
            True,
            id="json-suffix",
        ),
        pytest.param("request.query.page == 2", _request(query="page=2&size=3"), True, id="query"),
        pytest.param(
            "request.method == 'GET' && request.port == 443 && request.scheme == 'https'",
            _request(),
            True,
            id="method-port-scheme",
        ),
        pytest.param(
            "request.host.endsWith('example.com') && request.path.startsWith('/v1')",
            _request(path="/v1/x"),
            True,
            id="host-path",
        ),
        pytest.param("agent.id == 'agent-1'", _request(), True, id="agent"),
        pytest.param("agent.id == 'someone-else'", _request(), False, id="agent-false"),
        pytest.param(
            "request.headers.exists(h, h == 'x-admin')",
            _request(headers=(("x-admin", "1"),)),
            True,
            id="macro",
        ),
        pytest.param("size(request.form) == 0", _request(), True, id="no-body-empty-form"),
        pytest.param(
            "request.json == null",
            _request("POST", headers=JSON, body=b"{not json"),
            True,
            id="bad-json-is-null",
        ),
        pytest.param(
            "request.json == null",
            _request("POST", headers=JSON, body=b"[" * 100_000),
            True,
            id="deep-json-is-null",
        ),
        pytest.param("request['method'] == 'GET'", _request(), True, id="indexing-gets-whole-context"),
    ],
)
def test_when_condition(when: str, request_: Request, matched: bool) -> None:
    found = classify(request_, _when_policy(when, later_tier="T1"), agent=AGENT)
    assert found.reason_code == "policy.rule"
    assert found.intent.rule == ("conditional" if matched else "later")


@pytest.mark.parametrize(
    ("when", "request_"),
    [
        pytest.param(
            "request.form.note == 'a b'", _request("POST", headers=FORM, body=b"note=a+b&note=c"), id="form"
        ),
        pytest.param("request.query.page == 2", _request(query="page=2&page=3"), id="query"),
        pytest.param(
            "request.headers['x-a'] == '1'", _request(headers=(("x-a", "1"), ("x-a", "2"))), id="header"
        ),
        pytest.param("size(request.query) > 0", _request(query="a=1&a=2"), id="map-read-whole"),
        pytest.param(
            "request.json.a == 1",
            _request("POST", headers=(("content-type", "application/json"),), body=b'{"a": 1, "a": 2}'),
            id="json",
        ),
    ],
)
def test_a_when_reading_a_key_given_twice_is_ambiguous_and_never_guessed(
    when: str, request_: Request
) -> None:
    found = classify(request_, _when_policy(when, later_tier="T1"), agent=AGENT)
    assert (found.reason_code, found.tier, found.intent.rule) == (
        "request.ambiguous_parameter",
        Tier.DENY,
        "conditional",
    )


def test_a_key_the_when_does_not_read_may_repeat() -> None:
    found = classify(
        _request(query="tag=a&tag=b&page=2"),
        _when_policy("request.query.page == 2", later_tier="T1"),
        agent=AGENT,
    )
    assert (found.reason_code, found.intent.rule) == ("policy.rule", "conditional")


@pytest.mark.parametrize(
    ("when", "tier", "later_tier", "default_tier", "expected"),
    [
        pytest.param("request.form.amount > 1", "T0", None, "T0", Tier.T2, id="never-below-T2"),
        pytest.param("request.form.amount > 1", "T3", None, "T0", Tier.T3, id="own-tier-when-higher"),
        pytest.param("request.form.amount > 1", "T0", "T3", "T0", Tier.T3, id="later-rule-when-higher"),
        pytest.param("request.form.amount > 1", "T1", None, "deny", Tier.DENY, id="default-tier-when-higher"),
        pytest.param("request.form.amount > 1", "deny", "T0", "T0", Tier.DENY, id="deny-rule-stays-deny"),
        pytest.param("1", "T0", None, "T0", Tier.T2, id="not-a-boolean"),
        pytest.param("request.form.amount", "T1", "T0", "T0", Tier.T2, id="int-is-not-boolean"),
        pytest.param("request.form.amount > 'x'", "T1", "T0", "T0", Tier.T2, id="type-error"),
        pytest.param("1 / 0 == 1", "T0", "T1", "T0", Tier.T2, id="division-by-zero"),
    ],
)
def test_when_that_cannot_be_evaluated_fails_closed(
    when: str, tier: str, later_tier: str | None, default_tier: str, expected: Tier
) -> None:
    rules = _when_policy(when, tier=tier, default_tier=default_tier, later_tier=later_tier)
    found = classify(_request("POST"), rules, agent=AGENT)
    assert found.tier is expected
    assert found.reason_code == "policy.when_error"
    assert found.intent.rule == "conditional"
    assert found.rule is not None and found.rule.id == "conditional"
    assert "could not be evaluated" in found.reason


def test_many_failing_when_rules_take_the_highest_tier_without_recursing() -> None:
    rules = [
        {
            "id": f"r{number}",
            "when": "request.json.x > 1",
            "action": "a",
            "tier": "T3" if number == 700 else "T0",
        }
        for number in range(1500)
    ]
    found = classify(_request(), _policy(rules, default_tier="T1"), agent=AGENT)
    assert (found.intent.rule, found.tier, found.reason_code) == ("r0", Tier.T3, "policy.when_error")


def test_cel_context_has_every_documented_field() -> None:
    request = _request(
        "POST",
        query="a=1&b=x&c=",
        headers=(("content-type", "application/x-www-form-urlencoded"), ("x-a", "1"), ("x-a", "2")),
        body=b"amount=-5&big=1234567890123456789&name=x",
    )
    assert cel_context(request, "agent-9") == {
        "request": {
            "method": "POST",
            "scheme": "https",
            "host": "api.example.com",
            "port": 443,
            "path": "/",
            "query": {"a": 1, "b": "x", "c": ""},
            "headers": {"content-type": "application/x-www-form-urlencoded", "x-a": "1, 2"},
            "json": None,
            # 19 digits would overflow CEL's int64, so it stays text.
            "form": {"amount": -5, "big": "1234567890123456789", "name": "x"},
            "mcp": {"method": "", "tool": "", "arguments": {}},  # §14: not a JSON-RPC body
        },
        "agent": {"id": "agent-9"},
    }


# -- the index against a linear scan ---------------------------------------------------------


def _naive_host(pattern: HostPattern, request: Request) -> bool:
    if pattern.port is not None and pattern.port != request.port:
        return False
    if pattern.wildcard:
        return request.host.endswith("." + pattern.host)
    return request.host == pattern.host


def _naive_captures(rule: Rule, request: Request) -> dict[str, str] | None:
    if rule.methods is not None and request.method not in rule.methods:
        return None
    if rule.hosts is not None and not any(_naive_host(p, request) for p in rule.hosts):
        return None
    if rule.paths is None:
        return {}
    return next((c for p in rule.paths if (c := p.match(request.path)) is not None), None)


def naive_classify(request: Request, rules: RuleSet) -> tuple[str | None, str, str, Tier, str]:
    """The specification: every rule in document order, the whole CEL context, and a `when` that
    fails counting at the highest of its own tier, T2 and whatever the rules after it give."""
    context = cel_context(request, AGENT)
    for position, rule in enumerate(rules.rules):
        captured = _naive_captures(rule, request)
        if captured is None:
            continue
        tier, code = rule.tier, "policy.rule"
        if rule.when_program is not None:
            try:
                outcome = rule.when_program.execute(context)
            except Exception:  # the reference treats every failure alike, as classify must
                outcome = None
            if outcome is False:
                continue
            if outcome is not True:
                rest = naive_classify(request, replace(rules, rules=rules.rules[position + 1 :]))
                tier, code = highest_tier((rule.tier, rest[3], Tier.T2)), "policy.when_error"
        values = {
            "host": request.host,
            "port": str(request.port),
            "method": request.method,
            "path": request.path,
            "scheme": request.scheme,
            "query": request.query,
            **captured,
        }
        return (rule.id, rule.action, render_target(rule.target, values), tier, code)
    return (None, "unmatched", f"{request.host}{request.path}", rules.default_tier, "policy.default_tier")


_HOST_PATTERNS = [
    "a.example.com",
    "b.example.com",
    "example.com",
    "*.example.com",
    "*.a.example.com",
    "a.example.com:8443",
    "*.example.com:80",
    "10.0.0.1",
    "[fd00::1]",
    "other.org",
]
_WHENS = [
    "request.method == 'GET'",
    "request.form.n > 1",
    "request.json.x == 1",
    "agent.id == 'agent-1'",
    "request.headers['content-type'] == 'application/json'",
    "request.query.q == 'x'",
    "1",
]
_TARGETS = ["{host}{path}", "fixed", "{method} {scheme}://{host}:{port}{path}?{query}"]
_RULE = st.fixed_dictionaries(
    {"tier": st.sampled_from(["T0", "T1", "T2", "T3", "deny"]), "action": st.sampled_from(["a", "b.c"])},
    optional={
        "hosts": st.lists(st.sampled_from(_HOST_PATTERNS), min_size=1, max_size=3),
        "methods": st.lists(st.sampled_from(["GET", "POST", "DELETE"]), min_size=1, max_size=3, unique=True),
        "paths": st.lists(
            st.sampled_from(["/", "/a", "/a/{x}", "/a/**", "/{x}/b", "/**"]), min_size=1, max_size=2
        ),
        "when": st.sampled_from(_WHENS),
        "target": st.sampled_from(_TARGETS),
    },
)
_BODIES = [((), b""), (FORM, b"n=5"), (FORM, b"n=abc"), (JSON, b'{"x": 1}'), (JSON, b'{"x": 2}')]
_REQUEST = st.builds(
    lambda method, host, port, path, query, body: _request(
        method, host, path, port=port, query=query, headers=body[0], body=body[1]
    ),
    st.sampled_from(["GET", "POST", "DELETE", "PATCH"]),
    st.sampled_from(
        [
            "a.example.com",
            "b.example.com",
            "example.com",
            "x.a.example.com",
            "y.example.com",
            "other.org",
            "10.0.0.1",
            "fd00::1",
            "nomatch.net",
        ]
    ),
    st.sampled_from([443, 8443, 80]),
    st.sampled_from(["/", "/a", "/a/1", "/a/1/b", "/A/1", "/x/b", "/a/"]),
    st.sampled_from(["", "q=x"]),
    st.sampled_from(_BODIES),
)


def _rule_document(number: int, spec: dict[str, object]) -> dict[str, object]:
    rule: dict[str, object] = {"id": f"r{number}", "action": spec["action"], "tier": spec["tier"]}
    match = {key: spec[key] for key in ("hosts", "methods", "paths") if key in spec}
    if match:
        rule["match"] = match
    for key in ("when", "target"):
        if key in spec:
            rule[key] = spec[key]
    return rule


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(_RULE, max_size=14),
    default_tier=st.sampled_from(["T0", "T2", "T3", "deny"]),
    requests=st.lists(_REQUEST, min_size=1, max_size=6),
)
def test_indexed_classification_equals_a_linear_scan(
    specs: list[dict[str, object]], default_tier: str, requests: list[Request]
) -> None:
    rules = _policy([_rule_document(n, spec) for n, spec in enumerate(specs)], default_tier=default_tier)
    for request in requests:
        assert _summary(classify(request, rules, agent=AGENT)) == naive_classify(request, rules)
