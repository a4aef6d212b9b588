"""What the Vienna Direct tests share (§13): a `vienna run` whose policy has handlers of every kind,
a SQLite reports database, a real PostgreSQL table when one is here, and the calls the agent makes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.store import read_events
from tests.integration.harness import LOOPBACK_HOSTS, Sidecar, Upstream, new_session, running_sidecar


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
    warrant: {{max_uses: 5, bind: path}}   # an execution warrant is exact and single use regardless
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
def direct_upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def direct(
    tmp_path_factory: pytest.TempPathFactory,
    direct_upstream: Upstream,
    reports_db: Path,
    pg_items: str | None,
) -> Iterator[Sidecar]:
    env = {"REPORTS_DSN": f"sqlite:///{reports_db}", "PG_DSN": pg_items or ""}
    with running_sidecar(
        tmp_path_factory.mktemp("direct"), policy=direct_policy(direct_upstream.port), env=env
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
