"""`vienna audit verify` on a real audit.db written by a real sidecar, then on tampered copies of it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from policy.audit import GENESIS_HASH, checkpoint_payload, link, sign_checkpoint
from tests.audit.conftest import ScriptedRun
from tests.audit.support import events, run_vienna

Tamper = Callable[[sqlite3.Connection], object]


def _verify(db: Path, checkpoints: Path, key: Path) -> tuple[int, str]:
    result = run_vienna(
        "audit", "verify", str(db), "--checkpoints", str(checkpoints), "--audit-key-file", str(key)
    )
    assert result.stderr == ""
    return result.returncode, result.stdout


def _tampered(scripted: ScriptedRun, tmp_path: Path, tamper: Tamper) -> tuple[int, str]:
    copy = tmp_path / "audit.db"
    shutil.copyfile(scripted.db, copy)
    connection = sqlite3.connect(copy)
    try:
        with connection:
            tamper(connection)
    finally:
        connection.close()
    return _verify(copy, scripted.checkpoints, scripted.audit_key)


def _seq_of(scripted: ScriptedRun, type_: str, **payload: object) -> int:
    """The seq of the first event of that type whose payload has those values."""
    for event in events(scripted.db):
        if event.type == type_ and all(event.payload.get(k) == v for k, v in payload.items()):
            return event.seq
    raise AssertionError(f"no {type_} event with {payload}")


def test_the_intact_log_verifies_with_a_one_line_summary(scripted: ScriptedRun) -> None:
    assert scripted.exit_code == 0
    checkpoints = [json.loads(line) for line in scripted.checkpoints.read_text().splitlines()]
    # every 5 events, and one more on the clean stop
    assert [entry["size"] for entry in checkpoints] == [5, 10, 15, 20, 25, 26]
    code, out = _verify(scripted.db, scripted.checkpoints, scripted.audit_key)
    head = events(scripted.db)[-1].hash
    assert code == 0
    assert out == f"ok: 26 events, chain intact, head {head[:16]}, 6 signed checkpoints verified\n"
    # the defaults find checkpoints.jsonl and audit.key next to the database
    default = run_vienna("audit", "verify", str(scripted.db))
    assert (default.returncode, default.stdout) == (0, out)


def test_an_edited_payload_is_named(scripted: ScriptedRun, tmp_path: Path) -> None:
    seq = _seq_of(scripted, "decision", decision="denied")

    def allow_it(db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE audit SET payload = json_set(payload, '$.decision', 'allow') WHERE seq = ?", (seq,)
        )

    code, out = _tampered(scripted, tmp_path, allow_it)
    assert code == 1
    assert out == (
        f"TAMPERED: event seq {seq}: edited: its hash does not match its content"
        f" ({seq - 1} events verified before it)\n"
    )


def test_an_edited_column_outside_the_payload_is_named(scripted: ScriptedRun, tmp_path: Path) -> None:
    code, out = _tampered(
        scripted, tmp_path, lambda db: db.execute("UPDATE audit SET agent = 'someone-else' WHERE seq = 4")
    )
    assert code == 1
    assert out.startswith("TAMPERED: event seq 4: edited:")


def test_a_deleted_middle_event_is_named_missing(scripted: ScriptedRun, tmp_path: Path) -> None:
    code, out = _tampered(scripted, tmp_path, lambda db: db.execute("DELETE FROM audit WHERE seq = 10"))
    assert code == 1
    assert out == (
        "TAMPERED: event seq 11: sequence_gap: event seq 10 is missing (9 events verified before it)\n"
    )
    code, out = _tampered(scripted, tmp_path, lambda db: db.execute("DELETE FROM audit WHERE seq IN (6, 7)"))
    assert (code, out.split(" (")[0]) == (
        1,
        "TAMPERED: event seq 8: sequence_gap: events seq 6-7 are missing",
    )


def test_two_swapped_payloads_are_detected_at_the_first(scripted: ScriptedRun, tmp_path: Path) -> None:
    def swap_payloads(db: sqlite3.Connection) -> None:
        rows = dict(db.execute("SELECT seq, payload FROM audit WHERE seq IN (3, 5)").fetchall())
        db.execute("UPDATE audit SET payload = ? WHERE seq = 3", (rows[5],))
        db.execute("UPDATE audit SET payload = ? WHERE seq = 5", (rows[3],))

    code, out = _tampered(scripted, tmp_path, swap_payloads)
    assert code == 1
    assert out.startswith("TAMPERED: event seq 3: edited:")


def test_two_swapped_events_are_detected_at_the_first(scripted: ScriptedRun, tmp_path: Path) -> None:
    def swap_seqs(db: sqlite3.Connection) -> None:
        db.execute("UPDATE audit SET seq = -1 WHERE seq = 8")
        db.execute("UPDATE audit SET seq = 8 WHERE seq = 9")
        db.execute("UPDATE audit SET seq = 9 WHERE seq = -1")

    code, out = _tampered(scripted, tmp_path, swap_seqs)
    assert code == 1
    assert out.startswith("TAMPERED: event seq 8: edited:")


@pytest.mark.parametrize(
    ("keep", "checkpoint", "covers"),
    [(25, 6, 26), (20, 5, 25), (12, 3, 15), (0, 1, 5)],
    ids=["one-cut", "cut-at-a-checkpoint", "cut-across-a-checkpoint", "everything-cut"],
)
def test_a_tail_cut_after_a_signed_checkpoint_is_truncated(
    scripted: ScriptedRun, tmp_path: Path, keep: int, checkpoint: int, covers: int
) -> None:
    code, out = _tampered(
        scripted, tmp_path, lambda db: db.execute("DELETE FROM audit WHERE seq > ?", (keep,))
    )
    assert code == 1
    assert out == (
        f"TAMPERED: event seq {keep + 1}: truncated: signed checkpoint {checkpoint} covers {covers} events,"
        f" the log ends at seq {keep}\n"
    )


def test_a_rewritten_tail_with_recomputed_hashes_differs_from_the_signed_checkpoint(
    scripted: ScriptedRun, tmp_path: Path
) -> None:
    """An attacker who rewrites events from the first approval on and recomputes every hash still
    cannot sign checkpoints."""
    original = events(scripted.db)
    first = next(i for i, event in enumerate(original) if event.type == "approval")

    def rewrite(db: sqlite3.Connection) -> None:
        prev = original[first - 1].hash
        for event in original[first:]:
            payload = (
                {**event.payload, "justification": "rewritten"} if event.type == "approval" else event.payload
            )
            forged = link(
                prev_hash=prev,
                seq=event.seq,
                ts=event.ts,
                type=event.type,
                agent=event.agent,
                policy_revision=event.policy_revision,
                payload=payload,
            )
            db.execute(
                "UPDATE audit SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (json.dumps(forged.payload, sort_keys=True), forged.prev_hash, forged.hash, event.seq),
            )
            prev = forged.hash

    sizes = [json.loads(line)["size"] for line in scripted.checkpoints.read_text().splitlines()]
    number, size = next((n, size) for n, size in enumerate(sizes, start=1) if size >= original[first].seq)
    code, out = _tampered(scripted, tmp_path, rewrite)
    assert (code, out) == (1, f"TAMPERED: event seq {size}: differs from signed checkpoint {number}\n")


def _forged_checkpoints(
    scripted: ScriptedRun, tmp_path: Path, edit: Callable[[list[str]], list[str]]
) -> Path:
    path = tmp_path / "checkpoints.jsonl"
    path.write_text("\n".join(edit(scripted.checkpoints.read_text().splitlines())) + "\n")
    return path


def test_a_forged_checkpoint_line_is_refused(scripted: ScriptedRun, tmp_path: Path) -> None:
    head = events(scripted.db)[-1].hash
    ts = 1.8e9
    attacker_key = b"not-the-audit-key-" * 3
    size = len(events(scripted.db))
    forged = {
        "size": size,
        "head_hash": head,
        "ts": ts,
        "sig": sign_checkpoint(checkpoint_payload(size, head, ts), attacker_key),
    }
    path = _forged_checkpoints(scripted, tmp_path, lambda lines: [*lines, json.dumps(forged)])
    line = len(scripted.checkpoints.read_text().splitlines()) + 1
    code, out = _verify(scripted.db, path, scripted.audit_key)
    assert (code, out) == (1, f"{path}:{line}: checkpoint signature does not verify (forged or wrong key)\n")


def test_an_edited_checkpoint_line_is_refused(scripted: ScriptedRun, tmp_path: Path) -> None:
    def shrink_first(lines: list[str]) -> list[str]:
        entry = json.loads(lines[0])
        entry["size"], entry["head_hash"] = 4, events(scripted.db)[3].hash
        return [json.dumps(entry), *lines[1:]]

    path = _forged_checkpoints(scripted, tmp_path, shrink_first)
    code, out = _verify(scripted.db, path, scripted.audit_key)
    assert (code, out) == (1, f"{path}:1: checkpoint signature does not verify (forged or wrong key)\n")
    garbage = _forged_checkpoints(scripted, tmp_path, lambda lines: [*lines, "{not json"])
    code, out = _verify(scripted.db, garbage, scripted.audit_key)
    line = len(scripted.checkpoints.read_text().splitlines()) + 1
    assert (code, out) == (1, f"{garbage}:{line}: malformed checkpoint\n")


def test_checkpoints_signed_with_another_key_do_not_verify(scripted: ScriptedRun, tmp_path: Path) -> None:
    other_key = tmp_path / "other.key"
    other_key.write_text("x" * 64)
    code, out = _verify(scripted.db, scripted.checkpoints, other_key)
    assert code == 1
    assert out.endswith(":1: checkpoint signature does not verify (forged or wrong key)\n")


def test_a_database_that_is_not_an_audit_log_fails(tmp_path: Path) -> None:
    missing = run_vienna("audit", "verify", str(tmp_path / "nope.db"))
    assert missing.returncode == 1
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    result = run_vienna("audit", "verify", str(junk))
    assert result.returncode == 1
    assert "cannot read the audit log" in result.stdout


def test_the_chain_starts_at_genesis(scripted: ScriptedRun) -> None:
    first = events(scripted.db)[0]
    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
