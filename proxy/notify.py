"""Webhook notifications of warrant-request events (DESIGN.md §12): signed, from a durable outbox,
delivered in order per receiver with exponential backoff and jitter, never on the request path.

The outbox lives next to the requests (the sidecar's state.db, the authority's store), written in
the same transaction as the change it announces, so a restart loses no notification. Delivery is
at least once: a receiver dedupes by the event `id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import Counter

from proxy.authority.db import Database, StoreError

log = logging.getLogger("vienna.notify")

EVENT_TYPES = (
    "warrant_request.created",
    "warrant_request.approved",
    "warrant_request.denied",
    "warrant_request.expired",
)
SIGNATURE_HEADER = "Vienna-Signature"
RETRY_FOR_SECONDS = 3600.0  # keep trying for an hour (the contract asks for at least 10 minutes)
BACKOFF_START, BACKOFF_MAX = 1.0, 60.0
ATTEMPT_TIMEOUT = 10.0
LEASE_SECONDS = 30.0
SIGNATURE_TOLERANCE = 300

OUTBOX_DDL = (
    """CREATE TABLE IF NOT EXISTS notifications (
        id TEXT PRIMARY KEY,
        event_id TEXT NOT NULL,
        target TEXT NOT NULL,
        type TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL,
        next_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL,
        last_error TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS notifications_pending ON notifications (state, target, id)",
    """CREATE TABLE IF NOT EXISTS notify_leases (
        target TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        until DOUBLE PRECISION NOT NULL
    )""",
)
INSERT_SQL = (
    "INSERT INTO notifications (id, event_id, target, type, body, created_at, attempts, next_at, state)"
    " VALUES (%s, %s, %s, %s, %s, %s, 0, %s, 'pending')"
)


