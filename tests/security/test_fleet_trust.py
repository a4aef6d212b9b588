"""Attack family "fleet trust": what a compromised sidecar, an agent behind a sidecar or a peer with
no token can make `vienna authority` do. The real authority app on a real SQLite store, over real
HTTP (aiohttp's test server on 127.0.0.1), with the sidecar's real client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policy.audit import link
from policy.warrants import public_key_id
from proxy.authority.app import Authority, make_authority_app
from proxy.authority.db import open_database
from proxy.authority.sidecars import load_sidecars
from proxy.authority.signing import SigningKey
from proxy.authority.store import AuthorityStore
from proxy.authority_client import AuthorityClient, AuthorityUnavailable
from proxy.keys import KeyError_, load_operators
from proxy.passbacks import RemotePassbacks
from tests.authority.harness import (
    OTHER_TOKEN,
    SIDECAR_TOKENS,
    open_body,
    write_operators,
    write_sidecars,
)
from tests.integration.harness import AGENT_ID, TOKENS

SC1 = {"Authorization": f"Bearer {SIDECAR_TOKENS['sc1']}"}
SC2 = {"Authorization": f"Bearer {SIDECAR_TOKENS['sc2']}"}
OTHER = {"Authorization": f"Bearer {OTHER_TOKEN}"}
ALICE = {"Authorization": f"Bearer {TOKENS['alice']}"}
BOB = {"Authorization": f"Bearer {TOKENS['bob']}"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    store = AuthorityStore(await open_database(f"sqlite:///{tmp_path}/store/authority.db"))
    private = Ed25519PrivateKey.generate()
    authority = Authority(
        store=store,
        operators=load_operators(write_operators(tmp_path / "operators.yaml")),
        sidecars=load_sidecars(write_sidecars(tmp_path / "sidecars.yaml")),
        signing=SigningKey(private=private, kid=public_key_id(private.public_key())),
        public_url="http://authority.test",
    )
    authority.listening = True
    async with TestClient(TestServer(make_authority_app(authority), host="127.0.0.1")) as test_client:
        yield test_client
    await store.close()


async def approved_warrant(
    client: TestClient[web.Request, web.Application], body: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    opened = await client.post("/v1/sidecar/warrant-requests", json=body, headers=SC1)
    assert opened.status == 201, await opened.text()
    request_id = (await opened.json())["id"]
    for who in (ALICE,) if body["tier"] == "T2" else (ALICE, BOB):
        voted = await client.post(
            f"/v1/warrant-requests/{request_id}/approve", json={"justification": "ok"}, headers=who
        )
        assert voted.status == 200, await voted.text()
    view = await (await client.get(f"/v1/warrant-requests/{request_id}", headers=SC1)).json()
    return view["warrant"], view


def claims_of(token: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return value


async def test_constraints_a_sidecar_sends_are_ignored_the_shown_request_is_bound(
    client: TestClient[web.Request, web.Application],
) -> None:
    body = open_body(method="GET", path="/status")
    body["constraints"] = {
        "method": "POST",
        "scheme": "https",
        "host": "payments.example.com",
        "port": 443,
        "max_uses": 1000,
    }
    warrant, view = await approved_warrant(client, body)
    con = claims_of(warrant)["con"]
    assert (con["method"], con["host"], con["path"], con["max_uses"]) == (
        "GET",
        "api.example.com",
        "/status",
        1,
    )
    assert view["constraints"] == con  # what operators were shown is what is bound


async def test_terms_are_capped_by_the_authority(client: TestClient[web.Request, web.Application]) -> None:
    body = open_body(tier="T3")
    body["terms"] = {"ttl_seconds": 10**6, "max_uses": 1, "bind": "exact"}
    warrant, _ = await approved_warrant(client, body)
    claims = claims_of(warrant)
    assert claims["exp"] - claims["iat"] <= 300  # T3's cap, whatever the sidecar asked
    for terms in (
        {"ttl_seconds": 60, "max_uses": 10**6},
        {"ttl_seconds": 60, "bind": "anything"},
        {"ttl_seconds": -1},
    ):
        refused = await client.post(
            "/v1/sidecar/warrant-requests", json={**open_body(), "terms": terms}, headers=SC1
        )
        assert refused.status == 400, terms


async def test_a_t2_request_is_not_reused_for_the_same_request_at_t3(
    client: TestClient[web.Request, web.Application],
) -> None:
    first = await (
        await client.post("/v1/sidecar/warrant-requests", json=open_body(tier="T2"), headers=SC1)
    ).json()
    second = await (
        await client.post("/v1/sidecar/warrant-requests", json=open_body(tier="T3"), headers=SC1)
    ).json()
    assert first["id"] != second["id"] and second["approvals_required"] == 2


async def test_reading_a_request_needs_a_listed_sidecar_or_an_operator(
    client: TestClient[web.Request, web.Application],
) -> None:
    _, view = await approved_warrant(client, open_body())
    path = f"/v1/warrant-requests/{view['id']}"
    assert (await client.get(path)).status == 401
    assert (await client.get(path, headers={"Authorization": "Bearer guessed"})).status == 401
    other = await client.get(path, headers=OTHER)
    assert other.status == 403 and (await other.json())["reason_code"] == "sidecar.agent_not_allowed"
    operator = await (await client.get(path, headers=ALICE)).json()
    assert operator["status"] == "approved" and "warrant" not in operator
    assert "warrant" in await (await client.get(path, headers=SC2)).json()  # sc2 is listed for the agent too


async def test_an_agent_cannot_walk_the_sidecars_token_to_other_authority_routes(aiohttp_server: Any) -> None:
    """The sidecar answers the agent's GET /v1/warrant-requests/{id} by asking the authority with its
    own token: an id that is not an id must never become another path."""
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"id": "x", "status": "pending", "url": "u"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = await aiohttp_server(app, host="127.0.0.1")
    remote = RemotePassbacks(
        AuthorityClient(str(server.make_url("")), SIDECAR_TOKENS["sc1"]),
        recorder=None,  # type: ignore[arg-type]  # read() records nothing
        rules=lambda: None,  # type: ignore[arg-type,return-value]
        api_base_url="http://sidecar.test",
    )
    try:
        for crafted in (
            "../../v1/sidecar/whoami",
            "..%2F..%2Fv1%2Fsidecar%2Fwhoami",
            "wr_x/../../../v1/keys",
            "wr_a?chain=x",
            "",
        ):
            assert await remote.read(crafted) is None
        assert seen == []
        assert await remote.read("wr_Abc-123_x") is not None
        assert seen == ["/v1/warrant-requests/wr_Abc-123_x"]
    finally:
        await remote.client.close()


async def test_secrets_in_a_request_are_redacted_where_the_authority_keeps_and_shows_it(
    client: TestClient[web.Request, web.Application],
) -> None:
    body = {
        **open_body(),
        "request": {"action": "db.reset", "target": "prod", "params": {"password": "hunter2", "note": "n"}},
    }
    opened = await client.post("/v1/sidecar/warrant-requests", json=body, headers=SC1)
    assert opened.status == 201, await opened.text()
    shown = await (await client.get("/v1/warrant-requests?status=pending", headers=ALICE)).text()
    own = await (await client.get("/v1/audit", headers=ALICE)).text()
    assert "hunter2" not in shown and "hunter2" not in own and "[redacted]" in shown


def _hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


async def test_consume_refuses_alg_confusion_and_other_keys(
    client: TestClient[web.Request, web.Application],
) -> None:
    warrant, _ = await approved_warrant(client, open_body())
    jwk = (await (await client.get("/v1/keys")).json())["keys"][0]
    raw = base64.urlsafe_b64decode(jwk["x"] + "==")
    payload = claims_of(warrant)
    payload["jti"] = "wt_forged"
    forged = _hs256({"alg": "HS256", "typ": "warrant+jwt", "kid": jwk["kid"]}, payload, raw)
    refused = await client.post("/v1/warrants/consume", json={"warrant": forged}, headers=SC1)
    assert refused.status == 403 and (await refused.json())["reason_code"] == "warrant.algorithm"
    stranger = Ed25519PrivateKey.generate()
    head = {"alg": "EdDSA", "typ": "warrant+jwt", "kid": public_key_id(stranger.public_key())}

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(payload).encode())}"
    other = f"{signing_input}.{b64(stranger.sign(signing_input.encode()))}"
    unknown = await client.post("/v1/warrants/consume", json={"warrant": other}, headers=SC1)
    assert unknown.status == 403 and (await unknown.json())["reason_code"] == "warrant.unknown_key"
    ok = await client.post("/v1/warrants/consume", json={"warrant": warrant}, headers=SC1)
    assert ok.status == 200
    again = await client.post("/v1/warrants/consume", json={"warrant": warrant}, headers=SC2)
    assert again.status == 409 and (await again.json())["reason_code"] == "warrant.replayed"


async def test_a_sidecar_ships_only_into_its_own_namespace_and_exact_events(
    client: TestClient[web.Request, web.Application],
) -> None:
    event = link(
        prev_hash="0" * 64, seq=1, ts=1.5, type="decision", agent=AGENT_ID, policy_revision="r", payload={}
    )
    for headers in (SC1, SC2):
        answer = await client.post(
            "/v1/audit/events", json={"chain": "same-id", "events": [event.as_dict()]}, headers=headers
        )
        assert answer.status == 200
    chains = {
        c["chain"] for c in (await (await client.get("/v1/audit/chains", headers=ALICE)).json())["chains"]
    }
    assert {"sc1/same-id", "sc2/same-id"} <= chains
    for bad_chain in ("../authority", "a/b", ""):
        refused = await client.post("/v1/audit/events", json={"chain": bad_chain, "events": []}, headers=SC1)
        assert refused.status == 400
    integer_ts = {
        **link(
            prev_hash=event.hash,
            seq=2,
            ts=2,
            type="decision",
            agent=AGENT_ID,
            policy_revision="r",
            payload={},
        ).as_dict()
    }
    refused = await client.post(
        "/v1/audit/events", json={"chain": "same-id", "events": [integer_ts]}, headers=SC1
    )
    assert refused.status == 400  # would verify on arrival and fail once served back as 2.0
    huge = await client.post(
        "/v1/audit/events",
        data=io.BytesIO(b'{"chain":"x","events":[' + b"[]," * (2 << 20) + b"[]]}"),
        headers={**SC1, "Content-Type": "application/json"},
    )
    assert huge.status == 413


def test_no_sidecar_may_be_called_authority(tmp_path: Path) -> None:
    path = tmp_path / "sidecars.yaml"
    path.write_text(f"sidecars:\n  - {{name: authority, token_sha256: {'a' * 64}, agents: ['*']}}\n")
    with pytest.raises(KeyError_, match="authority"):
        load_sidecars(path)


async def test_a_consume_answer_that_does_not_confirm_the_use_fails_closed(aiohttp_server: Any) -> None:
    async def liar(request: web.Request) -> web.Response:
        return web.json_response({})  # 200, but says nothing about this warrant

    app = web.Application()
    app.router.add_post("/v1/warrants/consume", liar)
    server = await aiohttp_server(app, host="127.0.0.1")
    remote = RemotePassbacks(
        AuthorityClient(str(server.make_url("")), "t"),
        recorder=None,  # type: ignore[arg-type]
        rules=lambda: None,  # type: ignore[arg-type,return-value]
        api_base_url="http://sidecar.test",
    )
    try:
        with pytest.raises(AuthorityUnavailable):
            await remote.consume("wt_1", 1, "token")
    finally:
        await remote.client.close()


async def test_the_authority_serves_the_console_with_a_strict_policy(
    client: TestClient[web.Request, web.Application],
) -> None:
    page = await client.get("/console")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    policy = page.headers["Content-Security-Policy"]
    assert (
        "default-src 'none'" in policy
        and "script-src 'self'" in policy
        and "frame-ancestors 'none'" in policy
    )
    assert "unsafe-inline" not in policy and "Set-Cookie" not in page.headers
    html = await page.text()
    assert "<script src=" in html and "<script>" not in html  # no inline script to allow
    script = await (await client.get("/console/console.js")).text()
    assert "innerHTML" not in script and "sessionStorage" in script and "document.cookie" not in script


async def test_a_sidecar_name_with_several_chains_reads_whole_or_asks_for_one(
    client: TestClient[web.Request, web.Application],
) -> None:
    for chain in ("pod-a", "pod-b"):
        event = link(
            prev_hash="0" * 64,
            seq=1,
            ts=1.5,
            type="decision",
            agent=AGENT_ID,
            policy_revision="r",
            payload={"pod": chain},
        )
        assert (
            await client.post(
                "/v1/audit/events", json={"chain": chain, "events": [event.as_dict()]}, headers=SC1
            )
        ).status == 200
    whole = await (await client.get("/v1/audit?sidecar=sc1", headers=ALICE)).json()
    assert sorted(e["chain"] for e in whole["events"]) == ["sc1/pod-a", "sc1/pod-b"]
    paged = await client.get("/v1/audit?sidecar=sc1&after=1", headers=ALICE)  # a cursor would be ambiguous
    assert paged.status == 400 and (await paged.json())["reason_code"] == "audit.ambiguous_sidecar"
    one = await (await client.get("/v1/audit?sidecar=sc1/pod-b&after=0", headers=ALICE)).json()
    assert [e["payload"]["pod"] for e in one["events"]] == ["pod-b"]
