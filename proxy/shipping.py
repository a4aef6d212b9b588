"""Ship the local audit chain to the authority, in order, off the request path.

The local chain stays the durable record (§8). The authority's head for this chain says where to
resume — after a restart of either side or an outage — so nothing is sent twice on purpose and
nothing is skipped; a batch sent twice (an answer lost on the way) is recognised by seq and hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from dataclasses import replace
from pathlib import Path

from prometheus_client import Counter, Gauge

from policy.audit import AuditEvent
from proxy.audit_keeper import Release
from proxy.authority_client import AuthorityClient, AuthorityRefused, AuthorityUnavailable
from proxy.metrics import Metrics
from proxy.store import Store, row_to_event

log = logging.getLogger("vienna.shipping")
BATCH = 1000
BATCH_BYTES = 1 << 20  # the authority takes at most 4 MiB per batch; stay well under it
IDLE_POLL = 0.25
BACKOFF_START, BACKOFF_MAX = 0.5, 15.0


class AuditShipper:
    def __init__(
        self, store: Store, client: AuthorityClient, *, chain: str, metrics: Metrics, batch: int = BATCH
    ) -> None:
        self.store = store
        self.client = client
        self.chain = chain
        self.batch = batch
        self.shipped_seq: int | None = None  # the authority's head, once known
        # The authority's last confirmed head (seq and hash): retention may drop up to it, once the
        # keeper has checked that the hash is this chain's. It follows the authority down as well.
        self.confirmed: Release | None = None
        r = metrics.registry
        self.shipped = Counter(
            "vienna_audit_shipped_total", "Audit events the authority accepted", registry=r
        )
        self.failures = Counter(
            "vienna_audit_ship_failures_total",
            "Shipping attempts that failed, by reason",
            ("reason",),
            registry=r,
        )
        self.lag = Gauge(
            "vienna_audit_ship_lag_events", "Local audit events not yet held by the authority", registry=r
        )
        self._reader: sqlite3.Connection | None = None
        self.wake = asyncio.Event()

    def _read(self, after: int) -> list[AuditEvent]:
        # A connection of its own, in a worker thread: reading never holds up the event loop's writes.
        if self._reader is None:
            self._reader = sqlite3.connect(
                f"file:{Path(self.store.path)}?mode=ro", uri=True, check_same_thread=False
            )
        rows = self._reader.execute(
            "SELECT seq, ts, type, agent, policy_revision, payload, prev_hash, hash FROM audit"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, self.batch),
        ).fetchall()
        # (the stored payload text is the canonical one: kept, it sizes the batch without re-serialising)
        return [replace(row_to_event(row), payload_json=str(row[5])) for row in rows]

    async def run(self) -> None:
        backoff = BACKOFF_START
        while True:
            try:
                sent = await self.ship_once()
                backoff = BACKOFF_START
                if not sent:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), IDLE_POLL)
            except asyncio.CancelledError:
                raise
            except (AuthorityUnavailable, AuthorityRefused) as exc:
                self.failures.labels(
                    reason="unavailable" if isinstance(exc, AuthorityUnavailable) else "refused"
                ).inc()
                self.shipped_seq = None  # ask the authority where it stands before the next batch
                log.warning("audit shipping paused, retrying in %.1f s: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception:  # anything else must not end shipping for good
                self.failures.labels(reason="error").inc()
                self.shipped_seq = None
                log.exception("audit shipping failed, retrying in %.1f s", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def ship_once(self) -> int:
        """Send the next batch after the authority's head; the number of events it now holds newly."""
        if self.shipped_seq is None:
            seq, hash_ = await self.client.audit_head_entry(self.chain)
            self.shipped_seq = seq
            self.confirmed = Release(seq, hash_, "shipped")
        events = await asyncio.to_thread(self._read, self.shipped_seq)
        head = self.store.head[0]
        self.lag.set(max(0, head - self.shipped_seq))
        if not events:
            return 0
        events = _first_bytes(events, BATCH_BYTES)
        status, body = await self.client.ship(self.chain, events)
        if status == 200:
            before = self.shipped_seq
            self.shipped_seq = int(body["head_seq"])
            head_hash = body.get("head_hash")
            self.confirmed = Release(
                self.shipped_seq, head_hash if isinstance(head_hash, str) else None, "shipped"
            )
            accepted = int(body.get("accepted", 0))
            self.shipped.inc(accepted)
            self.lag.set(max(0, head - self.shipped_seq))
            return max(accepted, self.shipped_seq - before)
        if status == 409:
            # A gap or a bad link: the authority recorded it; resume from what it holds.
            log.error(
                "the authority refused audit events of chain %s: %s (%s)",
                self.chain,
                body.get("reason"),
                body.get("reason_code"),
            )
            self.failures.labels(reason=str(body.get("reason_code", "audit.rejected"))).inc()
            head_seq = body.get("head_seq")
            self.shipped_seq = int(head_seq) if isinstance(head_seq, int) else None
            head_hash = body.get("head_hash")
            # follow the authority down: what it no longer holds must not be dropped here
            self.confirmed = (
                Release(head_seq, head_hash if isinstance(head_hash, str) else None, "shipped")
                if isinstance(head_seq, int)
                else None
            )
            await asyncio.sleep(BACKOFF_MAX)
            return 0
        raise AuthorityRefused(status, body)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _first_bytes(events: list[AuditEvent], budget: int) -> list[AuditEvent]:
    """The longest prefix of `events` whose JSON stays within `budget` bytes (at least one event)."""
    total = 0
    for index, event in enumerate(events):
        total += len(event.payload_json or "") + 400  # the payload plus the event's other fields
        if total > budget and index > 0:
            return events[:index]
    return events
