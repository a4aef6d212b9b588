"""Vienna Direct (§13) with real parts: `vienna run` with handlers that really execute — a process,
an HTTP call through the sidecar's own enforcement to a loopback upstream, SQL on SQLite and on a
real PostgreSQL — executions with a warrant, reports and verification, every step audited."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.store import read_events
from tests.integration.harness import LOOPBACK_HOSTS, Sidecar, Upstream, new_session, running_sidecar

pytestmark = pytest.mark.slow


def direct_policy(upstream_port: int) -> str:
    return f"""\
version: 1
default_tier: T3
rules:
  - id: upstream-read
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [GET, POST]}}
    action: demo.read
    tier: T0
  - id: echo
    match: {{hosts: [none.invalid]}}
    action: demo.echo
    tier: T0
  - id: slow
    match: {{hosts: [none.invalid]}}
    action: demo.slow
    tier: T0
  - id: flood
    match: {{hosts: [none.invalid]}}
    action: demo.flood
    tier: T0
  - id: report
    match: {{hosts: [none.invalid]}}
    action: report.orders
    tier: T0
  - id: writes
    match: {{hosts: [none.invalid]}}
    action: report.write
    tier: T0
  - id: pg
    match: {{hosts: [none.invalid]}}
    action: pg.count
    tier: T0
  - id: fetch
    match: {{hosts: [none.invalid]}}
    action: http.fetch
    tier: T1
  - id: metadata
    match: {{hosts: [none.invalid]}}
    action: http.metadata
    tier: T0
  - id: restart
    match: {{hosts: [none.invalid]}}
    action: service.restart
    tier: T2
  - id: drop
    match: {{hosts: [none.invalid]}}
    action: db.drop
    tier: deny
handlers:
  - id: echo
    action: demo.echo
    params: {{word: {{pattern: "^[^\\\\x00]{{1,80}}$"}}}}
    exec: {{argv: ["/bin/echo", "{{word}}"], timeout: 5s}}
  - id: slow
    action: demo.slow
    exec: {{argv: ["/bin/sh", "-c", "sleep 60 & echo $! > /dev/stderr; wait"], timeout: 500ms}}
  - id: flood
    action: demo.flood
    exec: {{argv: ["/bin/sh", "-c", "head -c 10000000 /dev/zero | tr '\\\\000' y"], timeout: 20s}}
  - id: orders
    action: report.orders
    params: {{day: {{max_length: 40}}}}
    sql: {{dsn_env: REPORTS_DSN, query: "SELECT day, n FROM orders WHERE day = :day ORDER BY n", timeout: 5s}}
  - id: sneaky-write
    action: report.write
    params: {{day: {{max_length: 40}}}}
    sql: {{dsn_env: REPORTS_DSN, query: "INSERT INTO orders (day, n) VALUES (:day, 1)", timeout: 5s}}
  - id: pg-count
    action: pg.count
    params: {{name: {{max_length: 40}}}}
    sql: {{dsn_env: PG_DSN, query: "SELECT count(*) AS n FROM items WHERE name = :name", timeout: 5s}}
  - id: fetch
    action: http.fetch
    params: {{item: {{pattern: "^[a-z0-9-]{{1,20}}$"}}}}
    http: {{method: POST, url: "http://127.0.0.1:{upstream_port}/direct/items?item={{item}}", json: {{item: "{{item}}"}}}}
  - id: metadata
    action: http.metadata
    http: {{method: GET, url: "http://169.254.169.254/latest/meta-data/"}}
  - id: restart
    action: service.restart
    params: {{target: {{pattern: "^[a-z0-9-]{{1,40}}$"}}, reason: {{max_length: 100}}}}
    exec: {{argv: ["/bin/echo", "restarted", "deployment/{{target}}"], timeout: 5s}}
