"""The fleet, with real parts: `vienna authority` processes (SQLite, and several on one PostgreSQL),
real `vienna run` sidecars in authority mode, a real upstream, real clients."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from policy.audit import AuditEvent, verify_chain
from proxy.store import read_events
from tests.authority.harness import (
    OTHER_TOKEN,
    SIDECAR_TOKENS,
    VIENNA,
    Authority,
    open_body,
    sidecar_args,
    write_operators,
    write_signing_key,
)
from tests.integration.harness import AGENT_ID, TOKENS, Sidecar, Upstream, clean_env, new_session

pytestmark = pytest.mark.slow


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[Authority]:
    server = Authority(
        tmp_path / "authority",
        store=f"sqlite:///{tmp_path}/authority/store/authority.db",
        signing_key=write_signing_key(tmp_path / "signing.pem"),
    )
    server.start()
    yield server
    server.stop()


def start_sidecar(workdir: Path, authority: Authority, name: str = "sc1", **options: Any) -> Sidecar:
    sidecar = Sidecar(
        workdir, args=sidecar_args(authority, workdir.parent / f"{workdir.name}.token", name), **options
    )
    sidecar.start()
    return sidecar


def jwt_header(token: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    return value


def local_events(sidecar: Sidecar) -> list[AuditEvent]:
    return list(read_events(sidecar.data_dir / "audit.db"))


def test_passback_is_approved_at_the_authority_and_forwarded_exactly_once(
    tmp_path: Path, authority: Authority, upstream: Upstream
) -> None:
    sidecar = start_sidecar(tmp_path / "sc1", authority)
    try:
        url = upstream.url("/repos/acme/app")
        refused = sidecar.request("DELETE", url)
        assert refused.status_code == 403, refused.text
        passback = refused.json()["warrant_request"]
        request_id = passback["id"]
        # The agent polls its own sidecar, never the authority.
        assert passback["url"] == f"{sidecar.api_url}/v1/warrant-requests/{request_id}"
        # Operators see it at the authority, with the sidecar and the exact request.
        listed = authority.api("GET", "/v1/warrant-requests?status=pending", token=TOKENS["alice"]).json()
        assert [item["id"] for item in listed] == [request_id]
        assert listed[0]["sidecar"] == "sc1" and listed[0]["agent"] == AGENT_ID
        assert listed[0]["request"]["method"] == "DELETE" and listed[0]["request"]["url"] == url
        # The sidecar itself decides nothing: its operator routes point at the authority.
        elsewhere = sidecar.api("GET", "/v1/warrant-requests", token=TOKENS["alice"])
        assert elsewhere.status_code == 409 and elsewhere.json()["reason_code"] == "authority.mode"
        # `vienna approvals` works unchanged against the authority.
        cli = subprocess.run(
            [str(VIENNA), "approvals", "approve", request_id, "--api", authority.url, "--token", TOKENS["alice"],
             "--justification", "ticket 42"],
            capture_output=True, text=True, env=clean_env(), timeout=30,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert authority.approve(request_id, "bob").status_code == 200
        status = sidecar.get_request(request_id)
        assert status["status"] == "approved"
        warrant = status["warrant"]
        assert jwt_header(warrant)["alg"] == "EdDSA"
        assert sidecar.request("DELETE", url, warrant=warrant).status_code == 200
        replay = sidecar.request("DELETE", url, warrant=warrant)
        assert replay.status_code == 403 and replay.json()["reason_code"] == "warrant.replayed"
        assert len(upstream.seen("/repos/acme/app")) == 1
        # No signing material in the sidecar's data dir.
        assert not (sidecar.data_dir / "warrant.key").exists()
        ready = sidecar.http.get(sidecar.api_url + "/readyz", timeout=5).json()
        assert ready["authority"] == {"url": authority.url, "keys_known": True}
    finally:
        sidecar.stop()


def test_fifty_concurrent_approvals_across_two_replicas_mint_one_warrant(tmp_path: Path, pg_dsn: str) -> None:
    operators = {f"op{n:02d}": f"operator-{n:02d}-token-" + "x" * 24 for n in range(50)}
    files = tmp_path / "files"
    files.mkdir()
    operators_file = write_operators(files / "operators.yaml", {**operators, "alice": TOKENS["alice"]})
    key = write_signing_key(files / "signing.pem")
    replicas = [
        Authority(tmp_path / f"replica{n}", store=pg_dsn, signing_key=key, operators=operators_file)
        for n in (1, 2)
    ]
    for replica in replicas:
        replica.start()
    try:
        opened = replicas[0].api(
            "POST",
            "/v1/sidecar/warrant-requests",
            token=SIDECAR_TOKENS["sc1"],
            body=open_body(
                tier="T3", method="DELETE", path="/repos/acme/app", action="repo.delete", target="acme/app"
            ),
        )
        assert opened.status_code == 201, opened.text
        request_id = opened.json()["id"]
        barrier = threading.Barrier(50)

        def approve(n: int) -> int:
            session = new_session()
            barrier.wait()
            answer = session.post(
                f"{replicas[n % 2].url}/v1/warrant-requests/{request_id}/approve",
                headers={"Authorization": f"Bearer {operators[f'op{n:02d}']}"},
                json={"justification": "all hands"},
                timeout=60,
            )
            return answer.status_code

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(approve, range(50)))
        assert statuses.count(200) == 2, statuses  # T3: exactly the quorum counted
        assert set(statuses) == {200, 409}, statuses
        warrants = {
            replica.api("GET", f"/v1/warrant-requests/{request_id}", token=SIDECAR_TOKENS["sc1"]).json()[
                "warrant"
            ]
            for replica in replicas
        }
        assert len(warrants) == 1  # both replicas hand out the one warrant
        own = [
            e for e in replicas[1].events("authority") if e["payload"].get("warrant_request_id") == request_id
        ]
        assert [e["type"] for e in own].count("warrant") == 1
        assert [e["type"] for e in own].count("approval") == 2
        assert verify_chain(AuditEvent.from_dict(e) for e in replicas[0].events("authority")).ok
    finally:
        for replica in replicas:
            replica.stop()


def test_a_max_uses_1_warrant_used_through_five_sidecars_at_once_reaches_the_upstream_once(
    tmp_path: Path, pg_dsn: str, upstream: Upstream
) -> None:
    key = write_signing_key(tmp_path / "signing.pem")
    replicas = [Authority(tmp_path / f"replica{n}", store=pg_dsn, signing_key=key) for n in (1, 2)]
    for replica in replicas:
        replica.start()
    sidecars: list[Sidecar] = []
    try:
        for n in range(1, 6):
            sidecars.append(start_sidecar(tmp_path / f"sc{n}", replicas[n % 2], name=f"sc{n}"))
        url = upstream.url("/items/fleet-once")
        refused = sidecars[0].request("PUT", url, data=b"payload")
        assert refused.status_code == 403, refused.text
        request_id = refused.json()["warrant_request"]["id"]
        assert replicas[1].approve(request_id, "alice").status_code == 200
        warrant = sidecars[0].get_request(request_id)["warrant"]
        barrier = threading.Barrier(5)

        def use(sidecar: Sidecar) -> tuple[int, str | None]:
            session = new_session(sidecar.proxy_url)
            barrier.wait()
            answer = session.put(url, data=b"payload", headers={"Vienna-Warrant": warrant}, timeout=60)
            return answer.status_code, answer.json().get("reason_code") if answer.status_code != 200 else None

        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(use, sidecars))
        assert sorted(status for status, _ in results) == [200, 403, 403, 403, 403], results
        assert {code for status, code in results if status == 403} == {"warrant.replayed"}
        assert len(upstream.seen("/items/fleet-once")) == 1
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        for replica in replicas:
            replica.stop()


def test_authority_killed_mid_traffic_fails_t2_t3_closed_and_loses_no_audit_event(
    tmp_path: Path, authority: Authority, upstream: Upstream
) -> None:
    sidecar = start_sidecar(tmp_path / "sc1", authority)
    stop = threading.Event()
    t0_statuses: list[int] = []

    def traffic() -> None:
        session = new_session(sidecar.proxy_url)
        while not stop.is_set():
            t0_statuses.append(session.get(upstream.url("/reads/during-outage"), timeout=30).status_code)

    worker = threading.Thread(target=traffic)
    try:
        url = upstream.url("/items/after-outage")
        refused = sidecar.request("PUT", url, data=b"x")
        request_id = refused.json()["warrant_request"]["id"]
        assert authority.approve(request_id, "alice").status_code == 200
        warrant = sidecar.get_request(request_id)["warrant"]
        worker.start()
        wait_for(lambda: len(t0_statuses) > 20, "T0 traffic")
        authority.kill()
        during = len(t0_statuses)
        # T2/T3 fail closed: a new passback cannot be opened, a warrant cannot be consumed.
        for answer in (
            sidecar.request("DELETE", upstream.url("/repos/acme/outage")),
            sidecar.request("PUT", url, data=b"x", warrant=warrant),
        ):
            assert answer.status_code == 503, answer.text
            assert answer.json()["reason_code"] == "authority.unavailable"
        status = sidecar.api("GET", f"/v1/warrant-requests/{request_id}")
        assert status.status_code == 503 and status.json()["reason_code"] == "authority.unavailable"
        wait_for(lambda: len(t0_statuses) > during + 20, "T0 traffic while the authority is down")
        assert upstream.seen("/items/after-outage") == []
        authority.start()  # same port, same store, same key
        answer = sidecar.request("PUT", url, data=b"x", warrant=warrant)
        assert answer.status_code == 200, answer.text  # recovered: the unused warrant is consumed now
        assert sidecar.request("DELETE", upstream.url("/repos/acme/outage")).status_code == 403
        stop.set()
        worker.join(60)
        assert set(t0_statuses) == {200}, "T0 is never affected by the authority"
        chain = f"sc1/{(sidecar.data_dir / 'sidecar.id').read_text().strip()}"
        wait_for(
            lambda: authority.chains().get(chain, {}).get("head_seq") == len(local_events(sidecar)),
            "every local event shipped",
            timeout=60,
        )
        shipped = [AuditEvent.from_dict(e) for e in authority.events(chain)]
        local = local_events(sidecar)
        assert [e.hash for e in shipped] == [e.hash for e in local]  # nothing lost, nothing twice
        assert verify_chain(shipped).ok and authority.chains()[chain]["problems"] == 0
        verify = subprocess.run(
            [str(VIENNA), "audit", "verify", "--authority", authority.url, "--token", TOKENS["alice"]],
            capture_output=True, text=True, env=clean_env(), timeout=60,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f"ok: chain {chain}: {len(local)} events" in verify.stdout
    finally:
        stop.set()
        if worker.is_alive():
            worker.join(60)
        sidecar.stop()


def test_a_sidecar_token_acts_only_for_its_listed_agents(authority: Authority) -> None:
    body = open_body()  # "other" is listed for someone-else only, not for this agent
    opened = authority.api("POST", "/v1/sidecar/warrant-requests", token=OTHER_TOKEN, body=body)
    assert opened.status_code == 403 and opened.json()["reason_code"] == "sidecar.agent_not_allowed"
    # A warrant for the agent, minted for sc1's request, cannot be consumed by `other` either.
    request_id = authority.api(
        "POST", "/v1/sidecar/warrant-requests", token=SIDECAR_TOKENS["sc1"], body=body
    ).json()["id"]
    assert authority.approve(request_id, "alice").status_code == 200
    warrant = authority.api("GET", f"/v1/warrant-requests/{request_id}", token=SIDECAR_TOKENS["sc1"]).json()[
        "warrant"
    ]
    consumed = authority.api("POST", "/v1/warrants/consume", token=OTHER_TOKEN, body={"warrant": warrant})
    assert consumed.status_code == 403 and consumed.json()["reason_code"] == "sidecar.agent_not_allowed"
    # Nor ship audit events in that agent's name.
    event = {"seq": 1, "ts": 1.0, "type": "decision", "agent": AGENT_ID, "policy_revision": "r", "payload": {},
             "prev_hash": "0" * 64, "hash": "1" * 64}  # fmt: skip
    shipped = authority.api(
        "POST", "/v1/audit/events", token=OTHER_TOKEN, body={"chain": "x", "events": [event]}
    )
    assert shipped.status_code == 403
    # The operator routes are not sidecar routes, and the sidecar routes need a sidecar token.
    assert authority.api("GET", "/v1/warrant-requests", token=SIDECAR_TOKENS["sc1"]).status_code == 401
    assert (
        authority.api("POST", "/v1/sidecar/warrant-requests", token=TOKENS["alice"], body=body).status_code
        == 401
    )
    assert authority.api("POST", "/v1/warrants/consume", body={"warrant": warrant}).status_code == 401


def _hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def test_forged_hs256_warrants_signed_with_the_public_key_are_refused(
    tmp_path: Path, authority: Authority, upstream: Upstream
) -> None:
    sidecar = start_sidecar(tmp_path / "sc1", authority)
    try:
        url = upstream.url("/items/forged")
        refused = sidecar.request("PUT", url, data=b"x")
        request_id = refused.json()["warrant_request"]["id"]
        assert authority.approve(request_id, "alice").status_code == 200
        genuine = sidecar.get_request(request_id)["warrant"]
        payload = json.loads(base64.urlsafe_b64decode(genuine.split(".")[1] + "=="))
        jwks = authority.api("GET", "/v1/keys").json()["keys"]
        kid = jwks[0]["kid"]
        raw = base64.urlsafe_b64decode(jwks[0]["x"] + "==")
        pem = (
            serialization.load_pem_private_key(authority.signing_key.read_bytes(), password=None)
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        payload["con"]["max_uses"] = 100
        forgeries = [
            _hs256({"alg": "HS256", "typ": "warrant+jwt", "kid": kid}, payload, raw),
            _hs256({"alg": "HS256", "typ": "warrant+jwt", "kid": kid}, payload, pem),
            _hs256({"alg": "HS256", "typ": "warrant+jwt"}, payload, pem),
            _hs256({"alg": "HS256", "typ": "warrant+jwt", "kid": kid}, payload, jwks[0]["x"].encode()),
        ]
        for forged in forgeries:
            answer = sidecar.request("PUT", url, data=b"x", warrant=forged)
            assert answer.status_code == 403, answer.text
            assert answer.json()["reason_code"] == "warrant.algorithm", answer.text
            at_authority = authority.api(
                "POST", "/v1/warrants/consume", token=SIDECAR_TOKENS["sc1"], body={"warrant": forged}
            )
            assert (
                at_authority.status_code == 403 and at_authority.json()["reason_code"] == "warrant.algorithm"
            )
        assert upstream.seen("/items/forged") == []
        assert sidecar.request("PUT", url, data=b"x", warrant=genuine).status_code == 200
    finally:
        sidecar.stop()


def test_central_audit_reports_bad_links_and_verify_catches_tampering(
    tmp_path: Path, authority: Authority
) -> None:
    from policy.audit import link

    events = []
    prev = "0" * 64
    for seq in range(1, 4):
        event = link(
            prev_hash=prev,
            seq=seq,
            ts=float(seq),
            type="decision",
            agent=AGENT_ID,
            policy_revision="r",
            payload={"n": seq},
        )
        events.append(event.as_dict())
        prev = event.hash
    token = SIDECAR_TOKENS["sc2"]
    ok = authority.api("POST", "/v1/audit/events", token=token, body={"chain": "c1", "events": events[:2]})
    assert ok.status_code == 200 and ok.json()["head_seq"] == 2
    edited = {**events[2], "payload": {"n": 999}}
    bad = authority.api("POST", "/v1/audit/events", token=token, body={"chain": "c1", "events": [edited]})
    assert bad.status_code == 409 and bad.json()["reason_code"] == "audit.edited"
    gap = authority.api("POST", "/v1/audit/events", token=token, body={"chain": "c2", "events": events[1:]})
    assert gap.status_code == 409 and gap.json()["reason_code"] == "audit.sequence_gap"

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VIENNA), "audit", "verify", "--authority", authority.url, "--token", TOKENS["alice"]],
            capture_output=True, text=True, env=clean_env(), timeout=60,
        )  # fmt: skip

    reported = verify()
    assert reported.returncode == 1
    assert "PROBLEM: chain sc2/c1" in reported.stdout and "edited" in reported.stdout
    # Tampering with what the authority stores is caught link by link.
    import sqlite3

    db = sqlite3.connect(authority.store.removeprefix("sqlite:///"))
    db.execute("UPDATE audit_events SET payload = '{\"n\":7}' WHERE chain = 'authority' AND seq = 1")
    db.commit()
    db.close()
    opened = authority.api(
        "POST",
        "/v1/sidecar/warrant-requests",
        token=SIDECAR_TOKENS["sc1"],
        body=open_body(),
    )
    assert opened.status_code == 201
    db = sqlite3.connect(authority.store.removeprefix("sqlite:///"))
    db.execute("UPDATE audit_events SET payload = '{\"n\":7}' WHERE chain = 'authority' AND seq = 1")
    db.commit()
    db.close()
    tampered = verify()
    assert tampered.returncode == 1 and "TAMPERED: chain authority: event seq 1: edited" in tampered.stdout


def test_a_sidecar_serving_an_agent_it_is_not_listed_for_is_refused_403(
    tmp_path: Path, authority: Authority, upstream: Upstream
) -> None:
    token = tmp_path / "other.token"
    token.write_text(OTHER_TOKEN)  # "other" is listed for someone-else, this sidecar serves test-agent
    sidecar = Sidecar(
        tmp_path / "other", args=["--authority", authority.url, "--authority-token-file", str(token)]
    )
    sidecar.start()
    try:
        refused = sidecar.request("PUT", upstream.url("/items/not-listed"), data=b"x")
        assert refused.status_code == 403 and refused.json()["reason_code"] == "sidecar.agent_not_allowed"
        assert sidecar.request("GET", upstream.url("/reads/not-listed")).status_code == 200  # T0 unaffected
        assert upstream.seen("/items/not-listed") == []
    finally:
        sidecar.stop()


def test_retention_in_authority_mode_drops_only_what_the_authority_holds(
    tmp_path: Path, authority: Authority, upstream: Upstream
) -> None:
    sidecar = Sidecar(
        tmp_path / "sc1",
        args=[*sidecar_args(authority, tmp_path / "sc1.token"), "--audit-retain", "96KiB"],
        audit_stdout=False,
    )
    sidecar.start()
    chain = f"sc1/{(sidecar.data_dir / 'sidecar.id').read_text().strip()}"
    session = new_session(sidecar.proxy_url)
    try:
        for index in range(250):
            assert session.get(upstream.url(f"/reads/retained/{index}"), timeout=30).status_code == 200
        wait_for(lambda: local_events(sidecar)[0].seq > 1, "retention dropping shipped events", timeout=30)
        first = local_events(sidecar)[0].seq
        held = authority.chains()[chain]["head_seq"]
        assert first - 1 <= held  # nothing dropped that the authority does not hold

        # With the authority gone nothing more is shipped, so nothing more may be dropped: full.
        authority.kill()
        refused = None
        for index in range(3000):
            answer = session.get(upstream.url(f"/reads/unshipped/{index}"), timeout=30)
            if answer.status_code != 200:
                refused = answer
                break
        assert refused is not None, "the audit never filled while the authority was down"
        assert refused.status_code == 503 and refused.json()["reason_code"] == "audit.full", refused.text
        assert local_events(sidecar)[0].seq - 1 <= held

        authority.start()  # shipping resumes, the shipped events are dropped, requests pass again
        wait_for(
            lambda: session.get(upstream.url("/reads/after"), timeout=30).status_code == 200,
            "room again once the authority holds the events",
            timeout=60,
        )
        kept = local_events(sidecar)
        shipped = [AuditEvent.from_dict(e) for e in authority.events(chain)]
        assert verify_chain(shipped).ok and shipped[0].seq == 1
        by_seq = {e.seq: e.hash for e in shipped}
        assert all(by_seq.get(seq) is not None for seq in range(1, kept[0].seq))  # every dropped one is there
    finally:
        session.close()
        sidecar.stop()
    verify = subprocess.run(
        [str(VIENNA), "audit", "verify", str(sidecar.data_dir / "audit.db")],
        capture_output=True, text=True, env=clean_env(), timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout
    assert "were shipped and then dropped by retention" in verify.stdout
