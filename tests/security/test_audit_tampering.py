"""Audit tampering around retention, against a real SQLite chain and the real keeper and CLI: the
keeper drops only a verified prefix that follows on from the last signed cut (never laundering a
gap, a front deletion or a forged anchor into a genuine cut), only as far as a release that names an
event of this very chain; `vienna audit export` never releases what it cannot vouch for; `vienna
audit verify` refuses an emptied or reinserted log."""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
from pathlib import Path

from policy.retention import Retention
from proxy.audit_keeper import AuditKeeper, Release, exported_release, mark_exported
from proxy.metrics import Metrics
from proxy.store import Store
from tests.audit.support import events, run_vienna
from tests.vienna_process import VIENNA


def _chain(data: Path, count: int) -> None:
    store = Store(data / "audit.db")
    try:
        for seq in range(1, count + 1):
            store.append(
                type="decision",
                agent="keeper-agent",
                policy_revision="r" * 64,
                payload={"decision_id": f"d_{seq}", "n": seq},
                ts=1_700_000_000 + seq,
                durable=False,
            )
        store.flush()
    finally:
        store.close()
    (data / "audit.key").write_text(secrets.token_hex(32))


def _keeper(data: Path, release: Release | None = None) -> AuditKeeper:
    return AuditKeeper(
        data / "audit.db",
        audit_key=(data / "audit.key").read_bytes().strip(),
        checkpoint_path=data / "checkpoints.jsonl",
        retention=Retention(max_bytes=1),  # as much as is released
        min_free_bytes=0,
        released=(lambda: release) if release is not None else (lambda: exported_release(data / "state.db")),
        metrics=Metrics(),
    )


def _alter(db: Path, *statements: tuple[str, tuple[object, ...]] | str) -> None:
    """Change the database by hand, as someone with write access to the data dir could."""
    connection = sqlite3.connect(db)
    try:
        with connection:
            for statement in statements:
                sql, params = (statement, ()) if isinstance(statement, str) else statement
                connection.execute(sql, params)
    finally:
        connection.close()


def _hash(data: Path, seq: int) -> str:
    return next(e.hash for e in events(data / "audit.db") if e.seq == seq)


def _drain(keeper: AuditKeeper, rounds: int = 10) -> None:
    for _ in range(rounds):
        keeper.tick()


def test_it_drops_a_released_verified_prefix_and_signs_where_the_rest_begins(tmp_path: Path) -> None:
    _chain(tmp_path, 1200)
    keeper = _keeper(tmp_path, Release(900, _hash(tmp_path, 900), "exported"))
    _drain(keeper)
    assert events(tmp_path / "audit.db")[0].seq == 901
    assert keeper.problem is None
    verify = run_vienna("audit", "verify", str(tmp_path / "audit.db"))
    assert verify.returncode == 0 and "the chain starts at seq 901" in verify.stdout


def test_a_release_that_names_another_chain_releases_nothing(tmp_path: Path) -> None:
    # e.g. audit.db was removed (or restored) while state.db kept an old mark
    _chain(tmp_path, 300)
    for release in (
        Release(200, "f" * 64, "exported"),  # not this chain's hash at seq 200
        Release(5000, "f" * 64, "shipped"),  # beyond this chain's head
    ):
        keeper = _keeper(tmp_path, release)
        _drain(keeper, 2)
        assert events(tmp_path / "audit.db")[0].seq == 1
        assert keeper.problem is not None and "not an event of this audit chain" in keeper.problem


def test_events_deleted_by_hand_are_never_laundered_by_a_cut(tmp_path: Path) -> None:
    _chain(tmp_path, 600)
    _alter(tmp_path / "audit.db", "DELETE FROM audit WHERE seq BETWEEN 200 AND 250")
    keeper = _keeper(tmp_path, Release(500, _hash(tmp_path, 500), "exported"))
    _drain(keeper)
    # at most the verified prefix before the gap may go; the gap stays visible to verify
    kept = events(tmp_path / "audit.db")
    assert kept[0].seq <= 199
    assert keeper.problem is not None and "does not verify" in keeper.problem
    assert keeper.full is not None  # over its limit and nothing may go: refused, not grown past it
    verify = run_vienna("audit", "verify", str(tmp_path / "audit.db"))
    assert verify.returncode == 1 and "events seq 200-250 are missing" in verify.stdout


