"""SQLite in the data dir: the audit hash chain, warrant requests with their votes, consumed warrant ids."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from policy.approvals import RequestStatus, Vote, WarrantRequest
from policy.audit import GENESIS_HASH, AuditEvent, link
from policy.model import Intent, Tier
from proxy.notify import INSERT_SQL, OUTBOX_DDL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    type TEXT NOT NULL,
    agent TEXT NOT NULL,
    policy_revision TEXT NOT NULL,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_cut (
    first_seq INTEGER PRIMARY KEY,
    prev_hash TEXT NOT NULL,
    ts REAL NOT NULL,
    reason TEXT NOT NULL,
    sig TEXT NOT NULL
);
"""
# A retention cut: events before `first_seq` were dropped (after they were exported or shipped); the
# signed (first_seq, prev_hash) anchors what is left, so the rest of the chain still verifies.
# Every commit rewrites at least the table's last page, so the page size is the floor of what one
# commit costs in the WAL; smaller pages hold fewer ~500-byte events each and waste more of every
# page (measured: 1 KiB pages store ~690 bytes per event, 4 KiB ~510). Set only when the file is created.
PAGE_SIZE = 4096

# Operational state lives in its own file: a copy of audit.db handed to an auditor must not carry
# minted warrants (bearer tokens) or anything else that could be replayed.
_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS warrant_requests (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    tier TEXT NOT NULL,
    intent TEXT NOT NULL,
    request TEXT NOT NULL,
    rule_id TEXT,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    votes TEXT NOT NULL,
    warrant TEXT,
    warrant_id TEXT,
    warrant_expires_at REAL
);
CREATE INDEX IF NOT EXISTS warrant_requests_by_fingerprint ON warrant_requests (agent, fingerprint, status);
CREATE INDEX IF NOT EXISTS warrant_requests_by_status ON warrant_requests (status);
CREATE TABLE IF NOT EXISTS audit_marks (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS warrant_uses (
    jti TEXT PRIMARY KEY,
    uses INTEGER NOT NULL,
    max_uses INTEGER NOT NULL,
    first_used_at REAL NOT NULL
);
"""


class StoreUnavailable(RuntimeError):
    """The store cannot write (locked, read-only, disk full): callers must refuse, never forward."""


class AuditFull(StoreUnavailable):
    """The audit cannot take more events: the disk is full, or the retention limit is reached with
    nothing exported or shipped that could be dropped. Every request is refused (503 audit.full)."""


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back what is open. SQLite has already rolled back a transaction whose COMMIT failed
    (a full disk, say): a second ROLLBACK would raise and hide the error that matters."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _write_error(what: str, exc: sqlite3.Error) -> StoreUnavailable:
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return AuditFull(f"{what}: the disk is full ({exc})")
    return StoreUnavailable(f"{what}: {exc}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredRequest:
    """A warrant request plus what the proxy keeps beside the pure lifecycle state."""

    state: WarrantRequest
    fingerprint: str
    request: Mapping[str, Any]
    rule_id: str | None
    warrant: str | None = None
    warrant_id: str | None = None
    warrant_expires_at: float | None = None


class Store:
    """audit.db (the chain) and state.db (warrant requests, consumed warrant ids), used from the event
    loop thread: durable writes commit before returning, write-behind events wait for the next commit."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL", autocheckpoint: bool = True) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=2.0)
        self._lock = threading.Lock()
        self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # a no-op once the file has pages
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA journal_size_limit=8388608")  # the WAL file shrinks back after a burst
        if not autocheckpoint:
            # The audit keeper checkpoints from its own thread: a checkpoint (with its fsyncs) on the
            # event loop stalls every request in flight.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        self._state = sqlite3.connect(
            str(path.with_name("state.db")), isolation_level=None, check_same_thread=False, timeout=2.0
        )
        self._state.execute("PRAGMA journal_mode=WAL")
        self._state.execute(f"PRAGMA synchronous={synchronous}")
        self._state.executescript(_STATE_SCHEMA)
        for statement in OUTBOX_DDL:
            self._state.execute(statement)
        row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:  # empty, or everything was cut: the chain goes on from the last cut
            row = self._db.execute(
                "SELECT first_seq - 1, prev_hash FROM audit_cut ORDER BY first_seq DESC LIMIT 1"
            ).fetchone()
        self._head_seq: int = row[0] if row else 0
        self._head_hash: str = row[1] if row else GENESIS_HASH
        self._pending: list[AuditEvent] = []

    def close(self) -> None:
        with self._lock:
            try:
                self._flush_locked()
            finally:
                self._db.close()
                self._state.close()

    @property
    def head(self) -> tuple[int, str]:
        return self._head_seq, self._head_hash

    # --- audit chain -------------------------------------------------------------------------

    def append(
        self,
        *,
        type: str,
        agent: str,
        policy_revision: str,
        payload: Mapping[str, object],
        ts: float,
        durable: bool = True,
    ) -> AuditEvent:
        """Link one event into the chain. `durable` events are committed (with every event queued
        before them) before this returns, or StoreUnavailable is raised and the event is dropped;
        others wait in memory for the next commit (group commit), in chain order."""
        with self._lock:
            event = link(
                prev_hash=self._head_hash,
                seq=self._head_seq + 1,
                ts=float(ts),  # stored as REAL: an int would hash as `5` and read back as `5.0`
                type=type,
                agent=agent,
                policy_revision=policy_revision,
                payload=payload,
            )
            previous_head = (self._head_seq, self._head_hash)
            self._pending.append(event)
            self._head_seq, self._head_hash = event.seq, event.hash
            if durable:
                try:
                    self._flush_locked()
                except StoreUnavailable:
                    # The event was never stored: take it back so the chain stays gap-free.
                    self._pending.pop()
                    self._head_seq, self._head_hash = previous_head
                    raise
            return event

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Commit queued events; raises StoreUnavailable (and keeps them queued) when it cannot."""
        with self._lock:
            self._flush_locked()

    def sync(self) -> None:
        """Commit queued events and force everything committed onto disk. With WAL and
        synchronous=NORMAL a commit survives a crash of the process but not of the machine until
        a WAL checkpoint syncs it; a signed audit checkpoint must never be ahead of that."""
        with self._lock:
            self._flush_locked()
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                raise _write_error("audit store cannot sync", exc) from exc

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        rows = [
            (
                e.seq,
                e.ts,
                e.type,
                e.agent,
                e.policy_revision,
                e.payload_json
                or json.dumps(e.payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
                e.prev_hash,
                e.hash,
            )
            for e in self._pending
        ]
        sql = (
            "INSERT INTO audit (seq, ts, type, agent, policy_revision, payload, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        try:
            if len(rows) == 1:
                self._db.execute(sql, rows[0])
            else:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(sql, rows)
                    self._db.execute("COMMIT")
                except BaseException:  # never leave the transaction open: later writes would join it
                    rollback(self._db)
                    raise
        except sqlite3.Error as exc:
            raise _write_error("audit store cannot write", exc) from exc
        self._pending.clear()

    def events(self, *, after: int = 0, limit: int | None = None) -> list[AuditEvent]:
        return list(self.iter_events(after=after, limit=limit))

    def iter_events(self, *, after: int = 0, limit: int | None = None) -> Iterator[AuditEvent]:
        self.flush()
        sql = "SELECT seq, ts, type, agent, policy_revision, payload, prev_hash, hash FROM audit WHERE seq > ? ORDER BY seq"
        params: tuple[int, ...] = (after,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (after, limit)
        for row in self._db.execute(sql, params):
            yield row_to_event(row)

    # --- warrant requests ----------------------------------------------------------------------

    def find_open_request(self, agent: str, fingerprint: str, now: float) -> StoredRequest | None:
        """A pending (or approved, still usable) request for the same agent and request."""
        rows = self._state.execute(
            "SELECT * FROM warrant_requests WHERE agent = ? AND fingerprint = ? AND status IN ('pending', 'approved')"
            " ORDER BY created_at DESC",
            (agent, fingerprint),
        ).fetchall()
        for row in rows:
            stored = _row_to_request(row)
            status = stored.state.effective_status(now)
            if status is RequestStatus.PENDING:
                return stored
            if status is RequestStatus.APPROVED and stored.warrant_id and self._warrant_usable(stored, now):
                return stored
        return None

    def _warrant_usable(self, stored: StoredRequest, now: float) -> bool:
        if stored.warrant_expires_at is not None and now >= stored.warrant_expires_at:
            return False
        row = self._state.execute(
            "SELECT uses, max_uses FROM warrant_uses WHERE jti = ?", (stored.warrant_id,)
        ).fetchone()
        return row is None or row[0] < row[1]

    def get_request(self, request_id: str) -> StoredRequest | None:
        row = self._state.execute("SELECT * FROM warrant_requests WHERE id = ?", (request_id,)).fetchone()
        return _row_to_request(row) if row else None

    def count_requests(self, status: str | None, now: float) -> int:
        sql, params = _status_filter(status, now)
        row = self._state.execute(f"SELECT COUNT(*) FROM warrant_requests {sql}", params).fetchone()  # noqa: S608 -- fixed fragments
        return int(row[0])

    def count_pending_for(self, agent: str, now: float) -> int:
        row = self._state.execute(
            "SELECT COUNT(*) FROM warrant_requests WHERE status = 'pending' AND expires_at > ? AND agent = ?",
            (now, agent),
        ).fetchone()
        return int(row[0])

    def list_requests(
        self, status: str | None, now: float, limit: int = 500, offset: int = 0
    ) -> list[StoredRequest]:
        sql, params = _status_filter(status, now)
        rows = self._state.execute(
            f"SELECT * FROM warrant_requests {sql} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",  # noqa: S608 -- fixed fragments
            (*params, limit, offset),
        ).fetchall()
        return [_row_to_request(row) for row in rows]

    def count_pending(self, now: float) -> int:
        row = self._state.execute(
            "SELECT COUNT(*) FROM warrant_requests WHERE status = 'pending' AND expires_at > ?", (now,)
        ).fetchone()
        return int(row[0])

    def save_request(self, stored: StoredRequest, *, notifications: Sequence[tuple[Any, ...]] = ()) -> None:
        """Write the request, and the notifications announcing the change, in one transaction."""
        state = stored.state
        try:
            with self._lock:
                self._state.execute("BEGIN IMMEDIATE")
                try:
                    self._state.execute(
                        "INSERT OR REPLACE INTO warrant_requests (id, agent, fingerprint, tier, intent, request, rule_id,"
                        " status, created_at, expires_at, votes, warrant, warrant_id, warrant_expires_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            state.id,
                            state.agent,
                            stored.fingerprint,
                            state.tier.value,
                            json.dumps(state.intent.as_dict()),
                            json.dumps(dict(stored.request)),
                            stored.rule_id,
                            state.status.value,
                            state.created_at,
                            state.expires_at,
                            json.dumps([_vote_to_dict(v) for v in state.votes]),
                            stored.warrant,
                            stored.warrant_id,
                            stored.warrant_expires_at,
                        ),
                    )
                    if notifications:
                        self._state.executemany(INSERT_SQL.replace("%s", "?"), notifications)
                    self._state.execute("COMMIT")
                except BaseException:
                    rollback(self._state)
                    raise
        except sqlite3.Error as exc:
            raise _write_error("warrant request store cannot write", exc) from exc

    def pending_past(self, now: float) -> list[StoredRequest]:
        """Pending requests whose deadline has passed (to be marked expired and announced)."""
        rows = self._state.execute(
            "SELECT * FROM warrant_requests WHERE status = 'pending' AND expires_at <= ? LIMIT 500", (now,)
        ).fetchall()
        return [_row_to_request(row) for row in rows]

    # --- single use ----------------------------------------------------------------------------

    def consume_warrant(self, jti: str, max_uses: int, now: float) -> bool:
        """Atomically count one use of warrant `jti`; False when it is already used up (a replay)."""
        try:
            with self._lock:
                cursor = self._state.execute(
                    "INSERT INTO warrant_uses (jti, uses, max_uses, first_used_at) VALUES (?, 1, ?, ?)"
                    " ON CONFLICT(jti) DO UPDATE SET uses = uses + 1 WHERE uses < max_uses",
                    (jti, max_uses, now),
                )
                return cursor.rowcount == 1
        except sqlite3.Error as exc:
            raise _write_error("warrant store cannot write", exc) from exc

    def warrant_uses(self, jti: str) -> int:
        row = self._state.execute("SELECT uses FROM warrant_uses WHERE jti = ?", (jti,)).fetchone()
        return int(row[0]) if row else 0


def row_to_event(row: tuple[Any, ...]) -> AuditEvent:
    seq, ts, type_, agent, revision, payload, prev_hash, hash_ = row
    return AuditEvent(
        seq=int(seq),
        ts=float(ts),
        type=str(type_),
        agent=str(agent),
        policy_revision=str(revision),
        payload=json.loads(payload),
        prev_hash=str(prev_hash),
        hash=str(hash_),
    )


def read_events(path: Path) -> Iterator[AuditEvent]:
    """Read a (possibly copied) audit database without writing to it."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for row in db.execute(
            "SELECT seq, ts, type, agent, policy_revision, payload, prev_hash, hash FROM audit ORDER BY seq"
        ):
            yield row_to_event(row)
    finally:
        db.close()


