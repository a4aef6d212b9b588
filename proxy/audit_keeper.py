"""The audit keeper: a thread beside the event loop for the slow audit work.

WAL checkpoints (and their fsyncs), signed checkpoints, retention cuts and the disk measurements
all run here, on connections of their own, so none of them holds up a request. The event loop reads
what the keeper last found (`full`, `warning`) as plain attributes.
"""

from __future__ import annotations

import collections
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

from policy.audit import checkpoint_payload, cut_payload, sign_checkpoint
from policy.retention import AuditUsage, Retention, RetentionPlan, plan_retention
from proxy.metrics import Metrics
from proxy.store import rollback

log = logging.getLogger("vienna.audit")
INTERVAL = 1.0
CUT_CHUNK = 2000  # events dropped per transaction: each cut is short, so writers wait a few ms at most
CUT_BUDGET = 0.25  # seconds of cutting per tick
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


def mark_exported(db: Path, seq: int, ts: float) -> bool:
    """Record in the state.db beside `db` that events through `seq` were exported (retention may
    then drop them). False when there is no such state.db (a copy of audit.db, say)."""
    state = db.with_name("state.db")
    if not state.exists():
        return False
    conn = sqlite3.connect(str(state), timeout=5.0)
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS audit_marks (name TEXT PRIMARY KEY, seq INTEGER NOT NULL, ts REAL NOT NULL)"
        )
        conn.execute(
            "INSERT INTO audit_marks (name, seq, ts) VALUES (?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET seq = MAX(seq, excluded.seq), ts = excluded.ts",
            (EXPORTED, seq, ts),
        )
        conn.commit()
        return True
    finally:
        conn.close()


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
        released: Callable[[], tuple[int, str]],
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
            log.exception("audit keeper tick failed")

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
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # a full disk, most likely: measured and said below all the same
            self._failed("audit WAL checkpoint failed", exc)
        usage = self.measure(conn)
        plan = plan_retention(self.retention, usage)
        deadline = time.monotonic() + CUT_BUDGET
        while plan.cut_through is not None and time.monotonic() < deadline:
            through = min(plan.cut_through, usage.first_seq + CUT_CHUNK - 1)
            try:
                self.cut(conn, through, reason=self._reason())
            except sqlite3.Error as exc:
                self._failed("audit retention cut failed", exc)
                break
            usage = self.measure(conn)
            plan = plan_retention(self.retention, usage)
        self._publish(usage, plan)
        return plan

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            self.disk_full = True
        now = time.monotonic()
        if now - self._failure_said_at >= 30:
            log.error("%s, will retry: %s", what, exc)
            self._failure_said_at = now

    def _reason(self) -> str:
        return "shipped" if self.released()[1] == "shipped" else "exported"

    def _sign_checkpoints(self, conn: sqlite3.Connection) -> None:
        if not self._checkpoints:
            return
        # A passive checkpoint syncs the WAL first: every commit before this call is then on disk.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        while self._checkpoints:
            size, head, ts = self._checkpoints.popleft()
            try:
                write_checkpoint(self._checkpoint_path, self._key, size, head, ts)
            except OSError as exc:
                log.error("audit checkpoint failed, will retry: %s", exc)
                self._checkpoints.appendleft((size, head, ts))
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
        released, _ = self.released()
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
        )

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
            # SQLite said the disk was full: keep refusing until there is room again.
            free = usage.free_bytes or 0
            if free < max(usage.min_free_bytes, 1 << 20):
                full = f"the data dir's disk is full ({free:,} bytes free)"
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
        self.full, self.warning = full, plan.warning
        self.first_seq = usage.first_seq
        self.g_full.set(1 if full is not None else 0)
        self.g_first.set(usage.first_seq)
        self.g_live.set(usage.live_bytes)


def exported_through(state_db: Path) -> int:
    """The seq `vienna audit export` last recorded as exported (0: never)."""
    try:
        conn = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return 0
    try:
        row = conn.execute("SELECT seq FROM audit_marks WHERE name = ?", (EXPORTED,)).fetchone()
        return int(row[0]) if row else 0
    except sqlite3.Error:
        return 0
    finally:
        conn.close()
