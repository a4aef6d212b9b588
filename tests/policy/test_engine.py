"""Tests for policy.engine.decide: golden decisions, internal destinations, warrants, failing closed."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.engine import decide, decide_action, destination_is_internal, refuse_malformed
from policy.model import Decision, Intent, Request, Tier, Verdict
from policy.normalize import AmbiguousRequest, build_request
from policy.rules import RuleSet, load_rules
from policy.warrants import Approval, Bind, WarrantClaims, WarrantKeys, constraints_for, mint
from tests.policy.golden import GoldenCase, load_cases, policy_rules

AGENT = "agent-1"
NOW = 1_700_000_000.0
KEYS = WarrantKeys({"k1": b"k" * 32}, "k1")
FORM = (("content-type", "application/x-www-form-urlencoded"),)


def _policy(rules: Sequence[Mapping[str, object]], default_tier: str = "T3") -> RuleSet:
    return load_rules(json.dumps({"version": 1, "default_tier": default_tier, "rules": rules}, indent=1))


def _decide(
    request: Request,
    rules: RuleSet,
    *,
    warrant: str | None = None,
    keys: WarrantKeys | None = KEYS,
    agent: str = AGENT,
    now: float = NOW,
) -> Decision:
    return decide(request, rules=rules, warrant=warrant, agent=agent, keys=keys, now=now)


def _request(
    method: str = "GET",
    host: str = "api.example.com",
    path: str = "/",
    *,
    port: int = 443,
    address: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
) -> Request:
    return Request(
        method=method,
        scheme="https",
        host=host,
        port=port,
        path=path,
        address=address,
        headers=headers,
        body=body,
    )


def _warrant(
    request: Request,
    *,
    tier: Tier = Tier.T3,
    sub: str = AGENT,
    iss: str = "vienna",
    nbf: float = NOW - 60,
    exp: float = NOW + 600,
    keys: WarrantKeys = KEYS,
    bind: Bind = Bind.EXACT,
    max_uses: int = 1,
) -> str:
    claims = WarrantClaims(
        iss=iss,
        sub=sub,
        jti="w-1",
        iat=int(NOW) - 60,
        nbf=int(nbf),
        exp=int(exp),
        tier=tier,
        intent=Intent(action="test", target="test", rule=None),
        approvals=(
            Approval(who="alice", at=NOW - 30, justification="ticket 1"),
            Approval(who="bob", at=NOW - 20, justification="ticket 1"),
        ),
        con=constraints_for(request, bind=bind, max_uses=max_uses),
    )
    return mint(claims, keys)


# -- golden ----------------------------------------------------------------------------------


def test_golden_covers_every_example_policy_with_enough_cases() -> None:
    from tests.policy.golden import ROOT

    cases = load_cases()
    assert len(cases) >= 40
    examples = {f"examples/policies/{path.name}" for path in (ROOT / "examples" / "policies").glob("*.yaml")}
    assert {case.policy for case in cases} == examples


@pytest.mark.parametrize("case", load_cases(), ids=lambda case: case.name)
def test_golden_decision(case: GoldenCase) -> None:
    rules = case.rules()
    decision = _decide(case.request(), rules)
    assert {
        "action": decision.intent.action,
        "target": decision.intent.target,
        "tier": decision.tier.value,
        "rule": decision.intent.rule,
        "decision": decision.verdict.value,
        "reason_code": decision.reason_code,
    } == case.expect
    assert decision.policy_revision == rules.revision
    assert decision.warrant_id is None
    assert decision.forwards is (decision.verdict is Verdict.ALLOW)


# -- internal destinations -------------------------------------------------------------------

INTERNAL_POLICY: list[dict[str, object]] = [
    {
        "id": "named-internal",
        "match": {"hosts": ["internal.example.com", "10.0.0.5", "[fd00::5]"]},
        "action": "internal",
        "tier": "T0",
    },
    {"id": "corp-wildcard", "match": {"hosts": ["*.corp.example.com"]}, "action": "corp", "tier": "T0"},
    {"id": "everything", "action": "any", "tier": "T0"},
]


@pytest.mark.parametrize(
    ("host", "address"),
    [
        pytest.param("127.0.0.1", None, id="loopback"),
        pytest.param("127.8.9.10", None, id="loopback-range"),
        pytest.param("10.1.2.3", None, id="rfc1918-10"),
        pytest.param("172.16.0.1", None, id="rfc1918-172"),
        pytest.param("192.168.1.1", None, id="rfc1918-192"),
        pytest.param("169.254.169.254", None, id="metadata"),
        pytest.param("100.64.0.1", None, id="cgnat"),
        pytest.param("0.0.0.0", None, id="unspecified"),
        pytest.param("::1", None, id="ipv6-loopback"),
        pytest.param("fd00::1", None, id="ipv6-ula"),
        pytest.param("fe80::1", None, id="ipv6-link-local"),
        pytest.param("::ffff:10.0.0.1", None, id="ipv4-mapped"),
        pytest.param("64:ff9b::a9fe:a9fe", None, id="nat64-metadata"),
        pytest.param("api.example.com", "127.0.0.1", id="name-resolving-to-loopback"),
        pytest.param("api.example.com", "169.254.169.254", id="name-resolving-to-metadata"),
        pytest.param("x.corp.example.com", "10.20.30.40", id="wildcard-never-opens"),
        pytest.param("10.0.0.6", None, id="neighbour-of-named-address"),
        pytest.param("8.8.8.8", "10.0.0.1", id="public-literal-resolved-internal"),
    ],
)
def test_internal_destination_is_refused_unless_a_rule_names_it(host: str, address: str | None) -> None:
    rules = _policy(INTERNAL_POLICY, default_tier="T0")
    request = _request(host=host, address=address)
    assert destination_is_internal(request, rules)
    decision = _decide(request, rules, warrant=_warrant(request))
    assert (decision.verdict, decision.tier, decision.reason_code) == (
        Verdict.DENIED,
        Tier.DENY,
        "destination.internal",
    )
    assert host in decision.reason


@pytest.mark.parametrize(
    ("host", "address", "rule"),
    [
        pytest.param("internal.example.com", "10.0.0.9", "named-internal", id="named-host"),
        pytest.param("10.0.0.5", None, "named-internal", id="named-address-literal"),
        pytest.param("10.0.0.5", "10.0.0.5", "named-internal", id="named-address-literal-resolved"),
        pytest.param("public.example.net", "10.0.0.5", "everything", id="resolves-to-named-address"),
        pytest.param("fd00::5", None, "named-internal", id="named-ipv6"),
        pytest.param("8.8.8.8", None, "everything", id="public-literal"),
        pytest.param("api.example.com", "93.184.216.34", "everything", id="public-address"),
        pytest.param("api.example.com", None, "everything", id="not-yet-resolved"),
    ],
)
def test_destination_that_is_public_or_named_passes(host: str, address: str | None, rule: str) -> None:
    rules = _policy(INTERNAL_POLICY, default_tier="T0")
    request = _request(host=host, address=address)
    assert not destination_is_internal(request, rules)
    decision = _decide(request, rules)
    assert (decision.verdict, decision.intent.rule, decision.reason_code) == (
        Verdict.ALLOW,
        rule,
        "policy.rule",
    )


def test_internal_destination_is_refused_before_warrants_are_read() -> None:
    request = _request(host="10.9.9.9")
    decision = _decide(request, _policy([], default_tier="T2"), warrant="not even a token")
    assert decision.reason_code == "destination.internal"


# -- tiers and warrants ----------------------------------------------------------------------

STRIPE = "examples/policies/stripe.yaml"


def _refund(amount: str) -> Request:
    return _request("POST", "api.stripe.com", "/v1/refunds", headers=FORM, body=f"amount={amount}".encode())


def test_deny_tier_is_refused_even_with_a_valid_warrant() -> None:
    request = _request("DELETE", "api.stripe.com", "/v1/customers/cus_1")
    decision = _decide(request, policy_rules(STRIPE), warrant=_warrant(request))
    assert (decision.verdict, decision.tier, decision.reason_code) == (
        Verdict.DENIED,
        Tier.DENY,
        "policy.deny",
    )
    assert decision.intent == Intent(
        action="stripe.delete_customer", target="cus_1", rule="stripe-delete-customer"
    )


@pytest.mark.parametrize(
    ("amount", "tier", "rule"),
    [("200000", Tier.T3, "stripe-refund-large"), ("50", Tier.T2, "stripe-refund")],
)
def test_warrant_tier_needs_a_warrant(amount: str, tier: Tier, rule: str) -> None:
    decision = _decide(_refund(amount), policy_rules(STRIPE))
    assert (decision.verdict, decision.tier, decision.intent.rule, decision.reason_code) == (
        Verdict.WARRANT_REQUIRED,
        tier,
        rule,
        "warrant.required",
    )
    assert decision.verdict.http_status == 403
    assert not decision.forwards


@pytest.mark.parametrize(
    ("amount", "warrant_tier"),
    [("200000", Tier.T3), ("50", Tier.T2), ("50", Tier.T3)],
    ids=["T3-by-T3", "T2-by-T2", "T2-by-T3"],
)
def test_valid_warrant_allows(amount: str, warrant_tier: Tier) -> None:
    request = _refund(amount)
    decision = _decide(
        request, policy_rules(STRIPE), warrant=_warrant(request, tier=warrant_tier, max_uses=3)
    )
    assert (decision.verdict, decision.reason_code, decision.warrant_id, decision.warrant_max_uses) == (
        Verdict.ALLOW,
        "warrant.valid",
        "w-1",
        3,
    )
    assert "alice, bob" in decision.reason
    assert decision.intent.action == "stripe.refund"
    assert decision.forwards


def _other_key() -> WarrantKeys:
    return WarrantKeys({"k1": b"x" * 32}, "k1")


LARGE = _refund("200000")


def _spliced(signed: str, claims_from: str) -> str:
    """`signed`'s header and signature around another token's claims: a tampered payload."""
    header, _, signature = signed.split(".")
    return ".".join((header, claims_from.split(".")[1], signature))


INVALID_WARRANTS: list[Any] = [
    pytest.param(lambda: _warrant(LARGE, tier=Tier.T2), {}, "warrant.tier", id="tier-too-low"),
    pytest.param(lambda: _warrant(LARGE, sub="agent-2"), {}, "warrant.wrong_agent", id="other-agent"),
    pytest.param(lambda: _warrant(LARGE, iss="someone"), {}, "warrant.issuer", id="issuer"),
    pytest.param(lambda: _warrant(LARGE, exp=NOW - 1), {}, "warrant.expired", id="expired"),
    pytest.param(lambda: _warrant(LARGE, nbf=NOW + 60), {}, "warrant.not_yet_valid", id="not-yet-valid"),
    pytest.param(lambda: _warrant(LARGE, keys=_other_key()), {}, "warrant.bad_signature", id="other-secret"),
    pytest.param(
        lambda: _spliced(_warrant(LARGE), _warrant(_refund("1"))), {}, "warrant.bad_signature", id="tampered"
    ),
    pytest.param(lambda: "not-a-jwt", {}, "warrant.malformed", id="garbage"),
    pytest.param(lambda: "", {}, "warrant.malformed", id="empty"),
    pytest.param(lambda: _warrant(_refund("300000")), {}, "warrant.mismatch.body", id="other-body"),
    pytest.param(
        lambda: _warrant(replace(LARGE, path="/v1/refunds/x")), {}, "warrant.mismatch.path", id="other-path"
    ),
    pytest.param(lambda: _warrant(LARGE), {"keys": None}, "warrant.no_keys", id="no-keys"),
    pytest.param(
        lambda: _warrant(LARGE), {"agent": "agent-2"}, "warrant.wrong_agent", id="presented-by-other"
    ),
    pytest.param(lambda: _warrant(LARGE), {"now": NOW + 601}, "warrant.expired", id="clock-past-exp"),
    pytest.param(lambda: _warrant(LARGE), {"now": float("nan")}, "warrant.expired", id="nan-clock"),
]


@pytest.mark.parametrize(("make", "changes", "code"), INVALID_WARRANTS)
def test_invalid_warrant_is_refused_with_its_reason(make: Any, changes: dict[str, Any], code: str) -> None:
    token: str = make()
    decision = _decide(LARGE, policy_rules(STRIPE), warrant=token, **changes)
    assert (decision.verdict, decision.reason_code, decision.tier) == (Verdict.WARRANT_INVALID, code, Tier.T3)
    assert decision.warrant_id is None
    assert not decision.forwards


def test_host_bound_warrant_covers_other_paths_on_the_host() -> None:
    request = _request("POST", "api.stripe.com", "/v1/charges")
    token = _warrant(_request("POST", "api.stripe.com", "/v1/other"), bind=Bind.HOST)
    assert _decide(request, policy_rules(STRIPE), warrant=token).reason_code == "warrant.valid"


def test_warrant_is_not_needed_below_T2() -> None:
    request = _request("GET", "api.stripe.com", "/v1/charges")
    decision = _decide(request, policy_rules(STRIPE), warrant="ignored, never parsed")
    assert (decision.verdict, decision.reason_code, decision.warrant_id) == (
        Verdict.ALLOW,
        "policy.rule",
        None,
    )


# -- failing closed --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        "request.json.flag == true",
        "request.form.n > 1",
        "request.headers['x-missing'] == 'a'",
        "'a' > 1",
        "1",
    ],
)
def test_when_error_never_allows_without_a_warrant(when: str) -> None:
    rules = _policy([{"id": "cheap", "when": when, "action": "cheap", "tier": "T0"}], default_tier="T0")
    decision = _decide(_request("POST"), rules)
    assert decision.verdict is Verdict.WARRANT_REQUIRED
    assert decision.tier is Tier.T2
    assert decision.intent.rule == "cheap"
    assert "could not be evaluated" in decision.reason


def test_internal_error_denies() -> None:
    rules = _policy([{"id": "r", "match": {"hosts": ["api.example.com"]}, "action": "a", "tier": "T0"}])
    broken = replace(rules, by_exact_host={"api.example.com": (99,)})
    decision = _decide(_request(), broken)
    assert (decision.verdict, decision.tier, decision.reason_code) == (
        Verdict.DENIED,
        Tier.DENY,
        "internal.error",
    )
    assert decision.policy_revision == rules.revision
    assert "IndexError" in decision.reason


def test_malformed_request_is_a_bad_request() -> None:
    rules = _policy([])
    with pytest.raises(AmbiguousRequest) as caught:
        build_request(method="GET", scheme="https", host="example.com", port=None, target="/a/%2e%2e/%2fb")
    decision = refuse_malformed(caught.value, rules=rules)
    assert (decision.verdict, decision.tier, decision.reason_code) == (
        Verdict.BAD_REQUEST,
        Tier.DENY,
        "request.ambiguous_path",
    )
    assert decision.verdict.http_status == 400


# -- properties ------------------------------------------------------------------------------

DENY_POLICY = _policy(
    [
        {
            "id": "blocked",
            "match": {"hosts": ["blocked.example.com", "169.254.169.254"]},
            "action": "blocked",
            "tier": "deny",
        },
        {
            "id": "cheap",
            "match": {"methods": ["GET", "POST"]},
            "when": "request.json.x > 1",
            "action": "cheap",
            "tier": "T0",
        },
        {"id": "everything", "action": "everything", "tier": "T0"},
    ],
    default_tier="T0",
)
DENY_HOSTS = frozenset({"blocked.example.com", "169.254.169.254"})
POLICIES = [
    DENY_POLICY,
    *(
        policy_rules(f"examples/policies/{name}.yaml")
        for name in ("default", "github", "stripe", "kubernetes")
    ),
]

_TEXT = st.text(max_size=40)
_HEADERS = st.lists(st.tuples(_TEXT, _TEXT), max_size=4).map(tuple)
_BODY = st.one_of(st.binary(max_size=64), st.sampled_from([b'{"x": 5}', b"amount=500000", b"[" * 5000]))


@st.composite
def _arbitrary_requests(draw: st.DrawFn) -> Request:
    headers = draw(st.one_of(_HEADERS, st.just((("content-type", "application/json"),)), st.just(FORM)))
    return Request(
        method=draw(st.one_of(_TEXT, st.sampled_from(["GET", "POST", "DELETE"]))),
        scheme=draw(st.one_of(_TEXT, st.sampled_from(["https", "http"]))),
        host=draw(
            st.one_of(_TEXT, st.sampled_from([*sorted(DENY_HOSTS), "api.stripe.com", "10.0.0.1", "::1"]))
        ),
        port=draw(st.integers(min_value=-(2**31), max_value=2**31)),
        path=draw(st.one_of(_TEXT, st.sampled_from(["/", "/v1/refunds", "/repos/a/b"]))),
        query=draw(_TEXT),
        headers=headers,
        body=draw(_BODY),
        address=draw(st.one_of(st.none(), _TEXT, st.sampled_from(["127.0.0.1", "8.8.8.8", "fd00::1"]))),
    )


def _warrant_for(data: st.DataObject, request: Request) -> str | None:
    choice = data.draw(st.sampled_from(["none", "text", "valid"]))
    if choice == "none":
        return None
    if choice == "text":
        return data.draw(_TEXT)
    try:
        return _warrant(request)
    except ValueError:  # a port out of range cannot be put into a warrant at all
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_arbitrary_requests(), rules=st.sampled_from(POLICIES), data=st.data())
def test_decide_never_raises_and_never_allows_a_deny_host(
    request: Request, rules: RuleSet, data: st.DataObject
) -> None:
    decision = _decide(request, rules, warrant=_warrant_for(data, request))
    assert isinstance(decision, Decision)
    assert decision.reason_code
    assert decision.policy_revision == rules.revision
    if rules is DENY_POLICY and request.host in DENY_HOSTS:
        assert decision.verdict is Verdict.DENIED
        assert decision.tier is Tier.DENY


_RAW_HOSTS = st.one_of(
    st.sampled_from(
        [
            "blocked.example.com",
            "BLOCKED.Example.COM.",
            "blocked.example.com.",
            "169.254.169.254",
            "0xa9fea9fe",
            "169.254.43518",
            "[::ffff:169.254.169.254]",
            "api.stripe.com",
        ]
    ),
    _TEXT,
)
_RAW_TARGETS = st.one_of(st.sampled_from(["/", "/v1/refunds?x=1", "/a/../b", "/%2e%2e/x"]), _TEXT)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.one_of(st.sampled_from(["GET", "post", "DELETE"]), _TEXT),
    scheme=st.sampled_from(["http", "https", "HTTPS"]),
    host=_RAW_HOSTS,
    port=st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
    target=_RAW_TARGETS,
    headers=_HEADERS,
    body=_BODY,
    data=st.data(),
)
def test_normalised_requests_to_a_deny_host_are_never_allowed(
    method: str,
    scheme: str,
    host: str,
    port: int | None,
    target: str,
    headers: tuple[tuple[str, str], ...],
    body: bytes,
    data: st.DataObject,
) -> None:
    try:
        request = build_request(
            method=method, scheme=scheme, host=host, port=port, target=target, headers=headers, body=body
        )
    except AmbiguousRequest as problem:
        assert refuse_malformed(problem, rules=DENY_POLICY).verdict is Verdict.BAD_REQUEST
        return
    decision = _decide(request, DENY_POLICY, warrant=_warrant_for(data, request))
    if request.host in DENY_HOSTS:
        assert (decision.verdict, decision.tier) == (Verdict.DENIED, Tier.DENY)
    else:
        assert decision.verdict is not Verdict.BAD_REQUEST


def test_an_action_only_intent_gets_the_highest_tier_any_rule_gives_that_action() -> None:
    rules = policy_rules("examples/policies/stripe.yaml")
    refund = decide_action("stripe.refund", "ch_1", rules=rules)
    assert (refund.verdict, refund.tier, refund.intent.rule) == (
        Verdict.WARRANT_REQUIRED,
        Tier.T3,
        "stripe-refund-large",
    )
    read = decide_action("stripe.read", "", rules=rules)
    assert (read.verdict, read.tier, read.reason_code) == (Verdict.ALLOW, Tier.T0, "policy.action")
    gone = decide_action("stripe.delete_customer", "cus_1", rules=rules)
    assert (gone.verdict, gone.reason_code) == (Verdict.DENIED, "policy.deny")
    unknown = decide_action("stripe.unknown", "", rules=rules)
    assert (unknown.tier, unknown.reason_code, unknown.intent.rule) == (Tier.T3, "policy.default_tier", None)
