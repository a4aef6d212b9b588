"""The audit recorder: durable SQLite append, one JSON line on stdout, metrics, signed checkpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from policy.audit import AuditEvent, redact
from proxy.audit_keeper import write_checkpoint
from proxy.metrics import Metrics
from proxy.store import AuditFull, Store, StoreUnavailable

if TYPE_CHECKING:
    from proxy.audit_keeper import AuditKeeper

log = logging.getLogger("vienna.audit")
# Events that need not be durable before the caller goes on (executions) are committed together
# with the next durable event or after this delay, whichever comes first.
FLUSH_DELAY = 0.02

CHECKPOINT_FILE = "checkpoints.jsonl"
# Events queued but not committed (a store that keeps failing): beyond this, requests are refused
# before anything more is queued.
MAX_PENDING = 50_000
# Group commit under load: a durable decision waits up to GATHER_DELAY for others to share its
# commit when the previous commit was less than BUSY_WITHIN ago; otherwise it commits at once.
GATHER_DELAY = 0.001
BUSY_WITHIN = 0.005
# After a failed write, requests are refused at once (503 audit.unavailable) for this long.
BREAKER_SECONDS = 1.0


class Recorder:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        audit_key: bytes,
        checkpoint_path: Path,
        checkpoint_every: int = 1000,
        stdout: TextIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._audit_key = audit_key
        self._checkpoint_path = checkpoint_path
        self._checkpoint_every = checkpoint_every
        self._stdout = stdout
        self._clock = clock
        self._since_checkpoint = 0
        self._checkpoint_due = checkpoint_every
        self._flush_handle: asyncio.TimerHandle | None = None
        self._commit: asyncio.Future[None] | None = None
        self._last_commit = 0.0
        self._retry_delay = FLUSH_DELAY
        self._failure_logged = 0.0
        self._failed_at: float | None = None  # when the store last failed to write (None: it works)
        self.keeper: AuditKeeper | None = None  # set when a keeper thread does the slow disk work
        # Whether other requests are on their way (set by the runtime): only then is it worth
        # holding a commit for a millisecond so that their decisions share it.
        self.others_in_flight: Callable[[], bool] = lambda: False
        self._unpublished: list[str] = []  # stdout lines of events not committed yet, in chain order

    def record(
        self,
        type: str,
        *,
        agent: str,
        policy_revision: str,
        payload: Mapping[str, object],
        durable: bool = True,
    ) -> AuditEvent:
        """Commit one event (raises StoreUnavailable when it cannot be) and publish it."""
        cleaned = redact(dict(payload))
        assert isinstance(cleaned, dict)  # redact keeps a mapping a mapping
        try:
            event = self.store.append(
                type=type,
                agent=agent,
                policy_revision=policy_revision,
                payload=cleaned,
                ts=self._clock(),
                durable=durable,
            )
        except StoreUnavailable as exc:
            self._store_failed(exc)
            raise
        if durable:
            self._failed_at = None
        else:
            self._schedule_flush()
        self.metrics.audit_events.labels(type=type).inc()
        if self._stdout is not None:
            self._unpublished.append(stdout_line(event))
            if self.store.pending == 0:
                self._publish()
        self._since_checkpoint += 1
        if self._since_checkpoint >= self._checkpoint_due:
            try:
                self.checkpoint()
            except (OSError, StoreUnavailable) as exc:
                if isinstance(exc, AuditFull):
                    self._note_full(exc)
                # The event itself is recorded: failing here would make the caller refuse (or
                # report an error for) a request already decided or executed. Still owed: the
                # timer, or the next event, tries again.
                log.error("audit checkpoint failed, will retry: %s", exc)
                # still owed (dirty): the timer retries, and so do the next N events, not every one
                self._checkpoint_due = self._since_checkpoint + self._checkpoint_every
        return event

    @property
    def blocked(self) -> tuple[str, str] | None:
        """(reason code, reason) when nothing more may be recorded, so every request is refused
        before anything is decided: the audit is full, or the store has failed for a long while."""
        keeper = self.keeper
        if keeper is not None and keeper.full is not None:
            return "audit.full", keeper.full
        if self.store.pending >= MAX_PENDING:
            return (
                "audit.unavailable",
                f"{self.store.pending} audit events wait for a store that cannot write",
            )
        failed = self._failed_at
        if failed is not None and time.monotonic() - failed < BREAKER_SECONDS:
            # The last write failed just now: refuse at once rather than make every request wait
            # out SQLite's busy timeout on the event loop. The write-behind retries meanwhile.
            return "audit.unavailable", "the audit store could not write a moment ago"
        return None

    def _store_failed(self, exc: StoreUnavailable) -> None:
        self._failed_at = time.monotonic()
        if isinstance(exc, AuditFull):
            self._note_full(exc)

    def _note_full(self, exc: AuditFull) -> None:
        keeper = self.keeper
        if keeper is not None:
            keeper.disk_full = True
            keeper.full = keeper.full or str(exc)
            keeper.wake()

    async def committed(self) -> None:
        """Wait until every event recorded so far is committed; raises StoreUnavailable when it cannot
        be. Callers waiting in the same turn of the event loop share one commit (group commit): a
        decision is still durable before its request is forwarded, at a fraction of the writes."""
        if self.store.pending == 0:
            return
        waiter = self._commit
        if waiter is None:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            # retrieved here, so a waiter that was cancelled meanwhile leaves no "never retrieved" warning
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._commit = waiter
            if loop.time() - self._last_commit < BUSY_WITHIN and self.others_in_flight():
                # Busy (the last commit was just now): gather the decisions of the next moment into
                # this commit; it costs each request about as long as one commit, and saves commits.
                loop.call_later(GATHER_DELAY, self._commit_now)
            else:
                loop.call_soon(self._commit_now)
        await asyncio.shield(waiter)

    def _commit_now(self) -> None:
        waiter, self._commit = self._commit, None
        if waiter is None:
            return
        wrote = self.store.pending > 0
        try:
            self.store.flush()
        except StoreUnavailable as exc:
            self._store_failed(exc)
            waiter.set_exception(exc)
            self._schedule_flush()  # what is queued is retried; the waiters refuse their requests
            return
        self._last_commit = asyncio.get_running_loop().time()
        if wrote:  # only a write that happened proves the store works again
            self._failed_at = None
        waiter.set_result(None)
        self._publish()

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.store.flush()
            return
        self._flush_handle = loop.call_later(self._retry_delay, self._flush_later)

    def _flush_later(self) -> None:
        self._flush_handle = None
        wrote = self.store.pending > 0
        try:
            self.store.flush()
        except StoreUnavailable as exc:
            self._store_failed(exc)
            now = time.monotonic()
            if now - self._failure_logged >= 5:  # a store that keeps failing is said every few seconds
                log.error("audit write-behind failed, retrying: %s", exc)
                self._failure_logged = now
            self._retry_delay = min(self._retry_delay * 2, 1.0)
            self._schedule_flush()
            return
        self._retry_delay = FLUSH_DELAY
        if wrote:
            self._failed_at = None
        self._publish()

    def _publish(self) -> None:
        """Write the stdout lines of committed events. Never earlier: a line for an event that a
        crash then takes back would, after a restart, share its seq with a different event."""
        if self._stdout is None or not self._unpublished:
            return
        lines, self._unpublished = self._unpublished, []
        try:
            self._stdout.write("".join(line + "\n" for line in lines))
            self._stdout.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not stop enforcement; the database holds the record

    def checkpoint(self) -> dict[str, object] | None:
        """Sign (size, head hash) so that cutting off the newest events becomes detectable. With a
        keeper, the sync and the signature happen on its thread (None is returned); without one, here."""
        keeper = self.keeper
        if keeper is not None:
            self.store.flush()  # committed here; the keeper syncs it to disk before signing
            self._publish()
            size, head = self.store.head
            self._since_checkpoint = 0
            self._checkpoint_due = self._checkpoint_every
            if size:
                keeper.request_checkpoint(size, head, self._clock())
            return None
        self.store.sync()  # what is signed is on disk first
        self._publish()
        size, head = self.store.head
        if size == 0:
            return None
        entry = write_checkpoint(self._checkpoint_path, self._audit_key, size, head, self._clock())
        self._since_checkpoint = 0
        self._checkpoint_due = self._checkpoint_every
        return entry

    @property
    def dirty(self) -> bool:
        return self._since_checkpoint > 0


def stdout_line(event: AuditEvent) -> str:
    """The event as one JSON line (keys sorted), splicing in the payload text already serialised
    for the hash instead of serialising it again."""
    text = json.dumps
    return (
        f'{{"agent":{text(event.agent)},"hash":"{event.hash}","log":"vienna.audit",'
        f'"payload":{event.payload_json or text(event.payload, sort_keys=True, separators=(",", ":"))},'
        f'"policy_revision":{text(event.policy_revision)},"prev_hash":"{event.prev_hash}",'
        f'"seq":{event.seq},"ts":{text(event.ts)},"type":{text(event.type)}}}'
    )


def stdout_stream(enabled: bool) -> TextIO | None:
    return sys.stdout if enabled else None
