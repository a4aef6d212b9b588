"""The audit recorder: durable SQLite append, one JSON line on stdout, metrics, signed checkpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TextIO

from policy.audit import AuditEvent, checkpoint_payload, redact, sign_checkpoint
from proxy.metrics import Metrics
from proxy.store import Store, StoreUnavailable

log = logging.getLogger("vienna.audit")
# Events that need not be durable before the caller goes on (executions) are committed together
# with the next durable event or after this delay, whichever comes first.
FLUSH_DELAY = 0.02

CHECKPOINT_FILE = "checkpoints.jsonl"


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
        event = self.store.append(
            type=type,
            agent=agent,
            policy_revision=policy_revision,
            payload=cleaned,
            ts=self._clock(),
            durable=durable,
        )
        if not durable:
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
                # The event itself is recorded: failing here would make the caller refuse (or
                # report an error for) a request already decided or executed. Still owed: the
                # timer, or the next event, tries again.
                log.error("audit checkpoint failed, will retry: %s", exc)
                # still owed (dirty): the timer retries, and so do the next N events, not every one
                self._checkpoint_due = self._since_checkpoint + self._checkpoint_every
        return event

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.store.flush()
            return
        self._flush_handle = loop.call_later(FLUSH_DELAY, self._flush_later)

    def _flush_later(self) -> None:
        self._flush_handle = None
        try:
            self.store.flush()
        except StoreUnavailable as exc:
            log.error("audit write-behind failed, retrying: %s", exc)
            self._schedule_flush()
            return
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
        """Sign (size, head hash) so that cutting off the newest events becomes detectable."""
        self.store.sync()  # what is signed is on disk first
        self._publish()
        size, head = self.store.head
        if size == 0:
            return None
        ts = self._clock()
        payload = checkpoint_payload(size, head, ts)
        entry: dict[str, object] = {
            "size": size,
            "head_hash": head,
            "ts": ts,
            "sig": sign_checkpoint(payload, self._audit_key),
        }
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        fd = os.open(self._checkpoint_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._since_checkpoint = 0
        self._checkpoint_due = self._checkpoint_every
        # stdout carries audit events only; the checkpoint goes to the log stream (stderr) as one JSON line.
        try:
            sys.stderr.write(json.dumps({"log": "vienna.checkpoint", **entry}, sort_keys=True) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
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
