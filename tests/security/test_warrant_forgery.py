"""Warrant forgery: tokens no operator approved, or approved for something else, on a T3 request.

The target is `DELETE /repos/acme/<repo>` (T3) on the plain upstream. Every forgery is refused with its
own `warrant.*` reason code and nothing reaches the upstream; the control shows the same construction
with everything right is forwarded, so the refusals are about the forged part and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import pytest

from policy.model import Tier
from tests.security.support import (
    AGENT_ID,
    Binding,
    RawResponse,
    Sidecar,
    Upstream,
    assert_refused,
    b64json,
    b64url,
    connect_tunnel,
    hand_signed,
    mint_for,
    one,
    raw_request,
    read_responses,
    unique,
    warrant_claims,
)


def _binding(upstream: Upstream, repo: str) -> Binding:
    return Binding(method="DELETE", path=f"/repos/acme/{repo}", port=upstream.port)


def _delete(main: Sidecar, upstream: Upstream, repo: str, *warrants: str) -> RawResponse:
    headers = [("Vienna-Warrant", token) for token in warrants]
    return one(
        main.exchange(raw_request("DELETE", upstream.authority, f"/repos/acme/{repo}", headers=headers))
    )


def test_control_a_correctly_minted_warrant_is_forwarded_once_without_its_header(
    main: Sidecar, upstream: Upstream
) -> None:
    repo = unique("repo")
    answer = _delete(main, upstream, repo, mint_for(main, _binding(upstream, repo)))
    assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
    [seen] = upstream.seen_containing(repo)
    assert (seen.method, seen.header("vienna-warrant")) == ("DELETE", None)


# Each forger gets the sidecar, a correct payload for the request, and builds the token an attacker would.
Forger = Callable[[Sidecar, dict[str, object]], str]


def _header(main: Sidecar, **changes: object) -> dict[str, object]:
    header: dict[str, object] = {"alg": "HS256", "typ": "warrant+jwt", "kid": main.kid}
    header.update(changes)
    return {key: value for key, value in header.items() if value is not None}


def _signed(main: Sidecar, payload: dict[str, object], **header: object) -> str:
    return hand_signed(_header(main, **header), payload, main.secret)


def _swap_payload(token: str, payload: dict[str, object]) -> str:
    head, _, signature = token.split(".")
    return f"{head}.{b64json(payload)}.{signature}"


def _truncated_signature(token: str) -> str:
    head, payload, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    return f"{head}.{payload}.{b64url(raw[:-3])}"


def _edited(field: str, value: object) -> Forger:
    def forge(main: Sidecar, payload: dict[str, object]) -> str:
        token = _signed(main, payload)
        return _swap_payload(token, {**payload, field: value})

    return forge


def _edited_con(field: str, value: object) -> Forger:
    def forge(main: Sidecar, payload: dict[str, object]) -> str:
        token = _signed(main, payload)
        con = dict(payload["con"])  # type: ignore[call-overload]
        con[field] = value
        return _swap_payload(token, {**payload, "con": con})

    return forge


def _signed_con(field: str, value: object) -> Forger:
    """Correctly signed, but with one constraint changed: a warrant for something else."""

    def forge(main: Sidecar, payload: dict[str, object]) -> str:
        con = dict(payload["con"])  # type: ignore[call-overload]
        con[field] = value
        return _signed(main, {**payload, "con": con})

    return forge


FORGERIES: list[tuple[str, Forger, str]] = [
    (
        "alg-none-unsigned",
        lambda m, p: f"{b64json(_header(m, alg='none'))}.{b64json(p)}.",
        "warrant.algorithm",
    ),
    ("alg-none-signed", lambda m, p: _signed(m, p, alg="none"), "warrant.algorithm"),
    ("alg-None-capitalised", lambda m, p: _signed(m, p, alg="None"), "warrant.algorithm"),
    ("alg-hs256-lower-case", lambda m, p: _signed(m, p, alg="hs256"), "warrant.algorithm"),
    (
        "alg-HS512",
        lambda m, p: hand_signed(_header(m, alg="HS512"), p, m.secret, "sha512"),
        "warrant.algorithm",
    ),
    (
        "alg-HS384",
        lambda m, p: hand_signed(_header(m, alg="HS384"), p, m.secret, "sha384"),
        "warrant.algorithm",
    ),
    ("alg-RS256-signed-with-hmac-key", lambda m, p: _signed(m, p, alg="RS256"), "warrant.algorithm"),
    ("alg-ES256", lambda m, p: _signed(m, p, alg="ES256"), "warrant.algorithm"),
    (
        "alg-missing",
        lambda m, p: hand_signed({"typ": "warrant+jwt", "kid": m.kid}, p, m.secret),
        "warrant.algorithm",
    ),
    ("typ-JWT", lambda m, p: _signed(m, p, typ="JWT"), "warrant.type"),
    ("typ-upper-case", lambda m, p: _signed(m, p, typ="WARRANT+JWT"), "warrant.type"),
    ("typ-missing", lambda m, p: hand_signed({"alg": "HS256", "kid": m.kid}, p, m.secret), "warrant.type"),
    ("kid-unknown", lambda m, p: _signed(m, p, kid="k-0000000000000000"), "warrant.unknown_key"),
    ("kid-path-traversal", lambda m, p: _signed(m, p, kid="../../../../dev/null"), "warrant.unknown_key"),
    ("kid-number", lambda m, p: _signed(m, p, kid=1), "warrant.unknown_key"),
    (
        # without a kid the active key is used, so only a token signed with another secret can fail
        "kid-missing-other-secret",
        lambda m, p: hand_signed(
            {"alg": "HS256", "typ": "warrant+jwt"}, p, b"an-attacker-chosen-secret-0123456789"
        ),
        "warrant.bad_signature",
    ),
    ("header-jku", lambda m, p: _signed(m, p, jku="http://evil.example/keys"), "warrant.malformed"),
    ("header-crit", lambda m, p: _signed(m, p, crit=["exp"]), "warrant.malformed"),
    ("header-b64-false", lambda m, p: _signed(m, p, b64=False), "warrant.malformed"),
    ("signed-with-another-key", lambda m, p: hand_signed(_header(m), p, b"x" * 48), "warrant.bad_signature"),
    ("signed-with-empty-key", lambda m, p: hand_signed(_header(m), p, b""), "warrant.bad_signature"),
    ("signature-truncated", lambda m, p: _truncated_signature(_signed(m, p)), "warrant.bad_signature"),
    ("signature-not-base64url", lambda m, p: _signed(m, p)[:-6], "warrant.malformed"),
    ("signature-empty", lambda m, p: _signed(m, p).rsplit(".", 1)[0] + ".", "warrant.bad_signature"),
    ("edited-path", _edited_con("path", "/repos/acme/everything"), "warrant.bad_signature"),
    ("edited-method", _edited_con("method", "PUT"), "warrant.bad_signature"),
    ("edited-max-uses", _edited_con("max_uses", 1000), "warrant.bad_signature"),
    ("edited-exp", _edited("exp", 4102444800), "warrant.bad_signature"),
    ("edited-sub", _edited("sub", "another-agent"), "warrant.bad_signature"),
    ("edited-approvals", _edited("approvals", []), "warrant.bad_signature"),
    (
        "edited-tier-T2-to-T3",
        lambda m, p: _swap_payload(_signed(m, {**p, "tier": "T2"}), p),
        "warrant.bad_signature",
    ),
    ("padded-base64", lambda m, p: _signed(m, p).replace(".", "=.", 1), "warrant.malformed"),
    ("four-parts", lambda m, p: _signed(m, p) + ".AAAA", "warrant.malformed"),
    ("not-a-jwt", lambda m, p: "warrant-please", "warrant.malformed"),
    ("oversized", lambda m, p: _signed(m, {**p, "pad": "x" * 40000}), "warrant.malformed"),
    ("duplicate-claim", lambda m, p: _duplicate_sub(m, p), "warrant.malformed"),
    ("expired", lambda m, p: _signed(m, {**p, "exp": int(time.time()) - 1}), "warrant.expired"),
    ("not-yet-valid", lambda m, p: _signed(m, {**p, "nbf": int(time.time()) + 600}), "warrant.not_yet_valid"),
    ("another-agent", lambda m, p: _signed(m, {**p, "sub": "another-agent"}), "warrant.wrong_agent"),
    ("agent-id-case", lambda m, p: _signed(m, {**p, "sub": AGENT_ID.upper()}), "warrant.wrong_agent"),
    ("another-issuer", lambda m, p: _signed(m, {**p, "iss": "attacker"}), "warrant.issuer"),
    ("T2-warrant-on-T3-request", lambda m, p: _signed(m, {**p, "tier": "T2"}), "warrant.tier"),
    ("T0-warrant-on-T3-request", lambda m, p: _signed(m, {**p, "tier": "T0"}), "warrant.tier"),
    ("deny-tier-warrant", lambda m, p: _signed(m, {**p, "tier": "deny"}), "warrant.tier"),
    ("unknown-constraint", _signed_con("ip", "any"), "warrant.unknown_constraint"),
    ("other-method", _signed_con("method", "GET"), "warrant.mismatch.method"),
    ("other-scheme", _signed_con("scheme", "https"), "warrant.mismatch.scheme"),
    ("other-host", _signed_con("host", "localhost"), "warrant.mismatch.host"),
    ("other-port", _signed_con("port", 1), "warrant.mismatch.port"),
    ("other-query", _signed_con("query", "force=1"), "warrant.mismatch.query"),
    ("other-body", _signed_con("body_sha256", "0" * 64), "warrant.mismatch.body"),
]


def _duplicate_sub(main: Sidecar, payload: dict[str, object]) -> str:
    """`{"sub": "<agent>", ..., "sub": "another"}`: parsers differ on which one wins, so neither may."""
    text = json.dumps(payload, separators=(",", ":"))[:-1] + ',"sub":"another-agent"}'
    head = b64json(_header(main))
    body = b64url(text.encode())
    signature = hmac.new(main.secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


@pytest.mark.parametrize(("forge", "code"), [pytest.param(f, c, id=name) for name, f, c in FORGERIES])
def test_forged_warrant_is_refused_with_its_own_reason(
    main: Sidecar, upstream: Upstream, forge: Forger, code: str
) -> None:
    repo = unique("repo")
    payload = warrant_claims(_binding(upstream, repo)).as_payload()
    answer = _delete(main, upstream, repo, forge(main, payload))
    assert_refused(answer, 403, code, "warrant_invalid")
    assert not upstream.seen_containing(repo)


def test_a_warrant_is_used_once_then_refused_as_replayed(main: Sidecar, upstream: Upstream) -> None:
    repo = unique("repo")
    token = mint_for(main, _binding(upstream, repo))
    assert _delete(main, upstream, repo, token).status == 200
    assert_refused(_delete(main, upstream, repo, token), 403, "warrant.replayed", "warrant_invalid")
    assert len(upstream.seen_containing(repo)) == 1


def test_two_warrant_headers_are_refused(main: Sidecar, upstream: Upstream) -> None:
    repo = unique("repo")
    token = mint_for(main, _binding(upstream, repo))
    answer = _delete(main, upstream, repo, "forged.forged.forged", token)
    assert_refused(answer, 400, "request.duplicate_warrant", "bad_request")
    assert not upstream.seen_containing(repo)


def test_body_bound_warrant_refuses_another_body(main: Sidecar, upstream: Upstream) -> None:
    name = unique("file")
    token = mint_for(
        main, Binding(method="PUT", path=f"/files/{name}", port=upstream.port, body=b"approved"), tier=Tier.T2
    )
    request = raw_request(
        "PUT", upstream.authority, f"/files/{name}", headers=[("Vienna-Warrant", token)], body=b"swapped!"
    )
    assert_refused(one(main.exchange(request)), 403, "warrant.mismatch.body", "warrant_invalid")
    assert not upstream.seen_containing(name)


def test_warrant_header_on_a_t0_request_is_not_forwarded(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("t0")
    token = mint_for(main, Binding(method="GET", path=f"/ok/{marker}", port=upstream.port))
    answer = one(
        main.exchange(
            raw_request("GET", upstream.authority, f"/ok/{marker}", headers=[("Vienna-Warrant", token)])
        )
    )
    assert answer.status == 200, answer
    [seen] = upstream.seen_containing(marker)
    assert seen.header("vienna-warrant") is None


# --- a warrant sent where the inner request does not carry it -------------------------------------


def _tunnel_delete(
    main: Sidecar, tls_upstream: Upstream, repo: str, connect_extra: bytes, inner_extra: str
) -> RawResponse:
    tunnel, refusal = connect_tunnel(
        main.proxy_port, tls_upstream.authority, ca_file=main.ca_file, server_name=None, extra=connect_extra
    )
    assert tunnel is not None, refusal
    with tunnel:
        tunnel.sendall(
            f"DELETE /repos/acme/{repo} HTTP/1.1\r\nHost: {tls_upstream.authority}\r\n{inner_extra}"
            "Connection: close\r\n\r\n".encode()
        )
        return one(read_responses(tunnel, expect=1, timeout=5))


def test_warrant_on_the_connect_request_does_not_cover_the_inner_request(
    main: Sidecar, tls_upstream: Upstream
) -> None:
    repo = unique("repo")
    binding = Binding(method="DELETE", path=f"/repos/acme/{repo}", port=tls_upstream.port, scheme="https")
    token = mint_for(main, binding)
    on_connect = f"Proxy-Authorization: Bearer {token}\r\nVienna-Warrant: {token}\r\n".encode()
    assert_refused(
        _tunnel_delete(main, tls_upstream, repo, on_connect, ""), 403, "warrant.required", "warrant_required"
    )
    basic = base64.b64encode(f"agent:{token}".encode()).decode()
    in_proxy_auth = f"Proxy-Authorization: Basic {basic}\r\n"
    assert_refused(
        _tunnel_delete(main, tls_upstream, repo, b"", in_proxy_auth),
        403,
        "warrant.required",
        "warrant_required",
    )
    assert not tls_upstream.seen_containing(repo)
    # The same token, where it belongs, is valid: the refusals above were about where it was sent.
    answer = _tunnel_delete(main, tls_upstream, repo, b"", f"Vienna-Warrant: {token}\r\n")
    assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
    [seen] = tls_upstream.seen_containing(repo)
    assert seen.header("vienna-warrant") is None and seen.header("proxy-authorization") is None


def test_plain_http_warrant_in_proxy_authorization_is_ignored_and_not_forwarded(
    main: Sidecar, upstream: Upstream
) -> None:
    repo = unique("repo")
    token = mint_for(main, _binding(upstream, repo))
    request = raw_request(
        "DELETE",
        upstream.authority,
        f"/repos/acme/{repo}",
        headers=[("Proxy-Authorization", f"Bearer {token}")],
    )
    assert_refused(one(main.exchange(request)), 403, "warrant.required", "warrant_required")
    assert not upstream.seen_containing(repo)
