"""Forwarded exchanges in flight: bytes and hashes counted as they stream, silence timed, limits enforced."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import ctx, http

from policy.model import Decision, Request
from proxy.answers import deny_body, json_response
from proxy.dataplane.patches import ExchangeAbort

log = logging.getLogger("vienna.exchange")


@dataclass(slots=True, eq=False)
class Exchange:
    """One forwarded request and its response, from the decision to the last byte."""

    flow: http.HTTPFlow
    request: Request
    decision: Decision
    decision_id: str
    streamed_body: bool  # the request body streams upstream (hashed on the way) instead of being buffered
    max_response: int
    on_overflow: Callable[[Exchange], None]
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    request_done_at: float | None = None
    response_at: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    status: int = 0
    error: str | None = None
    finished: bool = False
    body_hash: Any = field(default_factory=hashlib.sha256)

    def request_chunk(self, data: bytes) -> bytes:
        if data:
            self.bytes_up += len(data)
            self.body_hash.update(data)
            self.last_activity = time.monotonic()
        return data

    def response_chunk(self, data: bytes) -> bytes:
        if not data:
            return data
        self.last_activity = time.monotonic()
        if self.max_response and self.bytes_down + len(data) > self.max_response:
            allowed = max(0, self.max_response - self.bytes_down)
            self.bytes_down += allowed
            if self.error is None:
                self.error = "response.too_large"
                self.on_overflow(self)
            return data[:allowed]
        self.bytes_down += len(data)
        return data

    def request_sent(self) -> None:
        self.request_done_at = time.monotonic()
        self.last_activity = self.request_done_at

    def response_started(self, status: int) -> None:
        self.response_at = time.monotonic()
        self.last_activity = self.response_at
        self.status = status

    @property
    def body_sha256(self) -> str:
        return str(self.body_hash.hexdigest()) if self.streamed_body else self.request.body_sha256

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


class ExchangeWatch:
    """Times every live exchange: no response headers within `response_timeout` after the request was
    sent → 504 `upstream.timeout`; `idle_timeout` of silence both ways once started → cut, `upstream.idle`."""

    def __init__(
        self,
        *,
        response_timeout: float,
        idle_timeout: float,
        connect_timeout: float,
        finish: Callable[[Exchange], None],
    ) -> None:
        self.response_timeout = response_timeout
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._finish = finish
        self.live: dict[str, Exchange] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def tick(self) -> float:
        return max(0.02, min(1.0, self.response_timeout / 8, self.idle_timeout / 8, self.connect_timeout / 8))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="vienna exchange watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def add(self, exchange: Exchange) -> None:
        self.live[exchange.flow.id] = exchange

    def pop(self, flow: http.HTTPFlow) -> Exchange | None:
        return self.live.pop(flow.id, None)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.sweep(time.monotonic())
            except Exception:  # the watch must outlive any one bad exchange
                log.exception("exchange watch failed")

    def sweep(self, now: float) -> None:
        for exchange in list(self.live.values()):
            if exchange.flow.websocket is not None:
                continue  # a WebSocket's silence is its own (pings); the connection's idle timeout applies
            server = exchange.flow.server_conn
            if exchange.response_at is None and server.timestamp_tcp_setup is None:
                if now - exchange.started >= self.connect_timeout:
                    self.abort(
                        exchange, "upstream.connect_timeout", self._timeout_answer(exchange, connect=True)
                    )
                continue
            waiting = exchange.response_at is None and exchange.request_done_at is not None
            if waiting and now - (exchange.request_done_at or now) >= self.response_timeout:
                self.abort(exchange, "upstream.timeout", self._timeout_answer(exchange))
                continue
            if now - exchange.last_activity >= self.idle_timeout:
                self.abort(exchange, "upstream.idle", None)

    def abort(self, exchange: Exchange, code: str, answer: http.Response | None) -> None:
        """End the exchange now (answered with `answer` if no response started yet) and record it."""
        if self.live.pop(exchange.flow.id, None) is None:
            return
        exchange.error = exchange.error or code
        exchange.status = exchange.status or (answer.status_code if answer is not None else 0)
        self._finish(exchange)
        with contextlib.suppress(Exception):  # the client may be gone already: nothing left to end
            ctx.master.addons.get("proxyserver").inject_event(  # type: ignore[no-untyped-call]
                ExchangeAbort(flow=exchange.flow, response=answer, reason=code)
            )

    def overflow(self, exchange: Exchange) -> None:
        self.abort(exchange, "response.too_large", None)

    def _timeout_answer(self, exchange: Exchange, *, connect: bool = False) -> http.Response:
        body = deny_body(exchange.decision, error="upstream_timeout", decision_id=exchange.decision_id)
        if connect:
            reason = f"connecting to {exchange.request.authority} timed out after {self.connect_timeout:g}s"
        else:
            reason = f"upstream {exchange.request.authority} sent no response headers in {self.response_timeout:g}s"
        body.update(reason=reason, reason_code="upstream.connect_timeout" if connect else "upstream.timeout")
        return json_response(504, body, decision_id=exchange.decision_id)