CutRecord = tuple[int, str, float, str, str]  # first_seq, prev_hash, ts, reason, sig


@contextlib.contextmanager
def audit_snapshot(path: Path) -> Iterator[tuple[list[CutRecord], Iterator[AuditEvent]]]:
    """The signed cuts and the events of a (possibly live) audit database as of one moment: one
    read transaction, so a retention cut made meanwhile is seen either whole or not at all."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("BEGIN")
        try:
            rows = db.execute(
                "SELECT first_seq, prev_hash, ts, reason, sig FROM audit_cut ORDER BY first_seq"
            ).fetchall()
        except sqlite3.OperationalError:  # a database from before retention existed
            rows = []
            db.execute("SELECT COUNT(*) FROM audit").fetchone()  # the snapshot starts here then
        cuts = [(int(r[0]), str(r[1]), float(r[2]), str(r[3]), str(r[4])) for r in rows]
        events = (
            row_to_event(row)
            for row in db.execute(
                "SELECT seq, ts, type, agent, policy_revision, payload, prev_hash, hash FROM audit ORDER BY seq"
            )
        )
        yield cuts, events
    finally:
        db.close()


def _vote_to_dict(vote: Vote) -> dict[str, object]:
    return {
        "operator": vote.operator,
        "approve": vote.approve,
        "justification": vote.justification,
        "at": vote.at,
    }


def _status_filter(status: str | None, now: float) -> tuple[str, tuple[object, ...]]:
    # "expired" is derived (pending past its deadline), so filter in SQL where that is exact.
    if status == "pending":
        return "WHERE status = 'pending' AND expires_at > ?", (now,)
    if status == "expired":
        return "WHERE status = 'expired' OR (status = 'pending' AND expires_at <= ?)", (now,)
    if status is not None:
        return "WHERE status = ?", (status,)
    return "", ()


def _row_to_request(row: tuple[Any, ...]) -> StoredRequest:
    (
        id_,
        agent,
        fingerprint,
        tier,
        intent,
        request,
        rule_id,
        status,
        created_at,
        expires_at,
        votes,
        warrant,
        warrant_id,
        warrant_expires_at,
    ) = row
    intent_data = json.loads(intent)
    state = WarrantRequest(
        id=id_,
        agent=agent,
        tier=Tier.parse(tier),
        intent=Intent(
            action=intent_data["action"], target=intent_data["target"], rule=intent_data.get("rule")
        ),
        status=RequestStatus(status),
        created_at=created_at,
        expires_at=expires_at,
        votes=tuple(
            Vote(operator=v["operator"], approve=v["approve"], justification=v["justification"], at=v["at"])
            for v in json.loads(votes)
        ),
    )
    return StoredRequest(
        state=state,
        fingerprint=fingerprint,
        request=json.loads(request),
        rule_id=rule_id,
        warrant=warrant,
        warrant_id=warrant_id,
        warrant_expires_at=warrant_expires_at,
    )


def with_state(stored: StoredRequest, state: WarrantRequest) -> StoredRequest:
    return replace(stored, state=state)
