"""`--audit-retain` with a real sidecar: nothing is dropped before it is exported, a full audit
refuses every tier (503 audit.full) and says so, export releases, and `vienna audit verify` proves
what is left from the signed cut — and fails on a tampered remainder."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from proxy.audit_keeper import exported_release
from tests.audit.support import TOKENS, Metrics, Sidecar, Upstream, events, run_vienna

LIMIT = "96KiB"


def _until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _verify(db: Path) -> tuple[int, str]:
    result = run_vienna("audit", "verify", str(db))
    return result.returncode, result.stdout + result.stderr


def _fill_until_full(sidecar: Sidecar, upstream: Upstream, forwarded: list[str]) -> requests.Response:
    """T0 GETs until one is refused; the decision ids of those forwarded go to `forwarded`."""
    for index in range(5000):
        response = sidecar.request("GET", upstream.url(f"/fill/{index}"))
        if response.status_code != 200:
            return response
        forwarded.append(response.headers["Vienna-Decision-Id"])
    pytest.fail("the audit never filled up")


@dataclass
class Retained:
    sidecar: Sidecar
    forwarded: list[str]
    refused: tuple[int, dict[str, Any]]
    first_seq_while_full: int
    tiers_while_full: list[tuple[int, Any]]
    readyz_full: tuple[int, dict[str, Any]]
    full_gauge: float
    api_while_full: tuple[int, dict[str, Any]]
    mark_after_skipping_export: int
    startupz_full: int
    first_seq_after_skipping_export: int
    still_full: int
    exported: list[dict[str, Any]]
    export_stderr: str
    after_export: int
    upstream_while_full: list[tuple[str, str]]
    metrics: Metrics
    export_across_cut: tuple[int, str, str]


@pytest.fixture(scope="module")
def retained(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Retained:
    """A sidecar with a tiny size limit, driven until full, checked while full, released by an
    export, and stopped; what it saw on the way, for the tests below."""
    sidecar = Sidecar(
        tmp_path_factory.mktemp("retain"), args=["--audit-retain", LIMIT, "--audit-stdout", "false"]
    ).start()
    seen: dict[str, Any] = {}
    forwarded: list[str] = []
    try:
        refused = _fill_until_full(sidecar, upstream, forwarded)
        seen["refused"] = (refused.status_code, refused.json())
        seen["first_seq_while_full"] = events(sidecar.db)[0].seq
        seen["tiers_while_full"] = [
            (r.status_code, r.json().get("reason_code"))
            for r in (
                sidecar.request("GET", upstream.url("/fill/again")),
                sidecar.request("DELETE", upstream.url("/repos/acme/widgets")),
                sidecar.request("GET", upstream.url("/forbidden/x")),
            )
        ]
        ready = sidecar.http.get(sidecar.api_url + "/readyz", timeout=5)
        seen["readyz_full"] = (ready.status_code, ready.json())
        seen["full_gauge"] = sidecar.metrics().value("vienna_audit_full")
        vote = sidecar.api("POST", "/v1/warrant-requests/wr_nope/approve", token=TOKENS["alice"], body={})
        seen["api_while_full"] = (vote.status_code, vote.json())
        upstream_before = len(upstream.seen())

        # An export from a later seq skips events: it must not release them.
        skipping = run_vienna("audit", "export", str(sidecar.db), "--since", "10")
        assert skipping.returncode == 0, skipping.stderr
        seen["mark_after_skipping_export"] = exported_release(sidecar.data_dir / "state.db").seq
        seen["startupz_full"] = sidecar.http.get(sidecar.api_url + "/startupz", timeout=5).status_code
        time.sleep(2.5)  # a few keeper rounds
        seen["first_seq_after_skipping_export"] = events(sidecar.db)[0].seq
        seen["still_full"] = sidecar.http.get(sidecar.api_url + "/readyz", timeout=5).status_code

        export = run_vienna("audit", "export", str(sidecar.db))
        assert export.returncode == 0, export.stderr
        exported = [json.loads(line) for line in export.stdout.splitlines()]
        seen["exported"] = exported
        seen["export_stderr"] = export.stderr
        _until(
            lambda: sidecar.http.get(sidecar.api_url + "/readyz", timeout=5).status_code == 200, "room again"
        )
        after = sidecar.request("GET", upstream.url("/after/export"))
        seen["after_export"] = after.status_code
        if after.status_code == 200:
            forwarded.append(after.headers["Vienna-Decision-Id"])
        seen["upstream_while_full"] = upstream.seen()[upstream_before:]
        seen["metrics"] = sidecar.metrics()
        again = run_vienna("audit", "export", str(sidecar.db), "--since", "0", "--no-mark")
        seen["export_across_cut"] = (again.returncode, again.stdout, again.stderr)
    finally:
        assert sidecar.stop() == 0
    return Retained(sidecar=sidecar, forwarded=forwarded, **seen)


def test_a_full_audit_refuses_every_tier_with_audit_full(retained: Retained) -> None:
    status, body = retained.refused
    assert status == 503 and body["reason_code"] == "audit.full", body
    assert "not yet exported or shipped" in body["reason"]
    assert retained.tiers_while_full == [(503, "audit.full")] * 3
    status, api_body = retained.api_while_full
    assert status == 503 and api_body["reason_code"] == "audit.full"


def test_readyz_and_the_metric_say_the_audit_is_full(retained: Retained) -> None:
    status, body = retained.readyz_full
    assert status == 503
    assert body["status"] == "not_ready" and body["reason_code"] == "audit.full"
    assert body["audit"]["status"] == "audit.full" and "limit" in body["audit"]["reason"]
    assert retained.full_gauge == 1
    assert retained.startupz_full == 200  # started all the same: a startup probe must not restart it


def test_nothing_is_dropped_before_it_is_exported(retained: Retained) -> None:
    assert retained.first_seq_while_full == 1
    # an export that skipped events 1-10 released nothing
    assert retained.mark_after_skipping_export == 0
    assert retained.first_seq_after_skipping_export == 1
    assert retained.still_full == 503


def test_an_export_releases_and_the_oldest_events_are_dropped(retained: Retained) -> None:
    sidecar = retained.sidecar
    exported = retained.exported
    last_exported = exported[-1]["seq"]
    assert retained.export_stderr == ""
    assert retained.metrics.value("vienna_audit_released_seq") == last_exported
    assert retained.after_export == 200
    kept = events(sidecar.db)
    assert 1 < kept[0].seq <= last_exported + 1  # dropped, but never past what was exported
    metrics = retained.metrics
    assert metrics.value("vienna_audit_full") == 0
    # (one snapshot: the keeper may have cut again since)
    dropped = metrics.value("vienna_audit_dropped_events_total")
    assert dropped > 0 and dropped == metrics.value("vienna_audit_first_seq") - 1
    assert metrics.value("vienna_audit_bytes") > 0
    assert metrics.value("vienna_data_dir_free_bytes") > 0


def test_nothing_forwarded_is_missing_from_the_audit(retained: Retained) -> None:
    sidecar = retained.sidecar
    assert retained.upstream_while_full == [("GET", "/after/export")]  # nothing went out while full
    exported = retained.exported
    recorded = {e["payload"]["decision_id"] for e in exported if e["type"] == "decision"}
    recorded |= {
        str(e.payload["decision_id"])
        for e in events(sidecar.db)
        if e.type == "decision" and e.payload["forwarded"]
    }
    forwarded = retained.forwarded
    assert len(forwarded) > 10
    assert set(forwarded) <= recorded


def test_verify_proves_the_rest_and_says_where_it_starts(retained: Retained) -> None:
    sidecar = retained.sidecar
    first = events(sidecar.db)[0].seq
    code, text = _verify(sidecar.db)
    assert code == 0, text
    assert text.startswith("ok: ")
    assert f"the chain starts at seq {first}" in text and "exported" in text


def test_export_works_across_the_cut(retained: Retained) -> None:
    code, stdout, stderr = retained.export_across_cut
    assert code == 0
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines[0]["seq"] > 1
    assert [e["seq"] for e in lines] == list(range(lines[0]["seq"], lines[0]["seq"] + len(lines)))
    assert "dropped by retention" in stderr


def _tampered(retained: Retained, tmp_path: Path, sql: str) -> tuple[int, str]:
    sidecar = retained.sidecar
    for name in ("audit.db", "audit.key", "checkpoints.jsonl"):
        shutil.copyfile(sidecar.data_dir / name, tmp_path / name)
    connection = sqlite3.connect(tmp_path / "audit.db")
    try:
        with connection:
            first = connection.execute("SELECT MIN(seq) FROM audit").fetchone()[0]
            connection.execute(sql.format(first=first))
    finally:
        connection.close()
    return _verify(tmp_path / "audit.db")


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("UPDATE audit SET payload = '{{\"forged\":true}}' WHERE seq = {first} + 3", "edited"),
        ("DELETE FROM audit WHERE seq = {first}", "missing"),
        ("DELETE FROM audit WHERE seq <= {first} + 5", "missing"),
        (
            "UPDATE audit_cut SET sig = CASE WHEN substr(sig, 1, 1) = 'a' THEN 'b' ELSE 'a' END || substr(sig, 2)",
            "signature does not verify",
        ),
        ("UPDATE audit_cut SET prev_hash = '" + "1" * 64 + "'", "signature does not verify"),
        ("DELETE FROM audit_cut", "no signed retention cut"),
        ("UPDATE audit_cut SET first_seq = first_seq + 1", "reinserted"),
        ("DELETE FROM audit", "truncated"),
    ],
)
def test_verify_fails_on_a_tampered_remainder(
    retained: Retained, tmp_path: Path, sql: str, expected: str
) -> None:
    code, text = _tampered(retained, tmp_path, sql)
    assert code == 1, text
    assert "TAMPERED" in text or "does not verify" in text
    assert expected in text
