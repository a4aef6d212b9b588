"""No credential reaches the audit trail or the logs; every audit event is one JSON line on stdout."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.audit.conftest import ScriptedRun
from tests.audit.support import dump, events, stdout_records

SECRET_NAMES = [
    "bearer",
    "cookie",
    "warrant token",
    "warrant signature",
    "operator token alice",
    "operator token bob",
]


def _audit_table(scripted: ScriptedRun) -> str:
    return "\n".join(line for line in dump(scripted.db).splitlines() if '"audit"' in line)


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_no_secret_in_audit_events_checkpoints_stdout_or_stderr(scripted: ScriptedRun, name: str) -> None:
    secret = scripted.secrets[name]
    assert secret not in _audit_table(scripted)
    assert secret not in scripted.checkpoints.read_text()
    assert secret not in scripted.stdout
    assert secret not in scripted.stderr


@pytest.mark.parametrize(
    "name",
    [name for name in SECRET_NAMES],
)
def test_no_secret_anywhere_in_the_audit_database(scripted: ScriptedRun, name: str) -> None:
    """The whole dump (every table), and the raw file bytes (free pages keep old row versions)."""
    secret = scripted.secrets[name]
    assert secret not in dump(scripted.db)
    for path in scripted.db.parent.glob("audit.db*"):
        assert secret.encode() not in path.read_bytes(), path.name


def test_warrants_are_audited_by_id_and_hash(scripted: ScriptedRun) -> None:
    by_type = {event.type: event for event in events(scripted.db)}
    warrant = by_type["warrant"].payload
    assert warrant["warrant_id"] == scripted.warrant_id
    assert scripted.warrant_id.startswith("wt_")
    assert warrant["token_sha256"] == hashlib.sha256(scripted.warrant.encode()).hexdigest()
    assert warrant["warrant_request_id"] == scripted.warrant_request_id
    verification = by_type["verification"].payload
    assert (verification["warrant_id"], verification["matched"], verification["status"]) == (
        scripted.warrant_id,
        True,
        200,
    )
    decisions = [event.payload for event in events(scripted.db) if event.type == "decision"]
    assert [d.get("warrant_id") for d in decisions if d.get("warrant_id")] == [scripted.warrant_id] * 2


def test_every_audit_event_is_one_json_line_on_stdout(scripted: ScriptedRun) -> None:
    records = list(stdout_records(scripted.stdout))  # every stdout line is JSON
    assert {record.get("log") for record in records} == {"vienna.audit"}  # nothing but events
    audit_lines = [record for record in records if record["log"] == "vienna.audit"]
    stored = events(scripted.db)
    assert [(line["seq"], line["hash"]) for line in audit_lines] == [
        (event.seq, event.hash) for event in stored
    ]
    assert [{k: v for k, v in line.items() if k != "log"} for line in audit_lines] == [
        event.as_dict() for event in stored
    ]


def test_one_decision_line_per_request_with_the_id_the_client_got(scripted: ScriptedRun) -> None:
    lines = [
        r for r in stdout_records(scripted.stdout) if r["log"] == "vienna.audit" and r["type"] == "decision"
    ]
    assert [line["payload"]["decision_id"] for line in lines] == scripted.decision_ids
    assert len(set(scripted.decision_ids)) == 9
    assert [line["payload"]["decision"] for line in lines] == [
        "allow",
        "allow",
        "allow",
        "warrant_required",
        "warrant_required",
        "denied",
        "bad_request",
        "allow",
        "warrant_invalid",
    ]


def test_checkpoints_are_logged_as_json_lines_on_stderr(scripted: ScriptedRun) -> None:
    logged = [
        {k: v for k, v in json.loads(line).items() if k != "log"}
        for line in scripted.stderr.splitlines()
        if line.startswith('{"head_hash"') or '"log": "vienna.checkpoint"' in line
    ]
    assert logged == [json.loads(line) for line in scripted.checkpoints.read_text().splitlines()]
