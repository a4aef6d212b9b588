"""Fuzzing the pure core: decide() never raises and never lets a deny-tier destination through; the policy
loader fails only with PolicyError; the warrant verifier never accepts a token with any bit changed.

CI runs a short profile. The deep one (at least 100,000 examples per property) is chosen by environment:

    VIENNA_FUZZ_PROFILE=deep .venv/bin/python -m pytest tests/security/test_fuzz.py -p no:cacheprovider

(see THREAT_MODEL.md). Profiles are applied per test, never loaded globally, so other suites keep theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import time
from ipaddress import IPv6Address
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from policy.addresses import is_internal
from policy.engine import decide
from policy.model import Decision, Intent, Request, Tier, Verdict
from policy.normalize import AmbiguousRequest, build_request
from policy.rules import PolicyError, RuleSet, load_rules
from policy.warrants import (
    Approval,
    WarrantClaims,
    WarrantKeys,
    WarrantValid,
    constraints_for,
    mint,
    verify,
)
from tests.security.support import FUZZ_EXAMPLES

DEEP = os.environ.get("VIENNA_FUZZ_PROFILE", "").lower() == "deep"
PROFILE = settings(
    max_examples=100_000 if DEEP else 200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    database=None,
    print_blob=True,
)

AGENT = "fuzz-agent"
NOW = 1_800_000_000.0
SECRET = b"fuzz-secret-" + b"k" * 40
KEYS = WarrantKeys(keys={"k1": SECRET}, active_kid="k1")


def _count(name: str) -> None:
    FUZZ_EXAMPLES[name] = FUZZ_EXAMPLES.get(name, 0) + 1


# --- strategies: hosts, paths, requests -------------------------------------------------------------

DENY_HOST_PATTERNS = ["blocked.test", "*.blocked.test", "169.254.169.254", "metadata.google.internal"]
# Spellings that must all land on a deny host once normalised (and some that must not).
HOST_SPELLINGS = [
    "blocked.test",
    "BLOCKED.TEST",
    "blocked.test.",
    "a.blocked.test",
    "x.y.Blocked.Test.",
    "169.254.169.254",
    "0xa9fea9fe",
    "2852039166",
    "169.254.43518",
    "0251.0376.0251.0376",
    "[::ffff:169.254.169.254]",
    "[::ffff:a9fe:a9fe]",
    "metadata.google.internal",
    "METADATA.google.internal.",
    "ｂｌｏｃｋｅｄ.test",
    "api.example.com",
    "example.com",
    "blocked.test.example.com",
    "notblocked.test",
    "127.0.0.1",
    "localhost",
    "10.0.0.1",
    "[::1]",
    "[fd00::1]",
    "8.8.8.8",
]
HOST_POOL = [
    "api.example.com",
    "*.example.com",
    "blocked.test",
    "*.test",
    "127.0.0.1",
    "10.0.0.1",
    "169.254.169.254",
    "[::1]",
    "localhost",
    "example.com:8443",
    "8.8.8.8",
]
SEGMENTS = [
    "a",
    "admin",
    "ADMIN",
    "repos",
    "v1",
    "..",
    ".",
    "",
    "%2e%2e",
    "%2F",
    "%61",
    ";x",
    "x%00",
    "%252e",
    "{}",
]
WHENS = [
    "true",
    "false",
    'request.method == "POST"',
    "request.json.amount > 100",  # fails to evaluate on most bodies: must fail closed
    "request.form.amount > 100000",
    'request.headers["x-mode"] == "safe"',
    'agent.id == "fuzz-agent"',
    "request.query.force == 1",
]
TIERS = ["T0", "T1", "T2", "T3", "deny"]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

hosts = st.one_of(
    st.sampled_from(HOST_SPELLINGS),
    st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,3}\.?", fullmatch=True),
    st.ip_addresses().map(lambda ip: f"[{ip}]" if isinstance(ip, IPv6Address) else str(ip)),
)
targets = st.one_of(
    st.lists(st.sampled_from(SEGMENTS), max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.text(alphabet=string.printable, max_size=40).map(lambda text: "/" + text),
).flatmap(lambda path: st.sampled_from(["", "?force=1", "?a=b&a=c", "?x=%00"]).map(lambda q: path + q))
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.integers(min_value=-(10**12), max_value=10**12).map(lambda n: json.dumps({"amount": n}).encode()),
    st.integers(min_value=0, max_value=10**9).map(lambda n: f"amount={n}".encode()),
)
content_types = st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain", ""])


@st.composite
def requests(draw: st.DrawFn) -> Request:
    body = draw(bodies)
    headers = [("Content-Type", draw(content_types)), ("X-Mode", draw(st.sampled_from(["safe", "unsafe"])))]
    try:
        request = build_request(
            method=draw(st.sampled_from(METHODS)),
            scheme=draw(st.sampled_from(["http", "https"])),
            host=draw(hosts),
            port=draw(st.sampled_from([None, 80, 443, 8443])),
            target=draw(targets),
            headers=headers,
            body=body,
        )
    except AmbiguousRequest:
        assume(False)
        raise
    address = draw(st.one_of(st.none(), st.ip_addresses().map(str)))
    return Request(
        method=request.method,
        scheme=request.scheme,
        host=request.host,
        port=request.port,
        path=request.path,
        query=request.query,
        headers=request.headers,
        body=request.body,
        address=address,
    )


rule_documents = st.fixed_dictionaries(
    {
        "id": st.from_regex(r"r[a-z0-9]{1,6}", fullmatch=True),
        "action": st.sampled_from(["demo.read", "demo.write", "demo.delete"]),
        "tier": st.sampled_from(TIERS),
        "match": st.fixed_dictionaries(
            {},
            optional={
                "hosts": st.lists(st.sampled_from(HOST_POOL), min_size=1, max_size=3),
                "methods": st.lists(st.sampled_from(METHODS), min_size=1, max_size=3),
                "paths": st.lists(
                    st.sampled_from(["/admin/**", "/repos/{owner}/{repo}", "/v1/**", "/"]),
                    min_size=1,
                    max_size=2,
                ),
            },
        ),
    },
    optional={"when": st.sampled_from(WHENS)},
)


@st.composite
def policies(draw: st.DrawFn) -> RuleSet:
    """A random policy whose first rule denies DENY_HOST_PATTERNS; whatever follows cannot undo that."""
    rules: list[dict[str, Any]] = [
        {
            "id": "deny-first",
            "match": {"hosts": DENY_HOST_PATTERNS},
            "action": "cloud.metadata",
            "tier": "deny",
        }
    ]
    rules += draw(st.lists(rule_documents, max_size=8))
    for index, rule in enumerate(rules[1:], start=1):
        rule["id"] = f"{rule['id']}-{index}"
        if rule["tier"] not in ("T1",):
            rule.pop("limits", None)
    document = {"version": 1, "default_tier": draw(st.sampled_from(TIERS)), "rules": rules}
    try:
        return load_rules(json.dumps(document), file="fuzz.yaml")
    except PolicyError:
        assume(False)
        raise


def _is_deny_host(host: str) -> bool:
    return host in ("blocked.test", "169.254.169.254", "metadata.google.internal") or host.endswith(
        ".blocked.test"
    )


def _warrant_for(request: Request, tier: Tier = Tier.T3) -> str:
    """A correctly signed warrant for exactly this request: the strongest thing an agent could hold."""
    claims = WarrantClaims(
        iss="vienna",
        sub=AGENT,
        jti="wt_fuzz",
        iat=int(NOW) - 10,
        nbf=int(NOW) - 10,
        exp=int(NOW) + 600,
        tier=tier,
        intent=Intent(action="x", target="y", rule=None),
        approvals=(Approval(who="alice", at=NOW, justification="fuzz"),),
        con=constraints_for(request),
    )
    return mint(claims, KEYS)


def _decide(request: Request, rules: RuleSet, warrant: str | None) -> Decision:
    return decide(request, rules=rules, warrant=warrant, agent=AGENT, keys=KEYS, now=NOW)


def _named(rules: RuleSet, request: Request) -> bool:
    named = rules.named_hosts
    return any(
        candidate in named or f"{candidate}:{request.port}" in named
        for candidate in (request.host, request.address)
        if candidate is not None
    )


def _internal(request: Request) -> bool:
    for candidate in (request.host, request.address):
        if candidate is None:
            continue
        try:
            if is_internal(candidate):
                return True
        except ValueError:
            continue
    return False


@PROFILE
@given(rules=policies(), request=requests(), with_warrant=st.booleans())
def test_decide_never_raises_and_never_allows_a_deny_tier_destination(
    rules: RuleSet, request: Request, with_warrant: bool
) -> None:
    _count("decide: random policy x request")
    warrant = _warrant_for(request) if with_warrant else None
    decision = _decide(request, rules, warrant)
    assert isinstance(decision, Decision)
    if _is_deny_host(request.host):
        assert decision.verdict is not Verdict.ALLOW, decision
        assert decision.tier is Tier.DENY, decision
    if _internal(request) and not _named(rules, request):
        assert decision.verdict is not Verdict.ALLOW, decision
        assert decision.tier is Tier.DENY, decision  # by the internal check, or a deny rule before it
        assert decision.reason_code in ("destination.internal", "policy.deny"), decision
    if decision.verdict is Verdict.ALLOW:
        assert decision.tier in (Tier.T0, Tier.T1) or decision.warrant_id is not None, decision
        assert decision.tier is not Tier.DENY


@PROFILE
@given(
    method=st.text(max_size=8),
    scheme=st.text(max_size=6),
    host=st.text(max_size=40),
    port=st.integers(min_value=-(2**31), max_value=2**31),
    path=st.text(max_size=60),
    query=st.text(max_size=20),
    headers=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=20)), max_size=4),
    body=st.binary(max_size=64),
    address=st.one_of(st.none(), st.text(max_size=40), st.ip_addresses().map(str)),
    warrant=st.one_of(st.none(), st.text(max_size=80), st.just("a.b.c")),
)
def test_decide_never_raises_on_values_that_skipped_normalisation(
    method: str,
    scheme: str,
    host: str,
    port: int,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    body: bytes,
    address: str | None,
    warrant: str | None,
) -> None:
    """Robustness beyond the contract: even a Request built by hand from junk gets a Decision."""
    _count("decide: unnormalised junk")
    request = Request(
        method=method,
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        query=query,
        headers=tuple(headers),
        body=body,
        address=address,
    )
    decision = _decide(request, FIXED_RULES, warrant)
    assert isinstance(decision, Decision)
    if warrant is not None and decision.verdict is Verdict.ALLOW:
        assert decision.tier in (Tier.T0, Tier.T1)


FIXED_RULES = load_rules(
    json.dumps(
        {
            "version": 1,
            "default_tier": "T3",
            "rules": [
                {
                    "id": "deny",
                    "match": {"hosts": DENY_HOST_PATTERNS},
                    "action": "cloud.metadata",
                    "tier": "deny",
                },
                {"id": "read", "match": {"methods": ["GET", "HEAD"]}, "action": "http.read", "tier": "T0"},
                {
                    "id": "guarded",
                    "match": {"methods": ["POST"]},
                    "when": "request.json.amount > 100",
                    "action": "w",
                    "tier": "T1",
                },
            ],
        }
    )
)


# --- the loader ---------------------------------------------------------------------------------------

VALID_POLICY = """\
version: 1
default_tier: T3
rules:
  - id: read
    match: {hosts: [api.example.com], methods: [GET, HEAD]}
    action: demo.read
    tier: T0
  - id: delete
    match: {hosts: ["*.example.com"], methods: [DELETE], paths: ["/repos/{owner}/{repo}"]}
    when: 'request.headers["x-mode"] == "unsafe"'
    action: demo.delete
    target: "{owner}/{repo}"
    tier: T3
    warrant: {ttl: 15m, max_uses: 1, bind: exact}
  - id: notes
    match: {methods: [POST], paths: ["/notes/**"]}
    action: demo.note
    tier: T1
    limits: {rate: 10/m}
