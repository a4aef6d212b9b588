"""Fixtures for the audit tests: a loopback upstream and one scripted sidecar run whose artefacts
(audit.db, checkpoints, audit key, stdout, stderr, /metrics snapshots) several test modules examine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.audit.support import TOKENS, Metrics, Sidecar, Upstream

BEARER_SECRET = "secret-xyz"
COOKIE_SECRET = "secret-cookie"
DELETE_PATH = "/repos/acme/widgets"


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.stop()


@dataclass
class ScriptedRun:
    """What a fresh sidecar (checkpoint every 5 events, audit on stdout) left behind after the script."""

    workdir: Path
    db: Path
    checkpoints: Path
    audit_key: Path
    stdout: str
    stderr: str
    exit_code: int
    metrics_pending: Metrics  # after the T3 request opened its warrant request, before any vote
    metrics_approved: Metrics  # after the second approval
    metrics_final: Metrics  # after the retry and the replay
    warrant: str
    warrant_id: str
    warrant_request_id: str
    decision_ids: list[str] = field(default_factory=list)  # Vienna-Decision-Id of every proxied response
    statuses: list[int] = field(default_factory=list)
    audit_page: dict[str, Any] = field(default_factory=dict)  # GET /v1/audit?after=2&limit=3

    @property
    def secrets(self) -> dict[str, str]:
        signature = self.warrant.rsplit(".", 1)[-1]
        return {
            "bearer": BEARER_SECRET,
            "cookie": COOKIE_SECRET,
            "warrant token": self.warrant,
            "warrant signature": signature,
            **{f"operator token {name}": token for name, token in TOKENS.items()},
        }


@pytest.fixture(scope="session")
def scripted(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> ScriptedRun:
    """3 T0 GETs carrying credentials, 2 identical T3 DELETEs (one warrant request), a deny-tier GET,
    a malformed path, two approvals, the retry with the warrant and its replay; then a clean stop."""
    sidecar = Sidecar(
        tmp_path_factory.mktemp("scripted"), args=["--checkpoint-every", "5", "--audit-stdout", "true"]
    ).start()
    decision_ids: list[str] = []
    statuses: list[int] = []

    def through(method: str, path: str, **kwargs: Any) -> Any:
        response = sidecar.request(method, upstream.url(path), **kwargs)
        decision_ids.append(response.headers["Vienna-Decision-Id"])
        statuses.append(response.status_code)
        return response

    try:
        credentials = {"Authorization": f"Bearer {BEARER_SECRET}", "Cookie": f"s={COOKIE_SECRET}"}
        for index in range(3):
            through("GET", f"/items/{index}", headers=credentials)
        first = through("DELETE", DELETE_PATH).json()
        second = through("DELETE", DELETE_PATH).json()
        request_id = first["warrant_request"]["id"]
        assert second["warrant_request"]["id"] == request_id
        metrics_pending = sidecar.metrics()
        through("GET", "/forbidden/thing")
        through("GET", "/a%2Fb")
        for operator in ("alice", "bob"):
            assert sidecar.approve(request_id, operator).status_code == 200
        metrics_approved = sidecar.metrics()
        state = sidecar.api("GET", f"/v1/warrant-requests/{request_id}").json()
        warrant, warrant_id = state["warrant"], state["warrant_id"]
        through("DELETE", DELETE_PATH, warrant=warrant, headers=credentials)
        through("DELETE", DELETE_PATH, warrant=warrant)
        metrics_final = sidecar.metrics()
        page = sidecar.api("GET", "/v1/audit?after=2&limit=3", token=TOKENS["alice"])
        assert page.status_code == 200
        audit_page = page.json()
    finally:
        exit_code = sidecar.stop()
    assert statuses == [200, 200, 200, 403, 403, 403, 400, 200, 403]
    return ScriptedRun(
        workdir=sidecar.workdir,
        db=sidecar.db,
        checkpoints=sidecar.checkpoints,
        audit_key=sidecar.audit_key,
        stdout=sidecar.stdout_text(),
        stderr=sidecar.stderr_text(),
        exit_code=exit_code,
        metrics_pending=metrics_pending,
        metrics_approved=metrics_approved,
        metrics_final=metrics_final,
        warrant=warrant,
        warrant_id=warrant_id,
        warrant_request_id=request_id,
        decision_ids=decision_ids,
        statuses=statuses,
        audit_page=audit_page,
    )
