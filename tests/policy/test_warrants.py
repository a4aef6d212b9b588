"""Warrant minting and verification: every refusal code, tampering and arbitrary input."""

from __future__ import annotations

import base64
import hmac
import json
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.model import Intent, Request, Tier
from policy.rules import Rule, load_rules
from policy.warrants import (
    Approval,
    Bind,
    Constraints,
    WarrantClaims,
    WarrantKeys,
    WarrantRefused,
    WarrantValid,
    constraints_for,
    jwk_of,
    mint,
    mint_eddsa,
    public_key_from_jwk,
    public_key_id,
    terms_for,
    verify,
)

SECRET = b"s" * 32
OTHER_SECRET = b"o" * 32
KEYS = WarrantKeys({"k1": SECRET}, "k1")
NOW = 1_700_000_000.0
AGENT = "agent-1"
REQUEST = Request(
    method="POST",
    scheme="https",
    host="api.stripe.com",
    port=443,
    path="/v1/refunds",
    query="expand=charge",
    body=b'{"amount": 150000}',
)
INTENT = Intent(action="stripe.refund", target="ch_1", rule="stripe-refund-large")
HEADER: dict[str, object] = {"alg": "HS256", "typ": "warrant+jwt", "kid": "k1"}

Result = WarrantValid | WarrantRefused


