"""Requests the policy lets through at once (T0, T1), their limits, and how upstream trouble is answered."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    AGENT_ID,
    TOKENS,
    Sidecar,
    Upstream,
    assert_refused,
    clean_env,
    free_port,
    unique,
)


def test_t0_get_is_forwarded_marked_allow_and_seen_by_the_upstream(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    path = "/" + unique("t0")
    response = sidecar.request("GET", upstream.url(path + "?q=1"), headers={"X-Probe": "yes"})
    assert response.status_code == 200
    assert response.headers["Vienna-Decision"] == "allow"
    assert response.json() == {"ok": True, "method": "GET", "path": path}
    [seen] = upstream.seen(path)
    assert (seen.method, seen.query, seen.header("x-probe")) == ("GET", "q=1", "yes")


def test_vienna_warrant_header_never_reaches_the_upstream(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/" + unique("t0-warrant-header")
    response = sidecar.request("GET", upstream.url(path), warrant="some.agent.token")
    assert response.status_code == 200
    [seen] = upstream.seen(path)
    assert "vienna-warrant" not in seen.header_names


def test_t1_post_is_forwarded_with_its_body(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/notes/" + unique("t1")
    response = sidecar.request("POST", upstream.url(path), data=b'{"note": "hi"}')
    assert response.status_code == 200
    assert response.headers["Vienna-Decision"] == "allow"
    [seen] = upstream.seen(path)
    assert (seen.method, seen.body) == ("POST", b'{"note": "hi"}')


def test_t1_rule_over_its_rate_is_refused_429_with_retry_after(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/limited/" + unique("rate")
    statuses = [sidecar.request("POST", upstream.url(path), data=b"x").status_code for _ in range(2)]
    assert statuses == [200, 200]
    refused = sidecar.request("POST", upstream.url(path), data=b"x")
    body = assert_refused(refused, 429, "denied", "policy.rate_limited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert body["tier"] == "T1"
    assert body["intent"]["rule"] == "limited"
    assert len(upstream.seen(path)) == 2


def test_deny_tier_is_refused_even_for_a_read(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/forbidden/" + unique("deny")
    body = assert_refused(sidecar.request("GET", upstream.url(path)), 403, "denied", "policy.deny")
    assert body["tier"] == "deny"
    assert "warrant_request" not in body
    assert upstream.seen(path) == []


def test_redirect_from_the_upstream_is_relayed_not_followed(sidecar: Sidecar, upstream: Upstream) -> None:
    response = sidecar.request("GET", upstream.url("/redirect"))
    assert response.status_code == 302
    assert response.headers["Location"] == "/landing"
    assert response.headers["Vienna-Decision"] == "allow"
    assert upstream.seen("/landing") == []


def test_upstream_with_nothing_listening_is_answered_502_json(sidecar: Sidecar) -> None:
    response = sidecar.request("GET", f"http://127.0.0.1:{free_port()}/" + unique("down"))
    assert response.status_code == 502
    assert response.headers["Vienna-Decision"] == "deny"
    body = response.json()
    assert (body["error"], body["reason_code"]) == ("upstream_error", "upstream.unreachable")
    assert body["tier"] == "T0"


def test_upstream_slower_than_the_upstream_timeout_is_answered_504(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    started = time.monotonic()
    response = sidecar.request("GET", upstream.url("/slow?seconds=6"))
    assert response.status_code == 504
    assert response.headers["Vienna-Decision"] == "deny"
    body = response.json()
    assert (body["error"], body["reason_code"]) == ("upstream_timeout", "upstream.timeout")
    assert time.monotonic() - started < 5  # answered at the 1 s timeout, not when the upstream was done


def test_body_over_max_body_bytes_with_content_length_is_refused_413(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    path = "/items/" + unique("big")
    refused = sidecar.request("POST", upstream.url(path), data=b"x" * 5000)
    assert_refused(refused, 413, "bad_request", "request.body_too_large")
    assert upstream.seen(path) == []


def test_chunked_body_over_max_body_bytes_is_refused_413(sidecar: Sidecar, upstream: Upstream) -> None:
    # /items is T2: the decision needs the body (a warrant binds its hash), so it is buffered and limited
    path = "/items/" + unique("big-chunked")

    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b"y" * 1000

    refused = sidecar.request("POST", upstream.url(path), data=chunks())
    assert_refused(refused, 413, "bad_request", "request.body_too_large")
    assert upstream.seen(path) == []
    # mitmproxy refused it before our request hook; the error hook still audits it
    events = sidecar.api("GET", "/v1/audit?after=0&limit=10000", token=TOKENS["alice"]).json()["events"]
    recorded = [e for e in events if e["type"] == "decision" and e["payload"]["request"].get("path") == path]
    assert [e["payload"]["reason_code"] for e in recorded] == ["request.body_too_large"]
    assert recorded[0]["payload"]["forwarded"] is False


def test_host_header_disagreeing_with_the_target_is_refused_400(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/" + unique("host-mismatch")
    refused = sidecar.request("GET", upstream.url(path), headers={"Host": "localhost:1"})
    assert_refused(refused, 400, "bad_request", "request.host_mismatch")
    assert upstream.seen(path) == []


def test_head_is_relayed_with_the_upstream_length_and_no_body(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/" + unique("head")
    response = sidecar.request("HEAD", upstream.url(path))
    assert (response.status_code, response.headers["Vienna-Decision"]) == (200, "allow")
    assert int(response.headers["Content-Length"]) > 0
    assert response.content == b""
    assert [seen.method for seen in upstream.seen(path)] == ["HEAD"]


def test_chunked_upstream_response_is_relayed_as_it_streams(sidecar: Sidecar, upstream: Upstream) -> None:
    response = sidecar.request("GET", upstream.url("/chunked"))
    assert response.status_code == 200
    assert response.content == b"chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;"
    assert response.headers["Transfer-Encoding"] == "chunked"  # streamed, never re-framed whole


def test_upstream_response_announced_over_max_response_bytes_is_answered_502(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    assert sidecar.request("GET", upstream.url("/big?bytes=60000")).content == b"z" * 60000
    response = sidecar.request("GET", upstream.url("/big?bytes=70000"))
    assert response.status_code == 502
    assert response.headers["Vienna-Decision"] == "deny"
    assert (response.json()["error"], response.json()["reason_code"]) == (
        "upstream_error",
        "response.too_large",
    )


def test_duplicate_warrant_headers_are_refused_400(
    sidecar: Sidecar, upstream: Upstream, tmp_path: Path
) -> None:
    path = "/" + unique("two-warrants")
    status, headers, body = curl(
        sidecar, tmp_path, "-H", "Vienna-Warrant: a", "-H", "Vienna-Warrant: b", upstream.url(path)
    )
    assert (status, headers["vienna-decision"]) == (400, "deny")
    assert json.loads(body)["reason_code"] == "request.duplicate_warrant"
    assert upstream.seen(path) == []


def test_websocket_upgrade_on_a_rule_without_websocket_is_refused_403(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    path = "/" + unique("upgrade")
    refused = sidecar.request(
        "GET", upstream.url(path), headers={"Upgrade": "websocket", "Connection": "Upgrade"}
    )
    assert_refused(refused, 403, "denied", "request.upgrade")
    assert upstream.seen(path) == []


def test_h2c_upgrade_offer_is_dropped_and_the_request_forwarded(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/" + unique("h2c")
    response = sidecar.request(
        "GET",
        upstream.url(path),
        headers={
            "Upgrade": "h2c",
            "Connection": "Upgrade, HTTP2-Settings",
            "HTTP2-Settings": "AAMAAABkAAQAAP__",
        },
    )
    assert (response.status_code, response.headers["Vienna-Decision"]) == (200, "allow")
    [seen] = upstream.seen(path)
    assert seen.header("upgrade") is None and seen.header("http2-settings") is None


@pytest.mark.parametrize(
    ("sent", "status", "reason_code", "forwarded"),
    [
        ("/items/../forbidden/{id}", 403, "policy.deny", None),  # classified as what it resolves to
        ("/forbidden/%2e%2e/{id}", 200, None, "/{id}"),  # encoded dot-segments resolve too, and that is sent
        ("/{id}/./x/../y", 200, None, "/{id}/y"),
        ("/{id}/a%2fb", 400, "request.ambiguous_path", None),  # an encoded slash is never guessed at
        ("/{id}/a\\b", 400, "request.ambiguous_path", None),
    ],
)
def test_what_is_classified_is_exactly_what_is_forwarded(
    sidecar: Sidecar,
    upstream: Upstream,
    tmp_path: Path,
    sent: str,
    status: int,
    reason_code: str | None,
    forwarded: str | None,
) -> None:
    marker = unique("norm")
    got, headers, body = curl(sidecar, tmp_path, "--path-as-is", upstream.url(sent.format(id=marker)))
    assert got == status, body
    if reason_code is not None:
        assert headers["vienna-decision"] == "deny"
        assert json.loads(body)["reason_code"] == reason_code
        assert not any(marker in seen.path for seen in upstream.seen())
    else:
        assert forwarded is not None
        assert [seen.path for seen in upstream.seen() if marker in seen.path] == [forwarded.format(id=marker)]


def test_every_decision_is_in_the_audit_log_and_on_stdout(sidecar: Sidecar, upstream: Upstream) -> None:
    response = sidecar.request("GET", upstream.url("/" + unique("audited")))
    decision_id = response.headers["Vienna-Decision-Id"]
    listed = sidecar.api("GET", "/v1/audit?after=0&limit=10000", token=TOKENS["alice"])
    assert listed.status_code == 200
    decisions = [
        event
        for event in listed.json()["events"]
        if event["type"] == "decision" and event["payload"]["decision_id"] == decision_id
    ]
    assert len(decisions) == 1
    assert decisions[0]["payload"]["forwarded"] is True
    assert decisions[0]["agent"] == AGENT_ID
    lines = [json.loads(line) for line in sidecar.log_text().splitlines() if line.startswith("{")]
    assert any(line.get("payload", {}).get("decision_id") == decision_id for line in lines)


# Refusals made once a request is parsed. (Those mitmproxy makes at the protocol level — a body over
# --max-body-bytes, bad framing, an oversize head — are answered before our request hook: the error hook audits those with a flow (see the chunked 413 test); an oversize head has none.)
REFUSALS: dict[str, tuple[str, str, dict[str, str], bytes | None]] = {
    # name: (method, path, headers, body)
    "host_mismatch": ("GET", "/{id}", {"Host": "localhost:1"}, None),
    "upgrade": ("GET", "/{id}", {"Upgrade": "websocket", "Connection": "Upgrade"}, None),
    "deny_tier": ("GET", "/forbidden/{id}", {}, None),
    "warrant_required": ("PUT", "/items/{id}", {}, b"x"),
    "warrant_invalid": ("PUT", "/items/{id}", {"Vienna-Warrant": "a.b.c"}, b"x"),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_every_refusal_is_in_the_audit_log_with_its_decision_id(
    sidecar: Sidecar, upstream: Upstream, kind: str
) -> None:
    method, path, headers, body = REFUSALS[kind]
    refused = sidecar.request(method, upstream.url(path.format(id=unique(kind))), headers=headers, data=body)
    assert refused.status_code in (400, 403)
    decision_id = refused.headers["Vienna-Decision-Id"]
    assert refused.json()["decision_id"] == decision_id
    events = sidecar.api("GET", "/v1/audit?after=0&limit=10000", token=TOKENS["alice"]).json()["events"]
    recorded = [
        event
        for event in events
        if event["type"] == "decision" and event["payload"]["decision_id"] == decision_id
    ]
    assert len(recorded) == 1, f"no audited decision {decision_id} for a {kind} refusal"
    assert recorded[0]["payload"]["forwarded"] is False


def test_audit_log_needs_an_operator_token(sidecar: Sidecar) -> None:
    assert sidecar.api("GET", "/v1/audit").status_code == 401
    assert sidecar.api("GET", "/v1/audit", token="not-a-token").status_code == 401


# --- curl as the client ---------------------------------------------------------------------------


def curl(sidecar: Sidecar, tmp_path: Path, *args: str) -> tuple[int, dict[str, str], bytes]:
    headers_file, body_file = tmp_path / "headers.txt", tmp_path / "body.bin"
    done = subprocess.run(
        ["curl", "-sS", "-x", sidecar.proxy_url, "-D", str(headers_file), "-o", str(body_file), *args],
        capture_output=True,
        timeout=30,
        env=clean_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # through CONNECT the file holds the proxy's "200 Connection established" block first: use the last
    blocks = [block for block in headers_file.read_text().split("\n\n") if block.strip()]
    lines = blocks[-1].splitlines()
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return status, headers, body_file.read_bytes()


def test_curl_t0_is_forwarded(sidecar: Sidecar, upstream: Upstream, tmp_path: Path) -> None:
    path = "/" + unique("curl-t0")
    status, headers, body = curl(sidecar, tmp_path, upstream.url(path))
    assert status == 200
    assert headers["vienna-decision"] == "allow"
    assert json.loads(body)["path"] == path
    assert len(upstream.seen(path)) == 1


def test_curl_t3_gets_the_passback_then_goes_through_with_the_warrant(
    sidecar: Sidecar, upstream: Upstream, tmp_path: Path
) -> None:
    path = "/repos/acme/" + unique("curl")
    status, headers, body = curl(sidecar, tmp_path, "-X", "DELETE", upstream.url(path))
    assert status == 403
    assert headers["vienna-decision"] == "deny"
    passback = json.loads(body)
    assert (passback["error"], passback["tier"]) == ("warrant_required", "T3")
    request_id = passback["warrant_request"]["id"]
    for who in ("alice", "bob"):
        assert sidecar.approve(request_id, who).status_code == 200
    warrant = sidecar.get_request(request_id)["warrant"]
    status, headers, _ = curl(
        sidecar, tmp_path, "-X", "DELETE", "-H", f"Vienna-Warrant: {warrant}", upstream.url(path)
    )
    assert (status, headers["vienna-decision"]) == (200, "allow")
    [seen] = upstream.seen(path)
    assert "vienna-warrant" not in seen.header_names


def test_curl_over_https_and_http2_gets_the_passback_then_goes_through_with_the_warrant(
    sidecar: Sidecar, tls_upstream: Upstream, sidecar_ca_file: Path, tmp_path: Path
) -> None:
    path = "/repos/acme/" + unique("curl-h2")
    url = tls_upstream.url(path, host="localhost")
    tls = ("--http2", "--cacert", str(sidecar_ca_file), "-X", "DELETE")
    status, headers, body = curl(sidecar, tmp_path, *tls, url)
    assert (status, headers["vienna-decision"]) == (403, "deny")
    passback = json.loads(body)
    assert (passback["error"], passback["constraints"]["scheme"]) == ("warrant_required", "https")
    request_id = passback["warrant_request"]["id"]
    for who in ("alice", "bob"):
        assert sidecar.approve(request_id, who).status_code == 200
    warrant = sidecar.get_request(request_id)["warrant"]

    status, headers, _ = curl(sidecar, tmp_path, *tls, "-H", f"Vienna-Warrant: {warrant}", url)
    assert (status, headers["vienna-decision"]) == (200, "allow")
    [seen] = tls_upstream.seen(path)
    assert "vienna-warrant" not in seen.header_names