def test_a_front_truncation_is_never_laundered_either(tmp_path: Path) -> None:
    _chain(tmp_path, 400)
    _alter(tmp_path / "audit.db", "DELETE FROM audit WHERE seq <= 50")
    keeper = _keeper(tmp_path, Release(300, _hash(tmp_path, 300), "exported"))
    _drain(keeper)
    assert events(tmp_path / "audit.db")[0].seq == 51
    assert keeper.problem is not None and "no signed cut accounts for" in keeper.problem


def _export(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_vienna("audit", "export", str(data / "audit.db"), *args)


def test_export_marks_only_an_intact_contiguous_run_of_this_chain(tmp_path: Path) -> None:
    _chain(tmp_path, 100)
    Store(tmp_path / "audit.db").close()  # state.db beside it, as in a data dir
    state = tmp_path / "state.db"
    assert _export(tmp_path, "--since", "40").returncode == 0
    assert exported_release(state).seq == 0  # it skipped events 1-40
    done = _export(tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    assert exported_release(state) == Release(100, _hash(tmp_path, 100), "exported")
    assert _export(tmp_path, "--since", "100", "--no-mark").returncode == 0

    _alter(tmp_path / "audit.db", "UPDATE audit SET payload = '{\"n\":0}' WHERE seq = 60")
    assert mark_exported(tmp_path / "audit.db", 10, _hash(tmp_path, 10), 0.0)
    tampered = _export(tmp_path)
    assert tampered.returncode == 1 and "does not verify at seq 60 (edited)" in tampered.stderr
    assert len(tampered.stdout.splitlines()) == 100  # everything is still exported, for the record
    assert exported_release(state).seq == 10  # but none of it counts as exported


def test_export_to_a_terminal_or_dev_null_releases_nothing(tmp_path: Path) -> None:
    _chain(tmp_path, 20)
    Store(tmp_path / "audit.db").close()
    with Path("/dev/null").open("w") as sink:
        subprocess.run([str(VIENNA), "audit", "export", str(tmp_path / "audit.db")], stdout=sink, check=True)
    assert exported_release(tmp_path / "state.db").seq == 0
    archive = tmp_path / "archive.jsonl"
    with archive.open("w") as out:
        subprocess.run([str(VIENNA), "audit", "export", str(tmp_path / "audit.db")], stdout=out, check=True)
    assert len(archive.read_text().splitlines()) == 20
    assert exported_release(tmp_path / "state.db").seq == 20


def test_verify_refuses_an_emptied_log_and_reinserted_events(tmp_path: Path) -> None:
    _chain(tmp_path, 50)
    keeper = _keeper(tmp_path, Release(30, _hash(tmp_path, 30), "exported"))
    _drain(keeper)
    assert events(tmp_path / "audit.db")[0].seq == 31
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("audit.db", "audit.key"):
        (copy / name).write_bytes((tmp_path / name).read_bytes())
    _alter(copy / "audit.db", "DELETE FROM audit")
    emptied = run_vienna("audit", "verify", str(copy / "audit.db"))
    assert emptied.returncode == 1 and "truncated" in emptied.stdout

    for name in ("audit.db", "audit.key"):
        (copy / name).write_bytes((tmp_path / name).read_bytes())
    _alter(
        copy / "audit.db",
        "INSERT INTO audit (seq, ts, type, agent, policy_revision, payload, prev_hash, hash)"
        " SELECT 5, ts, type, agent, policy_revision, payload, prev_hash, hash FROM audit WHERE seq = 31",
    )  # an old event put back in front of the cut
    reinserted = run_vienna("audit", "verify", str(copy / "audit.db"))
    assert reinserted.returncode == 1 and "reinserted" in reinserted.stdout


def test_a_forged_cut_is_never_built_upon(tmp_path: Path) -> None:
    # events 1-30 deleted by hand, and an unsigned "cut" put in to cover for it
    _chain(tmp_path, 200)
    _alter(
        tmp_path / "audit.db",
        "DELETE FROM audit WHERE seq <= 30",
        (
            "INSERT INTO audit_cut (first_seq, prev_hash, ts, reason, sig) VALUES (31, ?, 0, 'exported', 'bogus')",
            (_hash(tmp_path, 30),),  # the real hash before seq 31: only the signature is forged
        ),
    )
    keeper = _keeper(tmp_path, Release(100, _hash(tmp_path, 100), "exported"))
    _drain(keeper, 3)
    assert events(tmp_path / "audit.db")[0].seq == 31  # no genuine cut was signed on top of it
    assert keeper.problem is not None and "not signed with this audit key" in keeper.problem
    verify = run_vienna("audit", "verify", str(tmp_path / "audit.db"))
    assert verify.returncode == 1 and "signature does not verify" in verify.stdout