"""

yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(TIERS + METHODS + HOST_POOL + WHENS + ["10/m", "15m", "exact", "{owner}", "/**", "*"]),
)
yaml_keys = st.one_of(
    st.sampled_from(
        [
            "version",
            "default_tier",
            "rules",
            "id",
            "match",
            "hosts",
            "methods",
            "paths",
            "when",
            "action",
            "target",
            "tier",
            "limits",
            "rate",
            "warrant",
            "ttl",
            "max_uses",
            "bind",
            "description",
        ]
    ),
    st.text(max_size=8),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(yaml_keys, children, max_size=5),
    max_leaves=30,
)


def _load_only_policy_errors(text: str) -> None:
    try:
        load_rules(text, file="fuzz.yaml")
    except PolicyError as error:
        assert error.issues, "a PolicyError must name at least one issue"


@PROFILE
@given(text=st.text(max_size=400))
def test_loader_fails_only_with_policy_error_on_arbitrary_text(text: str) -> None:
    _count("loader: arbitrary text")
    _load_only_policy_errors(text)


@PROFILE
@given(
    document=st.dictionaries(yaml_keys, yaml_values, max_size=5), version=st.sampled_from([1, 2, "1", None])
)
def test_loader_fails_only_with_policy_error_on_arbitrary_yaml_structures(
    document: dict[str, Any], version: object
) -> None:
    _count("loader: arbitrary YAML structures")
    document.setdefault("version", version)
    _load_only_policy_errors(json.dumps(document, default=str, allow_nan=True))


@PROFILE
@given(
    edits=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(VALID_POLICY)),
            st.integers(min_value=0, max_value=3),
            st.text(alphabet=string.printable + "{}[]:&*!|>'\"#%@`\t\u00e9\u200b", max_size=4),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_loader_fails_only_with_policy_error_on_a_mutated_valid_policy(
    edits: list[tuple[int, int, str]],
) -> None:
    _count("loader: mutated valid policy")
    text = VALID_POLICY
    for position, removed, inserted in edits:
        text = text[:position] + inserted + text[position + removed :]
    _load_only_policy_errors(text)


# --- the verifier ------------------------------------------------------------------------------------

TARGET = build_request(
    method="DELETE", scheme="https", host="api.example.com", port=None, target="/repos/a/b"
)
TOKEN = _warrant_for(TARGET)


def _verifies(token: str) -> bool:
    result = verify(token, TARGET, agent=AGENT, keys=KEYS, now=NOW, required_tier=Tier.T3)
    return isinstance(result, WarrantValid)


def test_the_unchanged_token_verifies() -> None:
    """The control: without it, the properties below would pass for a verifier that accepts nothing."""
    assert _verifies(TOKEN)


@PROFILE
@given(index=st.integers(min_value=0, max_value=len(TOKEN) * 8 - 1))
def test_verifier_refuses_a_token_with_any_single_bit_flipped(index: int) -> None:
    _count("verify: one bit flipped")
    raw = bytearray(TOKEN.encode("ascii"))
    raw[index // 8] ^= 1 << (index % 8)
    assert not _verifies(raw.decode("latin-1"))


@PROFILE
@given(
    changes=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(TOKEN) - 1), st.integers(min_value=0, max_value=255)
        ),
        min_size=1,
        max_size=6,
    )
)
def test_verifier_refuses_a_token_with_any_bytes_changed(changes: list[tuple[int, int]]) -> None:
    raw = bytearray(TOKEN.encode("ascii"))
    for position, value in changes:
        raw[position] = value
    assume(bytes(raw) != TOKEN.encode("ascii"))
    _count("verify: bytes replaced")
    assert not _verifies(raw.decode("latin-1"))


@PROFILE
@given(cut=st.integers(min_value=0, max_value=len(TOKEN) - 1), extra=st.text(max_size=8))
def test_verifier_refuses_a_truncated_or_extended_token(cut: int, extra: str) -> None:
    assume(TOKEN[:cut] + extra != TOKEN)
    _count("verify: truncated or extended")
    assert not _verifies(TOKEN[:cut] + extra)


def test_changed_claims_re_signed_with_another_key_never_verify() -> None:
    """Not random, but the rest of the bit-flip argument: a forger without the key cannot re-sign."""
    other = WarrantKeys(keys={"k1": hashlib.sha256(SECRET).digest() + b"x"}, active_kid="k1")
    claims = WarrantClaims(
        iss="vienna",
        sub=AGENT,
        jti="wt_other",
        iat=int(time.time()),
        nbf=int(NOW) - 10,
        exp=int(NOW) + 600,
        tier=Tier.T3,
        intent=Intent(action="x", target="y", rule=None),
        approvals=(),
        con=constraints_for(TARGET),
    )
    assert not _verifies(mint(claims, other))