def sign(secret: bytes, body: bytes, t: int) -> str:
    digest = hmac.new(secret, str(t).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify_signature(
    secret: bytes, header: str, body: bytes, *, now: float, tolerance: float = SIGNATURE_TOLERANCE
) -> bool:
    """What a receiver checks: a v1 HMAC over "<t>.<body>" with `t` within `tolerance` seconds."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - t) > tolerance:
        return False
    expected = sign(secret, body, t).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, given) for given in parts.get("v1", []))


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    webhooks: tuple[str, ...]
    secret: bytes
    format: str  # "json" | "slack"
    console_url: str

    def rows(self, event_type: str, view: Mapping[str, Any], now: float) -> list[tuple[Any, ...]]:
        """Outbox rows (one per receiver) for one event, ready for INSERT_SQL."""
        if not self.webhooks:
            return []
        assert event_type in EVENT_TYPES
        event_id = "evt_" + secrets.token_urlsafe(12)
        body = self.body(event_type, event_id, view, now)
        stamp = time.time_ns()
        return [
            (f"nt_{stamp:020d}_{n:03d}_{secrets.token_hex(4)}", event_id, target, event_type, body, now, now)
            for n, target in enumerate(self.webhooks)
        ]

    def body(self, event_type: str, event_id: str, view: Mapping[str, Any], now: float) -> str:
        request_view = {key: value for key, value in view.items() if key != "warrant"}  # never a bearer token
        console = f"{self.console_url}#{view.get('id', '')}"
        if self.format == "slack":
            return json.dumps(slack_payload(event_type, request_view, console), separators=(",", ":"))
        return json.dumps(
            {
                "type": event_type,
                "id": event_id,
                "created_at": now,
                "warrant_request": request_view,
                "console_url": console,
            },
            separators=(",", ":"),
            sort_keys=True,
        )


def _mrkdwn(text: object) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_HEADLINES = {
    "warrant_request.created": "is waiting for approval",
    "warrant_request.approved": "was approved",
    "warrant_request.denied": "was denied",
    "warrant_request.expired": "expired unanswered",
}


def slack_payload(event_type: str, view: Mapping[str, Any], console: str) -> dict[str, Any]:
    """A Slack incoming-webhook message: who, what, tier, the exact request, a link to the console."""
    intent = view.get("intent") or {}
    request = view.get("request") or {}
    what = f"{intent.get('action', '?')} {intent.get('target', '')}".strip()
    exact = f"{request.get('method', '')} {request.get('url', '')}".strip() or json.dumps(request)[:500]
    who = f"agent {view.get('agent', '?')}" + (f" (sidecar {view['sidecar']})" if view.get("sidecar") else "")
    tier = view.get("tier", "?")
    headline = f"{tier} warrant request {view.get('id', '?')} from {who} {_HEADLINES[event_type]}"
    fields = [
        {"type": "mrkdwn", "text": f"*Agent*\n{_mrkdwn(who)}"},
        {
            "type": "mrkdwn",
            "text": f"*Tier*\n{_mrkdwn(tier)} ({view.get('approvals', 0)}/{view.get('approvals_required', '?')} approvals)",
        },
        {"type": "mrkdwn", "text": f"*Intent*\n{_mrkdwn(what)}"},
        {"type": "mrkdwn", "text": f"*Status*\n{_mrkdwn(view.get('status', '?'))}"},
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_mrkdwn(headline)}*"}},
        {"type": "section", "fields": fields},
        {"type": "section", "text": {"type": "mrkdwn", "text": "```" + _mrkdwn(exact)[:2800] + "```"}},
    ]
    if request.get("body_preview"):
        preview = _mrkdwn(request["body_preview"])[:2800]
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"Body: `{preview}`"}]})
    blocks.append(
        {
            "type": "actions",
            "elements": [
                {
                    "type": "button",
                    "text": {"type": "plain_text", "text": "Review in the console"},
                    "url": console,
                    "style": "primary",
                }
            ],
        }
    )
    return {"text": f"{headline}: {what} — {exact} — {console}", "blocks": blocks}


def backoff(attempts: int) -> float:
    """Seconds before attempt `attempts + 1`: doubling from 1 s to 60 s, ±20 % jitter."""
    base = min(BACKOFF_MAX, BACKOFF_START * (2 ** min(attempts, 16)))
    return float(base * random.uniform(0.8, 1.2))


class Notifier:
    """Delivers the outbox. Per receiver, one deliverer at a time (a lease in the store, so replicas
    share the work) and strictly in order: a row that fails holds back the ones after it."""

    def __init__(self, database: Database, config: NotifyConfig, counter: Counter) -> None:
        self.db = database
        self.config = config
        self.counter = counter
        self.owner = "n_" + secrets.token_hex(6)
        self.wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        while True:
            try:
                busy = await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except StoreError as exc:
                log.warning("notification outbox unavailable, retrying: %s", exc)
                busy = False
            except Exception:
                log.exception("notification delivery failed, retrying")
                busy = False
            if not busy:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), 0.5)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT), trust_env=False
            )
        return self._session

    async def deliver_due(self) -> bool:
        """One pass over every receiver with pending rows; True when something was delivered."""
        now = time.time()
        async with self.db.transaction() as tx:
            rows = await tx.all(
                "SELECT id, target, body, attempts, created_at, next_at FROM notifications"
                " WHERE state = 'pending' ORDER BY target, id LIMIT 500"
            )
        by_target: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            by_target.setdefault(str(row[1]), []).append(row)
        delivered = False
        targets = [(target, queue) for target, queue in by_target.items() if float(queue[0][5]) <= now]
        results = await asyncio.gather(*(self._deliver_target(target, queue) for target, queue in targets))
        delivered = any(results)
        return delivered

    async def _claim(self, target: str, now: float) -> bool:
        async with self.db.transaction() as tx:
            row = await tx.one(
                "INSERT INTO notify_leases (target, owner, until) VALUES (%s, %s, %s)"
                " ON CONFLICT (target) DO UPDATE SET owner = excluded.owner, until = excluded.until"
                " WHERE notify_leases.until < %s OR notify_leases.owner = excluded.owner RETURNING owner",
                (target, self.owner, now + LEASE_SECONDS, now),
            )
        return row is not None

    async def _deliver_target(self, target: str, queue: Sequence[tuple[Any, ...]]) -> bool:
        if not await self._claim(target, time.time()):
            return False  # another replica delivers to this receiver now
        delivered = False
        for row_id, _, body, attempts, created_at, next_at in queue:
            now = time.time()
            if float(next_at) > now:
                break
            error = await self._post(target, str(body))
            if error is None:
                await self._set(row_id, "delivered", int(attempts) + 1, now, None)
                self.counter.labels(result="delivered").inc()
                delivered = True
                continue
            attempts = int(attempts) + 1
            if now - float(created_at) >= RETRY_FOR_SECONDS:
                await self._set(row_id, "failed", attempts, now, error)
                self.counter.labels(result="failed").inc()
                log.error(
                    "notification %s to %s given up after %d attempts: %s", row_id, target, attempts, error
                )
                continue
            await self._set(row_id, "pending", attempts, now + backoff(attempts - 1), error)
            self.counter.labels(result="retried").inc()
            log.warning("notification to %s failed (attempt %d), retrying: %s", target, attempts, error)
            break  # in order: nothing after this row goes before it
        return delivered

    async def _post(self, target: str, body: str) -> str | None:
        raw = body.encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.config.secret, raw, int(time.time())),
            "User-Agent": "vienna-notify/1",
        }
        try:
            async with self._http().post(target, data=raw, headers=headers, allow_redirects=False) as answer:
                await answer.read()
                if 200 <= answer.status < 300:
                    return None
                return f"HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:300]

    async def _set(self, row_id: str, state: str, attempts: int, next_at: float, error: str | None) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE notifications SET state = %s, attempts = %s, next_at = %s, last_error = %s WHERE id = %s",
                (state, attempts, next_at, error, row_id),
            )


NOTIFY_FLAGS: tuple[tuple[str, str | None, str], ...] = (
    ("notify-webhook", None, "POST warrant-request events here (repeatable; env: comma-separated)"),
    (
        "notify-secret-file",
        None,
        "HMAC secret for Vienna-Signature (default: generated beside the data, with a warning)",
    ),
    ("notify-format", "json", "json, or slack (an incoming-webhook message with a link to the console)"),
)


def webhooks_of(given: object, env: Mapping[str, str]) -> tuple[str, ...]:
    """--notify-webhook (repeatable) wins over VIENNA_NOTIFY_WEBHOOK (comma- or space-separated)."""
    values = list(given) if isinstance(given, list) else []
    if not values:
        values = env.get("VIENNA_NOTIFY_WEBHOOK", "").replace(",", " ").split()
    for url in values:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--notify-webhook: {url!r} must be an http:// or https:// URL")
    return tuple(values)
