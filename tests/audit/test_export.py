"""`vienna audit export` (JSON Lines) and GET /v1/audit: what leaves the database re-verifies on its own."""

from __future__ import annotations

import json
from typing import Any

from policy.audit import GENESIS_HASH, AuditEvent, verify_chain
from tests.audit.conftest import ScriptedRun
from tests.audit.support import events, run_vienna


def _export(scripted: ScriptedRun, *args: str) -> list[dict[str, Any]]:
    result = run_vienna("audit", "export", str(scripted.db), *args)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "" or result.stdout.endswith("\n")
    lines = result.stdout.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(item, dict) for item in parsed)
    return parsed


def test_export_is_every_event_as_one_json_line_and_re_verifies(scripted: ScriptedRun) -> None:
    exported = _export(scripted)
    rebuilt = [AuditEvent.from_dict(item) for item in exported]
    assert rebuilt == events(scripted.db)
    total = len(rebuilt)
    assert [event.seq for event in rebuilt] == list(range(1, total + 1))
    report = verify_chain(rebuilt)
    assert (report.ok, report.count, report.first_bad_seq) == (True, total, None)
    last_checkpoint = json.loads(scripted.checkpoints.read_text().splitlines()[-1])
    assert (last_checkpoint["size"], last_checkpoint["head_hash"]) == (total, report.head_hash)
    assert {item["type"] for item in exported} == {
        "intent",
        "decision",
        "execution",
        "warrant_request",
        "approval",
        "warrant",
        "verification",
    }
    for item in exported:
        assert set(item) == {"seq", "ts", "type", "agent", "policy_revision", "payload", "prev_hash", "hash"}
        assert item["agent"] == "test-agent"


def test_export_since_continues_the_chain_from_that_event(scripted: ScriptedRun) -> None:
    everything = [AuditEvent.from_dict(item) for item in _export(scripted)]
    tail = [AuditEvent.from_dict(item) for item in _export(scripted, "--since", "10")]
    total = len(everything)
    assert [event.seq for event in tail] == list(range(11, total + 1))
    assert tail == everything[10:]
    report = verify_chain(tail, start_prev_hash=everything[9].hash, start_seq=11)
    assert (report.ok, report.count, report.head_hash) == (True, total - 10, everything[-1].hash)
    # a tail does not verify as if it were the whole chain
    assert not verify_chain(tail, start_prev_hash=GENESIS_HASH).ok
    assert _export(scripted, "--since", str(total)) == []


def test_a_reordered_or_shortened_export_is_caught(scripted: ScriptedRun) -> None:
    rebuilt = [AuditEvent.from_dict(item) for item in _export(scripted)]
    swapped = [*rebuilt[:4], rebuilt[5], rebuilt[4], *rebuilt[6:]]
    report = verify_chain(swapped)
    assert (report.ok, report.first_bad_seq, report.problem, report.count) == (False, 6, "reordered", 4)
    holed = rebuilt[:4] + rebuilt[5:]
    report = verify_chain(holed)
    assert (report.ok, report.first_bad_seq, report.problem) == (False, 6, "sequence_gap")
    edited = [
        AuditEvent.from_dict({**item.as_dict(), "agent": "x"}) if item.seq == 7 else item for item in rebuilt
    ]
    report = verify_chain(edited)
    assert (report.ok, report.first_bad_seq, report.problem) == (False, 7, "edited")


def test_the_operator_audit_endpoint_pages_the_same_events(scripted: ScriptedRun) -> None:
    page = scripted.audit_page
    expected = [event.as_dict() for event in events(scripted.db)[2:5]]
    assert page["events"] == expected
    assert (page["next_after"], page["head_seq"]) == (5, len(events(scripted.db)))