def make_claims(**changes: Any) -> WarrantClaims:
    claims = WarrantClaims(
        iss="vienna",
        sub=AGENT,
        jti="w-1",
        iat=int(NOW),
        nbf=int(NOW),
        exp=int(NOW) + 900,
        tier=Tier.T2,
        intent=INTENT,
        approvals=(Approval(who="alice", at=NOW - 5, justification="customer asked"),),
        con=constraints_for(REQUEST),
        wrq="wr-1",
    )
    return replace(claims, **changes)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(
    header: object,
    payload: object,
    *,
    key: bytes | None = SECRET,
    digest: str = "sha256",
) -> str:
    """A token built by hand, so the tests do not depend on what PyJWT is willing to produce."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


def check(
    token: str,
    request: Request = REQUEST,
    *,
    agent: str = AGENT,
    now: float = NOW,
    required_tier: Tier = Tier.T2,
    keys: WarrantKeys = KEYS,
    leeway: int = 0,
) -> Result:
    return verify(token, request, agent=agent, keys=keys, now=now, required_tier=required_tier, leeway=leeway)


def outcome(result: Result) -> str:
    return "valid" if isinstance(result, WarrantValid) else result.code


def payload_with(**changes: object) -> dict[str, object]:
    payload = make_claims().as_payload()
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not None}


def con_with(**changes: object) -> dict[str, object]:
    con = constraints_for(REQUEST).as_claim()
    con.update(changes)
    return {key: value for key, value in con.items() if value is not None}


VALID = mint(make_claims(), KEYS)


# --- round trip ---------------------------------------------------------------------------------


def test_minted_warrant_verifies_and_round_trips_its_claims() -> None:
    result = check(VALID)
    assert result == WarrantValid(make_claims())


def test_minted_header_pins_algorithm_type_and_key_id() -> None:
    header = json.loads(base64.urlsafe_b64decode(VALID.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "warrant+jwt", "kid": "k1"}


def test_hand_crafted_token_with_the_right_key_verifies() -> None:
    # Guards the refusal table below: crafted tokens differ from a valid one only where intended.
    assert outcome(check(craft(HEADER, payload_with()))) == "valid"


@given(
    sub=st.text(min_size=1),
    jti=st.text(min_size=1),
    action=st.text(),
    target=st.text(),
    rule=st.none() | st.text(),
    who=st.lists(st.text(min_size=1), max_size=3),
    at=st.floats(allow_nan=False, allow_infinity=False),
    wrq=st.none() | st.text(),
)
def test_any_claims_round_trip_through_mint_and_verify(
    sub: str,
    jti: str,
    action: str,
    target: str,
    rule: str | None,
    who: list[str],
    at: float,
    wrq: str | None,
) -> None:
    claims = make_claims(
        sub=sub,
        jti=jti,
        intent=Intent(action=action, target=target, rule=rule),
        approvals=tuple(Approval(who=w, at=at, justification=w) for w in who),
        wrq=wrq,
    )
    assert check(mint(claims, KEYS), agent=sub) == WarrantValid(claims)


# --- every refusal code -------------------------------------------------------------------------

_EDITED = VALID.split(".")
_EDITED_PAYLOAD = b64(json.dumps(payload_with(sub="agent-2")).encode())
_RS256_AS_HMAC = craft({**HEADER, "alg": "RS256"}, payload_with())  # the HMAC key as "public key"

REFUSALS: list[tuple[str, str, dict[str, object], str]] = [
    ("empty", "", {}, "warrant.malformed"),
    ("two parts", "a.b", {}, "warrant.malformed"),
    ("four parts", VALID + ".x", {}, "warrant.malformed"),
    ("not base64url", "!!!." + VALID.split(".", 1)[1], {}, "warrant.malformed"),
    ("header not json", f"{b64(b'nope')}.{_EDITED[1]}.{_EDITED[2]}", {}, "warrant.malformed"),
    ("payload is a list", craft(HEADER, [1, 2]), {}, "warrant.malformed"),
    ("missing jti", craft(HEADER, payload_with(jti=None)), {}, "warrant.malformed"),
    ("exp is text", craft(HEADER, payload_with(exp="soon")), {}, "warrant.malformed"),
    ("exp is a bool", craft(HEADER, payload_with(exp=True)), {}, "warrant.malformed"),
    (
        "approval time out of range",
        craft(HEADER, payload_with(approvals=[{"who": "a", "at": 10**400, "justification": ""}])),
        {},
        "warrant.malformed",
    ),
    ("unknown tier", craft(HEADER, payload_with(tier="T9")), {}, "warrant.malformed"),
    ("approvals not a list", craft(HEADER, payload_with(approvals={})), {}, "warrant.malformed"),
    ("port is text", craft(HEADER, payload_with(con=con_with(port="443"))), {}, "warrant.malformed"),
    ("port out of range", craft(HEADER, payload_with(con=con_with(port=70000))), {}, "warrant.malformed"),
    ("bad body hash", craft(HEADER, payload_with(con=con_with(body_sha256="zz"))), {}, "warrant.malformed"),
    ("crit header", craft({**HEADER, "crit": ["exp"]}, payload_with()), {}, "warrant.malformed"),
    ("b64 header", craft({**HEADER, "b64": False}, payload_with()), {}, "warrant.malformed"),
    ("alg none", craft({**HEADER, "alg": "none"}, payload_with(), key=None), {}, "warrant.algorithm"),
    ("alg None", craft({**HEADER, "alg": "None"}, payload_with(), key=None), {}, "warrant.algorithm"),
    (
        "HS512 same key",
        craft({**HEADER, "alg": "HS512"}, payload_with(), digest="sha512"),
        {},
        "warrant.algorithm",
    ),
    ("RS256 key confusion", _RS256_AS_HMAC, {}, "warrant.algorithm"),
    ("ES256", craft({**HEADER, "alg": "ES256"}, payload_with()), {}, "warrant.algorithm"),
    ("alg missing", craft({"typ": "warrant+jwt", "kid": "k1"}, payload_with()), {}, "warrant.algorithm"),
    ("alg as list", craft({**HEADER, "alg": ["HS256"]}, payload_with()), {}, "warrant.algorithm"),
    (
        "alg deeply nested",
        craft({**HEADER, "alg": json.loads("[" * 900 + "]" * 900)}, payload_with()),
        {},
        "warrant.algorithm",
    ),
    ("too long", craft(HEADER, payload_with(pad="x" * 33_000)), {}, "warrant.malformed"),
    ("typ JWT", craft({**HEADER, "typ": "JWT"}, payload_with()), {}, "warrant.type"),
    ("typ missing", craft({"alg": "HS256", "kid": "k1"}, payload_with()), {}, "warrant.type"),
    ("unknown kid", craft({**HEADER, "kid": "k9"}, payload_with()), {}, "warrant.unknown_key"),
    (
        "missing kid, other secret",
        craft({"alg": "HS256", "typ": "warrant+jwt"}, payload_with(), key=OTHER_SECRET),
        {},
        "warrant.bad_signature",
    ),
    ("kid not text", craft({**HEADER, "kid": 1}, payload_with()), {}, "warrant.unknown_key"),
    ("other secret", craft(HEADER, payload_with(), key=OTHER_SECRET), {}, "warrant.bad_signature"),
    ("edited payload", f"{_EDITED[0]}.{_EDITED_PAYLOAD}.{_EDITED[2]}", {}, "warrant.bad_signature"),
    ("no signature", craft(HEADER, payload_with(), key=None), {}, "warrant.bad_signature"),
    ("expired at exp", VALID, {"now": NOW + 900}, "warrant.expired"),
    ("expired after exp", VALID, {"now": NOW + 10_000}, "warrant.expired"),
    ("nan clock", VALID, {"now": float("nan")}, "warrant.expired"),
    ("not yet valid", mint(make_claims(nbf=int(NOW) + 60), KEYS), {}, "warrant.not_yet_valid"),
    ("other issuer", mint(make_claims(iss="mallory"), KEYS), {}, "warrant.issuer"),
    ("other agent", VALID, {"agent": "agent-2"}, "warrant.wrong_agent"),
    ("T2 warrant on T3 request", VALID, {"required_tier": Tier.T3}, "warrant.tier"),
    (
        "warrant on a deny request",
        mint(make_claims(tier=Tier.T3), KEYS),
        {"required_tier": Tier.DENY},
        "warrant.tier",
    ),
    ("T0 warrant", mint(make_claims(tier=Tier.T0), KEYS), {"required_tier": Tier.T2}, "warrant.tier"),
    ("deny warrant", mint(make_claims(tier=Tier.DENY), KEYS), {"required_tier": Tier.T2}, "warrant.tier"),
    (
        "unknown constraint",
        craft(HEADER, payload_with(con=con_with(address="10.0.0.1"))),
        {},
        "warrant.unknown_constraint",
    ),
    ("method", VALID, {"request": replace(REQUEST, method="DELETE")}, "warrant.mismatch.method"),
    ("scheme", VALID, {"request": replace(REQUEST, scheme="http")}, "warrant.mismatch.scheme"),
    ("host", VALID, {"request": replace(REQUEST, host="api.stripe.com.evil")}, "warrant.mismatch.host"),
    ("port", VALID, {"request": replace(REQUEST, port=8443)}, "warrant.mismatch.port"),
    ("path", VALID, {"request": replace(REQUEST, path="/v1/refunds/all")}, "warrant.mismatch.path"),
    ("query", VALID, {"request": replace(REQUEST, query="expand=all")}, "warrant.mismatch.query"),
    ("no query", VALID, {"request": replace(REQUEST, query="")}, "warrant.mismatch.query"),
    ("body", VALID, {"request": replace(REQUEST, body=b"{}", body_sha256="")}, "warrant.mismatch.body"),
]


@pytest.mark.parametrize(("token", "kwargs", "code"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_each_defect_is_refused_with_its_own_code(token: str, kwargs: dict[str, object], code: str) -> None:
    assert outcome(check(token, **kwargs)) == code  # type: ignore[arg-type]


def test_refusal_carries_a_readable_reason() -> None:
    result = check(VALID, agent="agent-2")
    assert isinstance(result, WarrantRefused)
    assert "agent-2" in result.reason


def test_leeway_tolerates_small_clock_skew_only() -> None:
    assert outcome(check(VALID, now=NOW + 905, leeway=10)) == "valid"
    assert outcome(check(VALID, now=NOW + 915, leeway=10)) == "warrant.expired"
    early = mint(make_claims(nbf=int(NOW) + 5), KEYS)
    assert outcome(check(early, leeway=10)) == "valid"


def test_mint_refuses_a_warrant_too_long_to_verify() -> None:
    with pytest.raises(ValueError):
        mint(make_claims(approvals=(Approval(who="alice", at=NOW, justification="x" * 40_000),)), KEYS)


def test_T3_warrant_covers_a_T2_request() -> None:
    assert outcome(check(mint(make_claims(tier=Tier.T3), KEYS), required_tier=Tier.T2)) == "valid"


# --- keys ---------------------------------------------------------------------------------------


def test_rotated_out_key_id_is_unknown_and_no_other_key_is_tried() -> None:
    both = WarrantKeys({"k1": SECRET, "k2": OTHER_SECRET}, "k2")
    assert outcome(check(VALID, keys=both)) == "valid"
    assert outcome(check(VALID, keys=WarrantKeys({"k2": OTHER_SECRET}, "k2"))) == "warrant.unknown_key"
    # Signed with k1's secret but naming k2: k1 must not be tried as a fallback.
    lying = craft({**HEADER, "kid": "k2"}, payload_with())
    assert outcome(check(lying, keys=both)) == "warrant.bad_signature"


@pytest.mark.parametrize(
    ("keys", "active"),
    [({"k1": b"short"}, "k1"), ({"k1": SECRET}, "k2"), ({}, "k1"), ({"": SECRET}, "")],
    ids=["short secret", "active kid missing", "no keys", "empty kid"],
)
def test_bad_key_sets_are_refused_at_construction(keys: dict[str, bytes], active: str) -> None:
    with pytest.raises(ValueError):
        WarrantKeys(keys, active)


def test_key_set_is_a_private_copy_and_hides_secrets() -> None:
    source = {"k1": SECRET}
    keys = WarrantKeys(source, "k1")
    source["k1"] = OTHER_SECRET
    assert keys.keys["k1"] == SECRET
    assert SECRET.decode() not in repr(keys)


# --- binding ------------------------------------------------------------------------------------


def test_bind_exact_pins_path_query_and_body() -> None:
    con = constraints_for(REQUEST)
    assert (con.path, con.query, con.body_sha256) == (
        REQUEST.path,
        REQUEST.query,
        REQUEST.body_sha256,
    )


def test_bind_path_ignores_query_and_body() -> None:
    token = mint(make_claims(con=constraints_for(REQUEST, bind=Bind.PATH)), KEYS)
    other = replace(REQUEST, query="x=1", body=b"other", body_sha256="")
    assert outcome(check(token, other)) == "valid"
    assert outcome(check(token, replace(other, path="/v1/charges"))) == "warrant.mismatch.path"


def test_bind_host_ignores_path_but_not_host_port_or_method() -> None:
    token = mint(make_claims(con=constraints_for(REQUEST, bind=Bind.HOST, max_uses=3)), KEYS)
    assert outcome(check(token, replace(REQUEST, path="/v1/charges", query=""))) == "valid"
    assert outcome(check(token, replace(REQUEST, port=444))) == "warrant.mismatch.port"
    assert outcome(check(token, replace(REQUEST, method="GET"))) == "warrant.mismatch.method"


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        ("/v1", "/v1", "valid"),
        ("/v1", "/v1/refunds", "valid"),
        ("/v1", "/v1x/refunds", "warrant.mismatch.path"),
        ("/v1/", "/v1/refunds", "valid"),
        ("/v1/refunds", "/v1/refunds-all", "warrant.mismatch.path"),
    ],
)
def test_path_prefix_covers_whole_segments_only(prefix: str, path: str, expected: str) -> None:
    con = replace(constraints_for(REQUEST, bind=Bind.HOST), path_prefix=prefix)
    token = mint(make_claims(con=con), KEYS)
    assert outcome(check(token, replace(REQUEST, path=path))) == expected


def test_constraint_claim_omits_unset_fields() -> None:
    claim = constraints_for(REQUEST, bind=Bind.HOST).as_claim()
    assert claim == {
        "method": "POST",
        "scheme": "https",
        "host": "api.stripe.com",
        "port": 443,
        "max_uses": 1,
    }


@pytest.mark.parametrize("changes", [{"port": 0}, {"max_uses": 0}, {"body_sha256": "ABC"}])
def test_invalid_constraints_are_refused_at_construction(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        replace(constraints_for(REQUEST), **changes)  # type: ignore[arg-type]


def test_constraints_are_built_from_the_request() -> None:
    assert constraints_for(REQUEST, bind=Bind.PATH) == Constraints(
        method="POST",
        scheme="https",
        host="api.stripe.com",
        port=443,
        path="/v1/refunds",
        path_prefix=None,
        query=None,
        body_sha256=None,
    )


# --- tampering and arbitrary input --------------------------------------------------------------


@settings(max_examples=500)
@given(st.data())
def test_flipping_any_bit_of_a_valid_token_never_verifies(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(VALID) - 1))
    bit = data.draw(st.integers(0, 15))
    flipped = VALID[:index] + chr(ord(VALID[index]) ^ (1 << bit)) + VALID[index + 1 :]
    assert not isinstance(check(flipped), WarrantValid)


@settings(max_examples=300)
@given(st.data())
def test_replacing_dropping_or_inserting_a_character_never_verifies(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(VALID) - 1))
    char = data.draw(st.characters())
    edits = [
        VALID[:index] + char + VALID[index + 1 :],
        VALID[:index] + VALID[index + 1 :],
        VALID[:index] + char + VALID[index:],
    ]
    for edited in edits:
        if edited != VALID:
            assert not isinstance(check(edited), WarrantValid)


def test_every_single_character_substitution_in_the_signature_is_refused() -> None:
    # Exhaustive over the base64url alphabet, including the last character's unused bits.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    start = VALID.rindex(".") + 1
    for index in range(start, len(VALID)):
        for char in alphabet:
            if char != VALID[index]:
                edited = VALID[:index] + char + VALID[index + 1 :]
                assert outcome(check(edited)) in {"warrant.bad_signature", "warrant.malformed"}


@given(st.text())
def test_verify_never_raises_on_arbitrary_text(token: str) -> None:
    assert isinstance(check(token), WarrantRefused)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(
    header=st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "x"]), _JSON) | _JSON,
    payload=st.fixed_dictionaries({}, optional=dict.fromkeys(payload_with(), _JSON)) | _JSON,
    signed=st.booleans(),
)
def test_verify_never_raises_on_well_formed_tokens_with_arbitrary_claims(
    header: object, payload: object, signed: bool
) -> None:
    token = craft(header, payload, key=SECRET if signed else None)
    assert isinstance(check(token), WarrantValid | WarrantRefused)


@given(
    con=st.dictionaries(
        st.sampled_from(["method", "scheme", "host", "port", "path", "path_prefix", "query", "body_sha256"]),
        _JSON,
    )
)
def test_signed_tokens_with_arbitrary_constraints_never_raise(con: dict[str, object]) -> None:
    token = craft(HEADER, payload_with(con=con))
    assert isinstance(check(token), WarrantValid | WarrantRefused)


def test_a_token_without_kid_is_checked_against_the_active_key() -> None:
    token = craft({"alg": "HS256", "typ": "warrant+jwt"}, payload_with())
    assert isinstance(
        verify(token, REQUEST, agent=AGENT, keys=KEYS, now=NOW, required_tier=Tier.T2), WarrantValid
    )


def _rule_with_warrant(text: str, tier: str = "T2") -> Rule:
    document = f"version: 1\nrules:\n  - id: r\n    action: a\n    tier: {tier}\n    warrant: {text}\n"
    return load_rules(document).rules[0]


@pytest.mark.parametrize(
    ("tier", "warrant", "expected"),
    [
        pytest.param(Tier.T2, None, (900, 1, Bind.EXACT), id="t2-defaults"),
        pytest.param(Tier.T3, None, (300, 1, Bind.EXACT), id="t3-defaults"),
        pytest.param(Tier.T2, "{ttl: 10m, max_uses: 3, bind: path}", (600, 3, Bind.PATH), id="rule-shortens"),
        pytest.param(Tier.T3, "{ttl: 1h, bind: host}", (300, 1, Bind.HOST), id="rule-cannot-lengthen"),
    ],
)
def test_warrant_terms_come_from_the_rule_within_the_tier_default(
    tier: Tier, warrant: str | None, expected: tuple[int, int, Bind]
) -> None:
    rule = _rule_with_warrant(warrant, tier.value) if warrant else None
    terms = terms_for(tier, rule)
    assert (terms.ttl_seconds, terms.max_uses, terms.bind) == expected


def test_content_type_binding_keeps_parameter_values_exact() -> None:
    from policy.warrants import content_type_of

    def of(value: str) -> str:
        return content_type_of(
            Request(
                method="POST",
                scheme="https",
                host="h",
                port=443,
                path="/",
                headers=(("content-type", value),),
            )
        )

    assert of("Multipart/Form-Data; Boundary=AB") == "multipart/form-data;boundary=AB"
    assert of("multipart/form-data; boundary=ab") != of("multipart/form-data; boundary=AB")
    assert of("text/plain ; charset = utf-8") == "text/plain;charset=utf-8"


# --- EdDSA (the fleet authority's warrants) -----------------------------------------------------

ED_PRIVATE = Ed25519PrivateKey.from_private_bytes(b"e" * 32)
ED_PUBLIC = ED_PRIVATE.public_key()
ED_KID = public_key_id(ED_PUBLIC)
ED_RAW = ED_PUBLIC.public_bytes(Encoding.Raw, PublicFormat.Raw)
PUBLIC_ONLY = WarrantKeys({}, None, public_keys={ED_KID: ED_PUBLIC})


def ed_craft(header: object, payload: object, private: Ed25519PrivateKey = ED_PRIVATE) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(private.sign(signing_input.encode()))}"


def test_eddsa_warrant_verifies_with_the_public_key_only() -> None:
    token = mint_eddsa(make_claims(), ED_PRIVATE, ED_KID)
    result = check(token, keys=PUBLIC_ONLY)
    assert isinstance(result, WarrantValid)
    assert result.claims == make_claims()
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "EdDSA", "kid": ED_KID, "typ": "warrant+jwt"}


def test_public_only_keys_cannot_mint() -> None:
    with pytest.raises(ValueError, match="verify only"):
        mint(make_claims(), PUBLIC_ONLY)


def test_alg_confusion_hs256_signed_with_the_public_key_is_refused() -> None:
    # The classic attack: the verifier's public key bytes used as an HMAC secret.
    forged = craft({"alg": "HS256", "typ": "warrant+jwt", "kid": ED_KID}, payload_with(), key=ED_RAW)
    assert outcome(check(forged, keys=PUBLIC_ONLY)) == "warrant.algorithm"
    # The same with a sidecar that also holds an HMAC key: the kid still says EdDSA.
    both = WarrantKeys({"k1": SECRET}, "k1", public_keys={ED_KID: ED_PUBLIC})
    assert outcome(check(forged, keys=both)) == "warrant.algorithm"
    # And an HS256 token naming no kid in public-only mode has nothing to verify with.
    bare = craft({"alg": "HS256", "typ": "warrant+jwt"}, payload_with(), key=ED_RAW)
    assert outcome(check(bare, keys=PUBLIC_ONLY)) == "warrant.algorithm"


def test_eddsa_token_naming_an_hmac_kid_is_refused() -> None:
    both = WarrantKeys({"k1": SECRET}, "k1", public_keys={ED_KID: ED_PUBLIC})
    token = ed_craft({"alg": "EdDSA", "typ": "warrant+jwt", "kid": "k1"}, payload_with())
    assert outcome(check(token, keys=both)) == "warrant.algorithm"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"alg": "EdDSA", "typ": "warrant+jwt", "kid": "ed-unknown"}, "warrant.unknown_key"),
        ({"alg": "EdDSA", "typ": "warrant+jwt"}, "warrant.unknown_key"),
        ({"alg": "none", "typ": "warrant+jwt", "kid": ED_KID}, "warrant.algorithm"),
        ({"alg": "Ed448", "typ": "warrant+jwt", "kid": ED_KID}, "warrant.algorithm"),
        ({"alg": "EdDSA", "typ": "JWT", "kid": ED_KID}, "warrant.type"),
    ],
    ids=["unknown kid", "no kid", "none", "Ed448", "wrong typ"],
)
def test_eddsa_header_refusals(header: dict[str, object], expected: str) -> None:
    assert outcome(check(ed_craft(header, payload_with()), keys=PUBLIC_ONLY)) == expected


def test_eddsa_signed_by_another_key_or_edited_is_refused() -> None:
    other = Ed25519PrivateKey.from_private_bytes(b"f" * 32)
    header = {"alg": "EdDSA", "typ": "warrant+jwt", "kid": ED_KID}
    assert (
        outcome(check(ed_craft(header, payload_with(), other), keys=PUBLIC_ONLY)) == "warrant.bad_signature"
    )
    token = mint_eddsa(make_claims(), ED_PRIVATE, ED_KID)
    head, _, signature = token.split(".")
    edited = f"{head}.{b64(json.dumps(payload_with(sub='someone-else')).encode())}.{signature}"
    assert outcome(check(edited, keys=PUBLIC_ONLY)) == "warrant.bad_signature"


def test_jwk_round_trip_and_refusals() -> None:
    jwk = jwk_of(ED_PUBLIC, ED_KID)
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["alg"] == "EdDSA"
    kid, key = public_key_from_jwk(jwk)
    assert kid == ED_KID and key.public_bytes(Encoding.Raw, PublicFormat.Raw) == ED_RAW
    for bad in (
        {**jwk, "kty": "oct", "k": b64(SECRET)},
        {**jwk, "crv": "X25519"},
        {**jwk, "alg": "HS256"},
        {**jwk, "x": b64(b"short")},
        {key_: value for key_, value in jwk.items() if key_ != "kid"},
    ):
        with pytest.raises(ValueError):
            public_key_from_jwk(bad)
