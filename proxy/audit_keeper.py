"""The audit keeper: a thread beside the event loop for the slow audit work.

WAL checkpoints (and their fsyncs), signed checkpoints, retention cuts and the disk measurements
all run here, on connections of their own, so none of them holds up a request. The event loop reads
what the keeper last found (`full`, `warning`) as plain attributes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from policy.audit import (
    GENESIS_HASH,
    checkpoint_payload,
    cut_payload,
    sign_checkpoint,
    verify_chain,
    verify_checkpoint,
)
from policy.retention import AuditUsage, Retention, RetentionPlan, plan_retention
from proxy.metrics import Metrics
from proxy.store import rollback, row_to_event

log = logging.getLogger("vienna.audit")
INTERVAL = 1.0
CUT_CHUNK = 500  # events dropped per transaction: each cut is short, so writers wait a few ms at most
CUT_PAUSE = 0.005  # between two cuts, so that the event loop's commits get the write lock in between
CUT_BUDGET = 0.5  # seconds of cutting per tick
SAY_EVERY = 30.0  # a problem that persists is logged again this often
AUTO_MIN_FREE = 64 * 1024 * 1024
AUTO_MIN_FREE_SHARE = 0.05
KEEP_CUTS = 100
EXPORTED = "exported"


def write_checkpoint(path: Path, key: bytes, size: int, head: str, ts: float) -> dict[str, object]:
    """Append one signed checkpoint line (fsynced) and echo it to stderr. The caller has made sure
    that the events it covers are on disk."""
    entry: dict[str, object] = {
        "size": size,
        "head_hash": head,
        "ts": ts,
        "sig": sign_checkpoint(checkpoint_payload(size, head, ts), key),
    }
    line = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    # stdout carries audit events only; the checkpoint goes to the log stream (stderr) as one JSON line.
    try:
        sys.stderr.write(json.dumps({"log": "vienna.checkpoint", **entry}, sort_keys=True) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return entry


@dataclass(frozen=True, slots=True)
class Release:
    """Events through `seq` left the pod: `kind` "exported" (by `vienna audit export`) or "shipped"
    (confirmed by the authority). `hash` is event `seq`'s hash as the exporter or the authority saw
    it: a release counts only while it names an event of this very chain."""

    seq: int
    hash: str | None
    kind: str


NOTHING_SHIPPED = Release(0, None, "shipped")


def mark_exported(db: Path, seq: int, hash_: str, ts: float) -> bool:
    """Record in the state.db beside `db` that events through `seq` (whose hash is `hash_`) were
    exported, so retention may drop them. False when there is no such state.db (a copy of audit.db)."""
    state = db.with_name("state.db")
    if not state.exists():
        return False
    conn = sqlite3.connect(str(state), timeout=5.0)
    try:
        conn.execute(MARKS_DDL)
        conn.execute(
            "INSERT OR REPLACE INTO audit_marks (name, seq, hash, ts) VALUES (?, ?, ?, ?)",
            (EXPORTED, seq, hash_, ts),
        )
        conn.commit()
        return True
    finally:
        conn.close()


MARKS_DDL = (
    "CREATE TABLE IF NOT EXISTS audit_marks (name TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL,"
    " ts REAL NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class Cut:
    first_seq: int
    prev_hash: str
    ts: float
    reason: str
    sig: str


class AuditKeeper:
    def __init__(
        self,
        db_path: Path,
        *,
        audit_key: bytes,
        checkpoint_path: Path,
        retention: Retention,
        min_free_bytes: int | None,
        released: Callable[[], Release],
        metrics: Metrics,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db_path = db_path
        self._key = audit_key
        self._checkpoint_path = checkpoint_path
        self.retention = retention
        self._min_free = min_free_bytes  # None: automatic (5 % of the file system, at most 64 MiB)
        self.released = released
        self._interval = interval
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._checkpoints: collections.deque[tuple[int, str, float]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self.full: str | None = None  # read by the event loop: why every request is refused now
        self.warning: str | None = None
        self.disk_full = False  # set by the loop when SQLite said the disk is full; cleared here
        self.first_seq = 1
        self._said_at = 0.0
        self._failure_said_at = 0.0
        self.problem: str | None = None  # why nothing may be dropped although the limits say so
        self._release_problem: str | None = None
        self._problem_said_at = 0.0
        r = metrics.registry
        self.g_bytes = Gauge("vienna_audit_bytes", "Bytes of audit.db and its WAL on disk", registry=r)
        self.g_live = Gauge(
            "vienna_audit_live_bytes",
            "Bytes the audit's events occupy (what --audit-retain limits)",
            registry=r,
        )
        self.g_limit = Gauge(
            "vienna_audit_limit_bytes", "The --audit-retain size limit (0: none)", registry=r
        )
        self.g_free = Gauge(
            "vienna_data_dir_free_bytes", "Free bytes on the data dir's file system", registry=r
        )
        self.g_min_free = Gauge(
            "vienna_data_dir_min_free_bytes",
            "Below this much free space every request is refused",
            registry=r,
        )
        self.g_full = Gauge(
            "vienna_audit_full",
            "1 while the audit cannot take more events (requests refused: audit.full)",
            registry=r,
        )
        self.g_first = Gauge("vienna_audit_first_seq", "The oldest audit event kept", registry=r)
        self.g_released = Gauge(
            "vienna_audit_released_seq",
            "The last audit event exported or shipped (retention may drop up to it)",
            registry=r,
        )
        self.c_dropped = Counter(
            "vienna_audit_dropped_events_total",
            "Audit events dropped by retention after export or shipping",
            registry=r,
        )
        self.g_limit.set(retention.max_bytes or 0)

    # --- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        self._tick_safely()  # the first measurement before the proxy takes traffic
        self._thread = threading.Thread(target=self._run, name="vienna-audit-keeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still busy (a slow disk): its connection is left to the process's end
        if self._db is not None:
            self._db.close()

    def request_checkpoint(self, size: int, head: str, ts: float) -> None:
        """Sign (size, head) once it is on disk; the caller has committed it."""
        self._checkpoints.append((size, head, ts))
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self._tick_safely()
        self._tick_safely()  # checkpoints asked for while stopping are still signed

    def _tick_safely(self) -> None:
        try:
            self.tick()
        except Exception:  # the keeper must outlive any one failure; the next tick tries again
            now = time.monotonic()
            if now - self._failure_said_at >= SAY_EVERY:
                log.exception("audit keeper tick failed; retrying every %.0f s", self._interval)
                self._failure_said_at = now

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(
                str(self.db_path), isolation_level=None, check_same_thread=False, timeout=5.0
            )
            self._db.execute("PRAGMA synchronous=NORMAL")
        return self._db

    def tick(self) -> RetentionPlan:
        conn = self._conn()
        try:
            self._sign_checkpoints(conn)
            # When the disk filled, give the WAL file's space back as well (nothing is written meanwhile).
            mode = "TRUNCATE" if self.disk_full else "PASSIVE"
            conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.Error as exc:  # a full disk, most likely: measured and said below all the same
            self._failed("audit WAL checkpoint failed", exc)
        usage = self.measure(conn)
        plan = plan_retention(self.retention, usage)
        deadline = time.monotonic() + CUT_BUDGET
        problem: str | None = None
        while plan.cut_through is not None and time.monotonic() < deadline:
            through = min(plan.cut_through, usage.first_seq + CUT_CHUNK - 1)
            problem = self.chain_problem(conn, usage.first_seq, through)
            if problem is not None:
                break  # only a prefix that verifies from its anchor is ever dropped
            try:
                self.cut(conn, through, reason=self.released().kind)
            except sqlite3.Error as exc:
                self._failed("audit retention cut failed", exc)
                break
            time.sleep(CUT_PAUSE)
            usage = self.measure(conn)
            plan = plan_retention(self.retention, usage)
        self._note_problem(problem or self._release_problem)
        if problem is not None and plan.full is None and _needs_room(self.retention, usage):
            # The limits say drop, the chain says no: refuse rather than grow past the limit.
            plan = dataclasses.replace(plan, full=problem)
        self._publish(usage, plan)
        return plan

    def chain_problem(self, conn: sqlite3.Connection, first: int, through: int) -> str | None:
        """Why events first..through must not be dropped (None: they may). They must follow on from
        the last signed cut (or the genesis), verify link by link, and the event after them must
        link to the last of them: what is dropped is exactly a verified prefix of the chain."""
        anchor = conn.execute(
            "SELECT first_seq, prev_hash, ts, reason, sig FROM audit_cut ORDER BY first_seq DESC LIMIT 1"
        ).fetchone()
        start_seq, start_hash = (int(anchor[0]), str(anchor[1])) if anchor else (1, GENESIS_HASH)
        if anchor is not None and not verify_checkpoint(
            cut_payload(start_seq, start_hash, float(anchor[2]), str(anchor[3])), str(anchor[4]), self._key
        ):
            return (
                f"the newest retention cut (seq {start_seq}) is not signed with this audit key: the log was"
                " altered; nothing is dropped (run vienna audit verify)"
            )
        if first != start_seq:
            return (
                f"the audit's oldest event is seq {first} but the chain starts at seq {start_seq}:"
                " events are missing that no signed cut accounts for; nothing is dropped (run vienna audit verify)"
            )
        rows = conn.execute(
            "SELECT seq, ts, type, agent, policy_revision, payload, prev_hash, hash FROM audit"
            " WHERE seq >= ? AND seq <= ? ORDER BY seq",
            (first, through + 1),
        ).fetchall()
        try:
            report = verify_chain(
                (row_to_event(row) for row in rows), start_prev_hash=start_hash, start_seq=first
            )
        except ValueError as exc:
            return f"the audit chain cannot be read near seq {first}: {exc}; nothing is dropped"
        if not report.ok or report.count != through + 2 - first:
            bad = report.first_bad_seq or first + report.count
            return (
                f"the audit chain does not verify at seq {bad} ({report.problem or 'missing'});"
                " nothing is dropped (run vienna audit verify)"
            )
        return None

    def _note_problem(self, problem: str | None) -> None:
        now = time.monotonic()
        if problem is not None and (problem != self.problem or now - self._problem_said_at >= SAY_EVERY):
            log.error("audit retention: %s", problem)
            self._problem_said_at = now
        self.problem = problem

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            self.disk_full = True
        now = time.monotonic()
        if now - self._failure_said_at >= SAY_EVERY:
            log.error("%s, will retry: %s", what, exc)
            self._failure_said_at = now

    def _sign_checkpoints(self, conn: sqlite3.Connection) -> None:
        if not self._checkpoints:
            return
        # What is signed must be on disk: a passive checkpoint syncs the WAL only when it copies
        # frames (a reader's snapshot can stop it), so the WAL is synced here as well.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        wal = self.db_path.with_name(self.db_path.name + "-wal")
        try:
            fd = os.open(wal, os.O_RDONLY)
        except FileNotFoundError:
            fd = -1  # no WAL: everything is in audit.db, which the checkpoint synced
        if fd >= 0:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        while self._checkpoints:
            size, head, ts = self._checkpoints.popleft()
            try:
                write_checkpoint(self._checkpoint_path, self._key, size, head, ts)
            except OSError as exc:
                self._checkpoints.appendleft((size, head, ts))
                now = time.monotonic()
                if now - self._failure_said_at >= SAY_EVERY:
                    log.error("audit checkpoint failed, will retry: %s", exc)
                    self._failure_said_at = now
                return

    def measure(self, conn: sqlite3.Connection) -> AuditUsage:
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        wal = self.db_path.with_name(self.db_path.name + "-wal")
        try:
            wal_bytes = wal.stat().st_size
        except FileNotFoundError:
            wal_bytes = 0
        try:
            db_bytes = self.db_path.stat().st_size
        except FileNotFoundError:
            db_bytes = 0
        first, head = conn.execute("SELECT MIN(seq), MAX(seq) FROM audit").fetchone()
        if head is None:  # nothing kept: the chain goes on after the last cut
            row = conn.execute("SELECT MAX(first_seq) FROM audit_cut").fetchone()
            head = (int(row[0]) - 1) if row and row[0] is not None else 0
            first = head + 1
        released = self._check_release(conn, self.released(), int(first))
        aged = 0
        if self.retention.max_age is not None:
            aged = self._aged_through(conn, int(first), int(head), self._clock() - self.retention.max_age)
        stats = os.statvfs(self.db_path.parent)
        free = stats.f_bavail * stats.f_frsize
        min_free = self._min_free
        if min_free is None:
            min_free = min(AUTO_MIN_FREE, int(stats.f_blocks * stats.f_frsize * AUTO_MIN_FREE_SHARE))
        self.g_bytes.set(db_bytes + wal_bytes)
        self.g_free.set(free)
        self.g_min_free.set(min_free)
        self.g_released.set(released)
        return AuditUsage(
            first_seq=int(first),
            head_seq=int(head),
            live_bytes=(pages - free_pages) * page_size,
            released_through=released,
            aged_through=aged,
            free_bytes=free,
            min_free_bytes=min_free,
            reusable_bytes=free_pages * page_size,
        )

    def _check_release(self, conn: sqlite3.Connection, release: Release, first: int) -> int:
        """The last seq that may be dropped: the release, if it names an event of this chain."""
        self._release_problem = None
        if release.seq < first:
            return release.seq  # nothing newly released (or it was dropped already)
        row = conn.execute("SELECT hash FROM audit WHERE seq = ?", (release.seq,)).fetchone()
        if row is not None and row[0] == release.hash:
            return release.seq
        what = "the authority" if release.kind == "shipped" else "the export mark in state.db"
        self._release_problem = (
            f"{what} says events through seq {release.seq} left the pod, but that is not an event of this"
            f" audit chain ({'no such event' if row is None else 'its hash differs'}); nothing is dropped"
        )
        return first - 1

    @staticmethod
    def _aged_through(conn: sqlite3.Connection, first: int, head: int, cutoff: float) -> int:
        """The last seq whose event is older than `cutoff` (0: none), by bisection over seq: events are
        appended in time order, so no index on ts is needed."""
        low, high, found = first, head, 0
        while low <= high:
            middle = (low + high) // 2
            row = conn.execute(
                "SELECT ts FROM audit WHERE seq >= ? ORDER BY seq LIMIT 1", (middle,)
            ).fetchone()
            if row is None or float(row[0]) >= cutoff:
                high = middle - 1
            else:
                found, low = middle, middle + 1
        return found

    def cut(self, conn: sqlite3.Connection, through: int, *, reason: str) -> None:
        """Drop every event with seq <= `through`, and sign where the rest begins, in one transaction:
        killed at any point, either both happened or neither."""
        row = conn.execute("SELECT hash FROM audit WHERE seq = ?", (through,)).fetchone()
        if row is None:
            return
        ts = self._clock()
        sig = sign_checkpoint(cut_payload(through + 1, str(row[0]), ts, reason), self._key)
        conn.execute("BEGIN IMMEDIATE")
        try:
            dropped = conn.execute("DELETE FROM audit WHERE seq <= ?", (through,)).rowcount
            conn.execute(
                "INSERT OR REPLACE INTO audit_cut (first_seq, prev_hash, ts, reason, sig) VALUES (?, ?, ?, ?, ?)",
                (through + 1, str(row[0]), ts, reason, sig),
            )
            conn.execute(
                "DELETE FROM audit_cut WHERE first_seq NOT IN"
                " (SELECT first_seq FROM audit_cut ORDER BY first_seq DESC LIMIT ?)",
                (KEEP_CUTS,),
            )
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        self.c_dropped.inc(dropped)
        log.info("audit retention: dropped %d events through seq %d (%s)", dropped, through, reason)

    def _publish(self, usage: AuditUsage, plan: RetentionPlan) -> None:
        full = plan.full
        if full is None and self.disk_full:
            # SQLite said the disk was full: keep refusing until there is room again (pages that
            # cuts freed inside audit.db count: new events fill them first).
            room = (usage.free_bytes or 0) + usage.reusable_bytes
            if room < max(usage.min_free_bytes, 1 << 20):
                full = f"the data dir's disk is full ({room:,} bytes of room)"
            else:
                self.disk_full = False
        now = time.monotonic()
        if full is not None and (self.full is None or now - self._said_at >= 60):
            log.error("audit full, refusing every request (503 audit.full): %s", full)
            self._said_at = now
        elif full is None and self.full is not None:
            log.warning("the audit has room again; requests are served")
        elif plan.warning is not None and (self.warning is None or now - self._said_at >= 60):
            log.warning("audit: %s", plan.warning)
            self._said_at = now
        self.full, self.warning = full, self.problem or plan.warning
        self.first_seq = usage.first_seq
        self.g_full.set(1 if full is not None else 0)
        self.g_first.set(usage.first_seq)
        self.g_live.set(usage.live_bytes)


def _needs_room(retention: Retention, usage: AuditUsage) -> bool:
    over = retention.max_bytes is not None and usage.live_bytes >= retention.max_bytes
    room = None if usage.free_bytes is None else usage.free_bytes + usage.reusable_bytes
    return over or (room is not None and room < usage.min_free_bytes)


def exported_release(state_db: Path) -> Release:
    """What `vienna audit export` last recorded as exported (seq 0: never)."""
    nothing = Release(0, None, EXPORTED)
    try:
        conn = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return nothing
    try:
        row = conn.execute("SELECT seq, hash FROM audit_marks WHERE name = ?", (EXPORTED,)).fetchone()
        return Release(int(row[0]), str(row[1]), EXPORTED) if row else nothing
    except sqlite3.Error:
        return nothing
    finally:
        conn.close()
