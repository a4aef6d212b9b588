"""Operator authentication for the control API, with failed attempts throttled per client address."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING

from aiohttp import web
from cachetools import TTLCache

if TYPE_CHECKING:
    from proxy.runtime import Sidecar

FAILURES_ALLOWED = 10  # wrong or missing tokens per client address per window, before 429
WINDOW_SECONDS = 60.0


class AuthThrottle:
    """Failed authentications per client address in a sliding window (bounded memory: LRU of 10,000)."""

    def __init__(self, *, allowed: int = FAILURES_ALLOWED, window: float = WINDOW_SECONDS) -> None:
        self.allowed = allowed
        self.window = window
        self._failures: TTLCache[str, deque[float]] = TTLCache(maxsize=10_000, ttl=window)

    def retry_after(self, client: str, now: float) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        failures = self._failures.get(client)
        if failures is None:
            return 0.0
        while failures and now - failures[0] >= self.window:
            failures.popleft()
        if len(failures) < self.allowed:
            return 0.0
        return self.window - (now - failures[0])

    def failed(self, client: str, now: float) -> None:
        failures = self._failures.get(client)
        if failures is None:
            failures = deque(maxlen=self.allowed)
        failures.append(now)
        self._failures[client] = failures


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


def authenticate(request: web.Request, throttle: AuthThrottle, sidecar: Sidecar) -> str | web.Response:
    """The operator's name, or the refusal to answer: 401 (missing / not recognised) or 429."""
    from proxy.control.app import _error

    client, now = _client(request), time.monotonic()
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        name = sidecar.operators.authenticate(token.strip())
        if name is not None:
            # A right token always passes: an agent sharing the operators' address (a port-forward, a
            # NAT) must not lock them out. Tokens are long random strings; the throttle slows guessing.
            return name
        reason, code = "token not recognised", "auth.unrecognised"
    else:
        reason, code = "an operator bearer token is required", "auth.missing"
    wait = throttle.retry_after(client, now)
    if wait > 0:
        return _error(
            429,
            "rate_limited",
            f"too many failed operator authentications from {client}; retry in {int(wait) + 1} s",
            reason_code="auth.throttled",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    throttle.failed(client, now)
    with contextlib.suppress(Exception):  # the refusal stands even when it cannot be recorded
        sidecar.recorder.record(
            "approval",
            agent=sidecar.settings.agent_id,
            policy_revision=sidecar.rules.revision,
            payload={
                "event": "authentication_failed",
                "client": client,
                "reason_code": code,
                "path": request.path,
            },
            durable=False,
        )
    return _error(401, "unauthorized", reason, reason_code=code)