"""


@pytest.fixture(scope="module")
def reports_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reports") / "reports.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE orders (day TEXT, n INTEGER)")
    db.executemany(
        "INSERT INTO orders VALUES (?, ?)", [("2026-12-01", 3), ("2026-12-01", 5), ("2026-12-02", 7)]
    )
    db.commit()
    db.close()
    return path


@pytest.fixture(scope="module")
def pg_items(pg_admin_dsn: str | None) -> Iterator[str | None]:
    if pg_admin_dsn is None:
        yield None
        return
    import psycopg

    from tests.authority.postgres import fresh_database

    with fresh_database(pg_admin_dsn) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE items (name TEXT)")
            conn.execute("INSERT INTO items VALUES ('a'), ('a'), ('b')")
        yield dsn


@pytest.fixture(scope="module")
def pg_admin_dsn() -> Iterator[str | None]:
    from tests.authority.postgres import postgres_server

    with postgres_server() as (dsn, _):
        yield dsn


@pytest.fixture(scope="module")
def direct(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream, reports_db: Path, pg_items: str | None
) -> Iterator[Sidecar]:
    env = {"REPORTS_DSN": f"sqlite:///{reports_db}", "PG_DSN": pg_items or ""}
    with running_sidecar(
        tmp_path_factory.mktemp("direct"), policy=direct_policy(upstream.port), env=env
    ) as sidecar:
        yield sidecar


def intent(sidecar: Sidecar, action: str, target: str = "", **params: Any) -> requests.Response:
    return new_session().post(
        sidecar.api_url + "/v1/intents",
        json={"action": action, "target": target, "params": params},
        timeout=60,
    )


def events(sidecar: Sidecar) -> list[Any]:
    return list(read_events(sidecar.data_dir / "audit.db"))


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


def test_http_goes_through_the_sidecars_enforcement(direct: Sidecar, upstream: Upstream) -> None:
    body = intent(direct, "http.fetch", item="widget-1").json()
    assert body["status"] == "succeeded" and body["result"]["status"] == 200
    assert body["result"]["headers"]["Vienna-Decision"] == "allow"
    seen = upstream.seen("/direct/items")
    assert len(seen) == 1 and seen[0].query == "item=widget-1" and b'"widget-1"' in seen[0].body
    # A handler whose target the policy denies reaches nothing: refused by the data plane itself.
    denied = intent(direct, "http.metadata").json()
    assert denied["status"] == "failed" and denied["error"] == "http.refused_by_policy"
    assert denied["result"]["headers"]["Vienna-Decision"] == "deny"


def test_timeout_kills_the_process_group_and_output_is_bounded(direct: Sidecar) -> None:
    slow = intent(direct, "demo.slow").json()
    assert (
        slow["status"] == "failed"
        and slow["result"]["timed_out"] is True
        and slow["result"]["exit_code"] is None
    )
    child = int(slow["result"]["stderr"].strip())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    flood = intent(direct, "demo.flood").json()
    assert flood["status"] == "succeeded" and flood["result"]["stdout_truncated"] is True
    assert len(flood["result"]["stdout"]) == 64 * 1024


def test_bad_params_are_refused_before_anything_runs(direct: Sidecar) -> None:
    before = len(events(direct))
    for action, params, code in (
        ("demo.echo", {}, "params.missing"),
        ("demo.echo", {"word": "x", "extra": "y"}, "params.unknown"),
        ("demo.echo", {"word": "--help"}, "params.option_like"),
        ("demo.echo", {"word": "a\nb"}, "params.control"),
        ("http.fetch", {"item": "../admin"}, "params.pattern"),
    ):
        answer = intent(direct, action, **params)
        assert answer.status_code == 400 and answer.json()["reason_code"] == code, answer.text
    assert not [e for e in events(direct)[before:] if e.type == "execution"]
    denied = intent(direct, "db.drop")
    assert denied.status_code == 403 and denied.json()["error"] == "denied"


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
        direct.api_url + "/v1/warrants/verify", json={"warrant": warrant[:-4] + "AAAA"}, timeout=30
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
