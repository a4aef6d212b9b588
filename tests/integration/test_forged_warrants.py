"""Warrants the operators never approved: each forgery is refused with its own reason, nothing is forwarded."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import replace

import jwt
import pytest

from policy.model import Intent, Tier
from policy.warrants import Approval, Constraints, WarrantClaims, WarrantKeys, mint
from proxy.keys import key_id
from tests.integration.harness import AGENT_ID, Sidecar, Upstream, assert_refused, unique

BODY = b'{"amount": 5}'


def claims_for(
    upstream: Upstream, path: str, *, now: float | None = None, **changes: object
) -> WarrantClaims:
    """Claims that cover `PUT <path>` with BODY on the plain upstream, as the sidecar would mint them."""
    issued = int(now if now is not None else time.time())
    claims = WarrantClaims(
        iss="vienna",
        sub=AGENT_ID,
        jti="wt_" + secrets.token_urlsafe(16),
        iat=issued,
        nbf=issued,
        exp=issued + 300,
        tier=Tier.T2,
        intent=Intent(action="demo.write_item", target=f"127.0.0.1{path}", rule="items-write"),
        approvals=(Approval(who="alice", at=float(issued), justification="looks fine"),),
        con=Constraints(
            method="PUT",
            scheme="http",
            host="127.0.0.1",
            port=upstream.port,
            path=path,
            path_prefix=None,
            query="",
            body_sha256=hashlib.sha256(BODY).hexdigest(),
            max_uses=1,
        ),
    )
    return replace(claims, **changes)  # type: ignore[arg-type]


def sidecar_keys(sidecar: Sidecar) -> WarrantKeys:
    secret = sidecar.warrant_secret
    return WarrantKeys(keys={key_id(secret): secret}, active_kid=key_id(secret))


def b64(data: Mapping[str, object]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_token_minted_with_the_sidecar_key_for_the_request_is_forwarded(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    """The control for the forgeries below: the same construction with everything right passes."""
    path = "/items/" + unique("minted")
    token = mint(claims_for(upstream, path), sidecar_keys(sidecar))
    response = sidecar.request("PUT", upstream.url(path), data=BODY, warrant=token)
    assert (response.status_code, response.headers["Vienna-Decision"]) == (200, "allow")
    assert len(upstream.seen(path)) == 1


def test_alg_none_token_is_refused(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("alg-none")
    header = {"alg": "none", "typ": "warrant+jwt", "kid": key_id(sidecar.warrant_secret)}
    token = f"{b64(header)}.{b64(claims_for(upstream, path).as_payload())}."
    refused = sidecar.request("PUT", upstream.url(path), data=BODY, warrant=token)
    assert_refused(refused, 403, "warrant_invalid", "warrant.algorithm")
    assert upstream.seen(path) == []


def test_token_signed_with_another_key_is_refused(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("wrong-key")
    token = jwt.encode(
        claims_for(upstream, path).as_payload(),
        secrets.token_bytes(48),
        algorithm="HS256",
        headers={"typ": "warrant+jwt", "kid": key_id(sidecar.warrant_secret)},
    )
    refused = sidecar.request("PUT", upstream.url(path), data=BODY, warrant=token)
    assert_refused(refused, 403, "warrant_invalid", "warrant.bad_signature")
    assert upstream.seen(path) == []


def test_token_under_an_unknown_key_id_is_refused(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("unknown-kid")
    other = secrets.token_bytes(48)
    token = mint(
        claims_for(upstream, path), WarrantKeys(keys={key_id(other): other}, active_kid=key_id(other))
    )
    refused = sidecar.request("PUT", upstream.url(path), data=BODY, warrant=token)
    assert_refused(refused, 403, "warrant_invalid", "warrant.unknown_key")
    assert upstream.seen(path) == []


def test_real_warrant_with_an_edited_payload_is_refused(sidecar: Sidecar, upstream: Upstream) -> None:
    """An operator-approved warrant for one path, its payload rewritten to cover another."""
    approved_path = "/items/" + unique("approved")
    wanted_path = "/items/" + unique("edited")
    warrant = sidecar.obtain_warrant("PUT", upstream.url(approved_path), data=BODY)
    header, payload, signature = warrant.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["con"]["path"] = wanted_path
    forged = f"{header}.{b64(claims)}.{signature}"
    refused = sidecar.request("PUT", upstream.url(wanted_path), data=BODY, warrant=forged)
    assert_refused(refused, 403, "warrant_invalid", "warrant.bad_signature")
    assert upstream.seen(wanted_path) == []
    # and the genuine warrant still works for what it was issued for
    assert sidecar.request("PUT", upstream.url(approved_path), data=BODY, warrant=warrant).status_code == 200


def test_expired_token_is_refused(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("expired")
    past = time.time() - 3600
    token = mint(claims_for(upstream, path, now=past), sidecar_keys(sidecar))
    refused = sidecar.request("PUT", upstream.url(path), data=BODY, warrant=token)
    assert_refused(refused, 403, "warrant_invalid", "warrant.expired")
    assert upstream.seen(path) == []


def test_not_yet_valid_token_is_refused(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("future")
    token = mint(claims_for(upstream, path, now=time.time() + 3600), sidecar_keys(sidecar))
    refused = sidecar.request("PUT", upstream.url(path), data=BODY, warrant=token)
    assert_refused(refused, 403, "warrant_invalid", "warrant.not_yet_valid")
    assert upstream.seen(path) == []


def test_token_for_another_agent_is_refused(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("other-agent")
    token = mint(claims_for(upstream, path, sub="other-agent"), sidecar_keys(sidecar))
    refused = sidecar.request("PUT", upstream.url(path), data=BODY, warrant=token)
    assert_refused(refused, 403, "warrant_invalid", "warrant.wrong_agent")
    assert upstream.seen(path) == []


def test_t2_warrant_does_not_cover_a_t3_request(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/repos/acme/" + unique("tier")
    claims = claims_for(upstream, path)
    token = mint(
        replace(
            claims, con=replace(claims.con, method="DELETE", body_sha256=hashlib.sha256(b"").hexdigest())
        ),
        sidecar_keys(sidecar),
    )
    refused = sidecar.request("DELETE", upstream.url(path), warrant=token)
    assert_refused(refused, 403, "warrant_invalid", "warrant.tier")
    assert upstream.seen(path) == []


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "x" * 40000])
def test_malformed_token_is_refused(sidecar: Sidecar, upstream: Upstream, token: str) -> None:
    path = "/items/" + unique("malformed")
    refused = sidecar.request("PUT", upstream.url(path), data=BODY, warrant=token)
    assert_refused(refused, 403, "warrant_invalid", "warrant.malformed")
    assert upstream.seen(path) == []
