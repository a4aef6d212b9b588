"""The passback loop: refused → warrant request → operators vote → warrant → the exact request goes through once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.integration.harness import TOKENS, Sidecar, Upstream, assert_refused, unique


def test_t2_passback_approval_retry_and_replay(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("t2")
    url = upstream.url(path + "?color=blue")

    refused = sidecar.request("PUT", url, data=b'{"size": 3}')
    passback = assert_refused(refused, 403, "warrant_required", "warrant.required")
    assert passback["tier"] == "T2"
    assert (passback["intent"]["action"], passback["intent"]["rule"]) == ("demo.write_item", "items-write")
    wr = passback["warrant_request"]
    assert (wr["status"], wr["approvals_required"]) == ("pending", 1)
    assert wr["url"] == f"{sidecar.api_url}/v1/warrant-requests/{wr['id']}"

    again = sidecar.request("PUT", url, data=b'{"size": 3}')
    assert (
        assert_refused(again, 403, "warrant_required", "warrant.required")["warrant_request"]["id"]
        == wr["id"]
    )
    assert "warrant" not in sidecar.get_request(wr["id"])
    assert upstream.seen(path) == []

    approved = sidecar.approve(wr["id"], "alice")
    assert approved.status_code == 200
    assert approved.json()["status"] == "approved"
    state = sidecar.get_request(wr["id"])
    assert state["status"] == "approved"
    warrant = state["warrant"]

    forwarded = sidecar.request("PUT", url, data=b'{"size": 3}', warrant=warrant)
    assert forwarded.status_code == 200
    assert forwarded.headers["Vienna-Decision"] == "allow"
    [seen] = upstream.seen(path)
    assert (seen.method, seen.query, seen.body) == ("PUT", "color=blue", b'{"size": 3}')
    assert "vienna-warrant" not in seen.header_names

    replay = sidecar.request("PUT", url, data=b'{"size": 3}', warrant=warrant)
    assert_refused(replay, 403, "warrant_invalid", "warrant.replayed")
    assert len(upstream.seen(path)) == 1


def test_t3_needs_two_distinct_operators_and_a_justification(sidecar: Sidecar, upstream: Upstream) -> None:
    repo = unique("widgets")
    path = f"/repos/acme/{repo}"
    passback = assert_refused(
        sidecar.request("DELETE", upstream.url(path)), 403, "warrant_required", "warrant.required"
    )
    assert passback["tier"] == "T3"
    assert passback["intent"] == {
        "action": "demo.delete_repo",
        "target": f"acme/{repo}",
        "rule": "delete-repo",
    }
    request_id = passback["warrant_request"]["id"]
    assert passback["warrant_request"]["approvals_required"] == 2

    first = sidecar.approve(request_id, "alice")
    assert first.status_code == 200
    assert (first.json()["status"], first.json()["approvals"]) == ("pending", 1)
    assert "warrant" not in sidecar.get_request(request_id)

    twice = sidecar.approve(request_id, "alice")
    assert twice.status_code == 409
    assert (twice.json()["error"], twice.json()["reason_code"]) == (
        "duplicate_vote",
        "approval.duplicate_vote",
    )

    unjustified = sidecar.approve(request_id, "bob", justification="   ")
    assert unjustified.status_code == 400
    assert unjustified.json()["reason_code"] == "approval.justification_required"

    bad_token = sidecar.api(
        "POST", f"/v1/warrant-requests/{request_id}/approve", token="not-a-token", body={"justification": "x"}
    )
    assert (bad_token.status_code, bad_token.json()["error"]) == (401, "unauthorized")
    no_token = sidecar.api("POST", f"/v1/warrant-requests/{request_id}/approve", body={"justification": "x"})
    assert (no_token.status_code, no_token.json()["error"]) == (401, "unauthorized")

    assert sidecar.get_request(request_id)["approvals"] == 1  # none of the refused votes counted
    assert upstream.seen(path) == []

    second = sidecar.approve(request_id, "bob")
    assert second.status_code == 200
    state = sidecar.get_request(request_id)
    assert (state["status"], state["approvals"]) == ("approved", 2)
    assert {vote["operator"] for vote in state["votes"]} == {"alice", "bob"}

    forwarded = sidecar.request("DELETE", upstream.url(path), warrant=state["warrant"])
    assert (forwarded.status_code, forwarded.headers["Vienna-Decision"]) == (200, "allow")
    assert len(upstream.seen(path)) == 1


def test_operator_deny_ends_the_request_without_a_warrant(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("denied")
    passback = assert_refused(
        sidecar.request("PUT", upstream.url(path), data=b"x"), 403, "warrant_required", "warrant.required"
    )
    request_id = passback["warrant_request"]["id"]

    denied = sidecar.deny(request_id, "carol")
    assert denied.status_code == 200
    state = sidecar.get_request(request_id)
    assert state["status"] == "denied"
    assert "warrant" not in state

    late = sidecar.approve(request_id, "alice")
    assert late.status_code == 409
    assert late.json()["reason_code"] == "approval.not_pending"
    assert "warrant" not in sidecar.get_request(request_id)

    # the agent is not stuck behind a denied request: asking again opens a new one
    retry = sidecar.request("PUT", upstream.url(path), data=b"x")
    new_id = assert_refused(retry, 403, "warrant_required", "warrant.required")["warrant_request"]["id"]
    assert new_id != request_id
    assert upstream.seen(path) == []


def test_agent_cannot_approve_its_own_request(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("self")
    passback = assert_refused(
        sidecar.request("PUT", upstream.url(path), data=b"x"), 403, "warrant_required", "warrant.required"
    )
    own = sidecar.approve(passback["warrant_request"]["id"], "test-agent")
    assert own.status_code == 403
    assert own.json()["reason_code"] == "approval.self_approval"
    assert sidecar.get_request(passback["warrant_request"]["id"])["status"] == "pending"


def test_pending_list_needs_an_operator_and_shows_the_request(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("listed")
    passback = sidecar.request("PUT", upstream.url(path), data=b"x").json()
    assert sidecar.api("GET", "/v1/warrant-requests?status=pending").status_code == 401
    listed = sidecar.api("GET", "/v1/warrant-requests?status=pending", token=TOKENS["bob"])
    assert listed.status_code == 200
    ids = {item["id"] for item in listed.json()}
    assert passback["warrant_request"]["id"] in ids
    assert all("warrant" not in item for item in listed.json())


def test_unknown_warrant_request_is_404(sidecar: Sidecar) -> None:
    assert sidecar.api("GET", "/v1/warrant-requests/wr_nope").status_code == 404
    assert sidecar.approve("wr_nope", "alice").status_code == 404


# --- the warrant covers exactly one request -------------------------------------------------------

BODY = b'{"a": 1}'


@pytest.mark.parametrize(
    ("kind", "method", "host", "suffix", "query", "body"),
    [
        ("method", "POST", "127.0.0.1", "", "v=1", BODY),
        ("path", "PUT", "127.0.0.1", "-other", "v=1", BODY),
        ("query", "PUT", "127.0.0.1", "", "v=2", BODY),
        ("body", "PUT", "127.0.0.1", "", "v=1", b'{"a": 2}'),
        ("host", "PUT", "localhost", "", "v=1", BODY),
    ],
)
def test_warrant_used_on_another_request_is_refused_with_the_mismatch(
    sidecar: Sidecar,
    upstream: Upstream,
    kind: str,
    method: str,
    host: str,
    suffix: str,
    query: str,
    body: bytes,
) -> None:
    path = "/items/" + unique(f"mismatch-{kind}")
    warrant = sidecar.obtain_warrant("PUT", upstream.url(f"{path}?v=1"), data=BODY)
    other = upstream.url(f"{path}{suffix}?{query}", host=host)
    refused = sidecar.request(method, other, data=body, warrant=warrant)
    assert_refused(refused, 403, "warrant_invalid", f"warrant.mismatch.{kind}")
    assert upstream.seen(path) == []
    assert upstream.seen(path + suffix) == []


def test_mismatched_attempts_do_not_use_up_the_warrant(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("unspent")
    url = upstream.url(f"{path}?v=1")
    warrant = sidecar.obtain_warrant("PUT", url, data=BODY)
    for attempt in range(3):
        refused = sidecar.request("PUT", url, data=b"%d" % attempt, warrant=warrant)
        assert_refused(refused, 403, "warrant_invalid", "warrant.mismatch.body")
    assert sidecar.request("PUT", url, data=BODY, warrant=warrant).status_code == 200
    assert len(upstream.seen(path)) == 1


@pytest.mark.parametrize(("path_prefix", "max_uses"), [("/items/", 1), ("/batch/race/", 2)])
async def test_twenty_concurrent_retries_with_one_warrant_reach_the_upstream_max_uses_times(
    sidecar: Sidecar, upstream: Upstream, path_prefix: str, max_uses: int
) -> None:
    path = path_prefix + unique("race")
    url = upstream.url(path)
    # aiohttp labels a bytes body application/octet-stream; the warrant binds the Content-Type too
    warrant = sidecar.obtain_warrant(
        "POST", url, data=BODY, headers={"Content-Type": "application/octet-stream"}
    )

    async with aiohttp.ClientSession() as session:

        async def attempt() -> tuple[int, str, dict[str, object]]:
            async with session.post(
                url, data=BODY, headers={"Vienna-Warrant": warrant}, proxy=sidecar.proxy_url
            ) as response:
                return response.status, response.headers["Vienna-Decision"], await response.json()

        answers = await asyncio.gather(*(attempt() for _ in range(20)))

    assert sorted(status for status, _, _ in answers) == [200] * max_uses + [403] * (20 - max_uses)
    assert {decision for status, decision, _ in answers if status == 403} == {"deny"}
    assert {body["reason_code"] for status, _, body in answers if status == 403} == {"warrant.replayed"}
    assert len(upstream.seen(path)) == max_uses


async def test_concurrent_identical_requests_share_one_warrant_request(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    path = "/items/" + unique("same-passback")
    async with aiohttp.ClientSession() as session:

        async def attempt() -> str:
            async with session.put(upstream.url(path), data=BODY, proxy=sidecar.proxy_url) as response:
                assert response.status == 403
                body = await response.json()
                return str(body["warrant_request"]["id"])

        answers = await asyncio.gather(*(attempt() for _ in range(10)))

    assert len(set(answers)) == 1
    assert upstream.seen(path) == []


def test_path_bound_warrant_covers_other_queries_and_bodies_up_to_max_uses(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    """Rule `batch-write` has `warrant: {max_uses: 2, bind: path, ttl: 10m}`."""
    path = "/batch/" + unique("bound") + "/run"
    passback = sidecar.request("POST", upstream.url(path + "?n=1"), data=b"first").json()
    assert passback["constraints"] == {
        "method": "POST",
        "scheme": "http",
        "host": "127.0.0.1",
        "port": upstream.port,
        "path": path,
        "max_uses": 2,
    }
    request_id = passback["warrant_request"]["id"]
    assert sidecar.approve(request_id, "alice").status_code == 200
    state = sidecar.get_request(request_id)
    assert 599 <= state["warrant_expires_at"] - state["votes"][0]["at"] <= 600  # the rule's ttl: 10m
    warrant = state["warrant"]

    elsewhere = sidecar.request("POST", upstream.url(path + "-other"), data=b"x", warrant=warrant)
    assert_refused(elsewhere, 403, "warrant_invalid", "warrant.mismatch.path")
    for query, body in (("n=2", b"second"), ("n=3", b"third")):
        used = sidecar.request("POST", upstream.url(f"{path}?{query}"), data=body, warrant=warrant)
        assert used.status_code == 200
    third = sidecar.request("POST", upstream.url(path + "?n=4"), data=b"fourth", warrant=warrant)
    assert_refused(third, 403, "warrant_invalid", "warrant.replayed")
    assert [(seen.query, seen.body) for seen in upstream.seen(path)] == [
        ("n=2", b"second"),
        ("n=3", b"third"),
    ]


# --- HTTPS through CONNECT ------------------------------------------------------------------------


def test_https_t0_through_connect_is_intercepted_and_forwarded(
    sidecar: Sidecar, tls_upstream: Upstream, sidecar_ca_file: Path
) -> None:
    path = "/" + unique("tls-read")
    url = tls_upstream.url(path, host="localhost")
    response = sidecar.request("GET", url, verify=str(sidecar_ca_file))
    assert response.status_code == 200
    assert response.headers["Vienna-Decision"] == "allow"
    assert response.json()["path"] == path
    assert len(tls_upstream.seen(path)) == 1


def test_https_t2_gets_the_passback_inside_the_tunnel_then_goes_through_with_the_warrant(
    sidecar: Sidecar, tls_upstream: Upstream, sidecar_ca_file: Path
) -> None:
    path = "/items/" + unique("tls-write")
    url = tls_upstream.url(path, host="localhost")
    refused = sidecar.request("PUT", url, data=BODY, verify=str(sidecar_ca_file))
    passback = assert_refused(refused, 403, "warrant_required", "warrant.required")
    assert passback["constraints"]["scheme"] == "https"
    assert sidecar.approve(passback["warrant_request"]["id"], "alice").status_code == 200
    warrant = sidecar.get_request(passback["warrant_request"]["id"])["warrant"]
    assert tls_upstream.seen(path) == []

    forwarded = sidecar.request("PUT", url, data=BODY, warrant=warrant, verify=str(sidecar_ca_file))
    assert (forwarded.status_code, forwarded.headers["Vienna-Decision"]) == (200, "allow")
    [seen] = tls_upstream.seen(path)
    assert "vienna-warrant" not in seen.header_names


def test_https_upstream_with_an_untrusted_certificate_is_answered_502(
    sidecar: Sidecar, untrusted_tls_upstream: Upstream, sidecar_ca_file: Path
) -> None:
    path = "/" + unique("untrusted")
    response = sidecar.request(
        "GET", untrusted_tls_upstream.url(path, host="localhost"), verify=str(sidecar_ca_file)
    )
    assert response.status_code == 502
    assert response.headers["Vienna-Decision"] == "deny"
    assert response.json()["reason_code"] == "upstream.tls"
    assert untrusted_tls_upstream.seen(path) == []


def test_https_t3_gets_the_passback_inside_the_tunnel(
    sidecar: Sidecar, tls_upstream: Upstream, sidecar_ca_file: Path
) -> None:
    path = "/repos/acme/" + unique("tls")
    refused = sidecar.request("DELETE", tls_upstream.url(path, host="localhost"), verify=str(sidecar_ca_file))
    passback = assert_refused(refused, 403, "warrant_required", "warrant.required")
    assert (passback["tier"], passback["warrant_request"]["approvals_required"]) == ("T3", 2)
    assert tls_upstream.seen(path) == []


def test_a_warrant_binds_the_content_type_of_the_body(sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/items/" + unique("content-type")
    url = upstream.url(path)
    body = b"amount=500000"
    warrant = sidecar.obtain_warrant("PUT", url, data=body, headers={"Content-Type": "text/plain"})
    as_form = sidecar.request(
        "PUT", url, data=body, warrant=warrant, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert (as_form.status_code, as_form.json()["reason_code"]) == (403, "warrant.mismatch.content_type")
    assert upstream.seen(path) == []
    as_approved = sidecar.request(
        "PUT", url, data=body, warrant=warrant, headers={"Content-Type": "text/plain"}
    )
    assert as_approved.status_code == 200


def test_a_used_warrant_is_not_replayed_through_a_second_sidecar_with_the_same_agent_and_key(
    tmp_path: Path, upstream: Upstream
) -> None:

    first, second = Sidecar(tmp_path / "a"), Sidecar(tmp_path / "b")
    second.key_file.write_text(first.key_file.read_text())  # same agent id, same warrant key, own data dirs
    first.start()
    second.start()
    try:
        path = "/items/" + unique("twin")
        url = upstream.url(path)
        warrant = first.obtain_warrant("PUT", url, data=BODY)
        assert first.request("PUT", url, data=BODY, warrant=warrant).status_code == 200
        replayed = second.request("PUT", url, data=BODY, warrant=warrant)
        assert (replayed.status_code, replayed.json()["reason_code"]) == (403, "warrant.wrong_sidecar")
        assert len(upstream.seen(path)) == 1
    finally:
        first.stop()
        second.stop()
