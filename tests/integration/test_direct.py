"""Vienna Direct (§13) with real parts: `vienna run` with handlers that really execute — a process,
an HTTP call through the sidecar's own enforcement to a loopback upstream, SQL on SQLite and on a
real PostgreSQL — executions with a warrant, reports and verification, every step audited."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.direct_support import events, intent
from tests.integration.harness import Sidecar, Upstream, new_session

pytestmark = pytest.mark.slow


def test_t0_exec_runs_now_and_is_audited_intent_decision_execution(direct: Sidecar) -> None:
    answer = intent(direct, "demo.echo", word="hello; rm -rf / $(reboot) `id`")
    body = answer.json()
    assert answer.status_code == 200 and body["mode"] == "direct" and body["status"] == "succeeded"
    assert (
        body["result"]["stdout"] == "hello; rm -rf / $(reboot) `id`\n"
    )  # one argv item: no shell ever saw it
    assert body["result"]["exit_code"] == 0 and body["execution_id"].startswith("ex_")
    chain = [e for e in events(direct) if e.payload.get("execution_id") == body["execution_id"]]
    assert [e.type for e in chain] == ["decision", "execution"]
    execution = chain[1].payload
    assert (
        execution["status"] == "succeeded"
        and execution["exit_code"] == 0
        and len(execution["output_sha256"]) == 64
    )
    assert "duration_ms" in execution and execution["handler"] == "echo"


def test_an_action_without_a_handler_says_nothing_ran(direct: Sidecar) -> None:
    body = intent(direct, "demo.read").json()
    assert body["mode"] == "direct" and body["status"] == "allowed" and body["execution_id"] is None


def test_sql_is_bound_read_only_and_bounded(direct: Sidecar, reports_db: Path) -> None:
    rows = intent(direct, "report.orders", day="2026-12-01").json()
    assert rows["status"] == "succeeded" and rows["result"]["rows"] == [
        {"day": "2026-12-01", "n": 3},
        {"day": "2026-12-01", "n": 5},
    ]
    injected = intent(direct, "report.orders", day="2026-12-01' OR '1'='1").json()
    assert injected["status"] == "succeeded" and injected["result"]["rows"] == []  # a bound value, not SQL
    write = intent(direct, "report.write", day="2026-12-09").json()
    assert write["status"] == "failed" and "readonly" in write["result"]["error"].lower().replace(
        " ", ""
    ).replace("-", "")
    assert sqlite3.connect(reports_db).execute("SELECT count(*) FROM orders").fetchone()[0] == 3


def test_sql_on_a_real_postgresql(direct: Sidecar, pg_items: str | None) -> None:
    if pg_items is None:
        pytest.skip("no PostgreSQL here")
    body = intent(direct, "pg.count", name="a").json()
    assert body["status"] == "succeeded" and body["result"]["rows"] == [{"n": 2}]
    assert intent(direct, "pg.count", name="a' OR 'x'='x").json()["result"]["rows"] == [{"n": 0}]


def test_http_goes_through_the_sidecars_enforcement(direct: Sidecar, direct_upstream: Upstream) -> None:
    body = intent(direct, "http.fetch", item="widget-1").json()
    assert body["status"] == "succeeded" and body["result"]["status"] == 200
    assert body["result"]["headers"]["Vienna-Decision"] == "allow"
    seen = direct_upstream.seen("/direct/items")
    assert len(seen) == 1 and seen[0].query == "item=widget-1" and b'"widget-1"' in seen[0].body
    # A handler whose target the policy denies reaches nothing: refused by the data plane itself.
    denied = intent(direct, "http.metadata").json()
    assert denied["status"] == "failed" and denied["error"] == "http.refused_by_policy"
    assert denied["result"]["headers"]["Vienna-Decision"] == "deny"


def test_a_t2_handler_runs_once_with_its_warrant_and_only_with_the_approved_params(direct: Sidecar) -> None:
    passback = intent(direct, "service.restart", "api", reason="deploy 42").json()
    assert passback["mode"] == "passback" and passback["execution_id"] is None
    request_id = passback["warrant_request"]["id"]
    assert direct.approve(request_id, "alice").status_code == 200
    warrant = direct.get_request(request_id)["warrant"]
    api = new_session()
    changed = api.post(
        direct.api_url + "/v1/executions",
        json={"warrant": warrant, "params": {"target": "api", "reason": "other"}},
        timeout=30,
    )
    assert changed.status_code == 403 and changed.json()["reason_code"] == "warrant.mismatch.params"
    ran = api.post(direct.api_url + "/v1/executions", json={"warrant": warrant}, timeout=30).json()
    assert ran.get("status") == "succeeded", ran
    assert ran["status"] == "succeeded" and ran["result"]["stdout"] == "restarted deployment/api\n"
    assert ran["warrant_id"] == direct.get_request(request_id)["warrant_id"]
    replay = api.post(direct.api_url + "/v1/executions", json={"warrant": warrant}, timeout=30)
    assert replay.status_code == 403 and replay.json()["reason_code"] == "warrant.replayed"
    executions = [
        e
        for e in events(direct)
        if e.type == "execution" and e.payload.get("warrant_id") == ran["warrant_id"]
    ]
    assert len(executions) == 1


def test_agent_executed_passbacks_are_verified_and_reported(direct: Sidecar) -> None:
    api = new_session()
    passback = intent(
        direct, "demo.unhandled", "prod", ticket="OPS-7"
    ).json()  # no handler: the agent runs it
    request_id = passback["warrant_request"]["id"]
    assert direct.approve(request_id, "alice").status_code == 200
    assert direct.approve(request_id, "bob").status_code == 200  # default_tier T3
    warrant = direct.get_request(request_id)["warrant"]

    def verify(**body: Any) -> dict[str, Any]:
        answer = api.post(
            direct.api_url + "/v1/warrants/verify", json={"warrant": warrant, **body}, timeout=30
        )
        assert answer.status_code == 200
        result: dict[str, Any] = answer.json()
        return result

    assert verify(action="demo.unhandled", target="prod", params={"ticket": "OPS-7"})["valid"] is True
    wrong = verify(action="demo.unhandled", target="staging", params={"ticket": "OPS-7"})
    assert wrong == {**wrong, "valid": False, "reason_code": "warrant.mismatch.target"}
    assert (
        verify(action="demo.unhandled", target="prod", params={"ticket": "OPS-8"})["reason_code"]
        == "warrant.mismatch.params"
    )
    forged = api.post(
        direct.api_url + "/v1/warrants/verify",
        json={"warrant": warrant[:-4] + "AAAA", "action": "demo.unhandled", "target": "prod"},
        timeout=30,
    ).json()
    assert forged["valid"] is False and forged["reason_code"] == "warrant.bad_signature"
    # A report that matches, then one for the same warrant again: the second is a violation.
    ok = api.post(
        direct.api_url + "/v1/executions/report",
        json={
            "warrant": warrant,
            "status": "succeeded",
            "action": "demo.unhandled",
            "target": "prod",
            "params": {"ticket": "OPS-7"},
            "result": {"deployed": True},
        },
        timeout=30,
    ).json()
    assert ok["recorded"] is True and ok["valid"] is True and ok["violations"] == []
    again = api.post(
        direct.api_url + "/v1/executions/report",
        json={"warrant": warrant, "status": "succeeded", "result": {}},
        timeout=30,
    ).json()
    assert again["valid"] is False and "warrant.replayed" in again["violations"]
    mismatch = api.post(
        direct.api_url + "/v1/executions/report",
        json={"warrant": warrant, "status": "failed", "target": "staging", "result": {}},
        timeout=30,
    ).json()
    assert "warrant.mismatch.target" in mismatch["violations"]
    checks = [e for e in events(direct) if e.type == "verification"]
    assert {e.payload["event"] for e in checks} == {"warrant_verified", "execution_report"}
    assert any(e.payload.get("violation") for e in checks)
    metrics = api.get(direct.api_url + "/metrics", timeout=10).text
    assert 'vienna_verification_violations_total{reason="warrant.replayed"}' in metrics
    assert consumed_once(
        verify(action="demo.unhandled", target="prod", params={"ticket": "OPS-7"}, consume=True)
    )


def consumed_once(answer: dict[str, Any]) -> bool:
    # the report already used the warrant's one use: consuming it again is refused
    return answer["valid"] is False and answer["reason_code"] == "warrant.replayed"
