"""The sidecar's side of `vienna authority`: open and read warrant requests, consume warrants, fetch
the public keys, ship audit events. Every failure to reach it is AuthorityUnavailable (fail closed)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from policy.audit import AuditEvent
from policy.warrants import WarrantKeys, public_key_from_jwk

CALL_TIMEOUT = 5.0
KEYS_REFRESH_MIN_INTERVAL = 1.0  # an agent sending made-up key ids must not make us hammer the authority


class AuthorityUnavailable(Exception):
    """The authority did not answer (down, timed out, 5xx): T2/T3 are refused, never let through."""


class AuthorityRefused(Exception):
    """The authority answered, and said no (4xx): its status and JSON body."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(f"{status}: {body.get('reason_code')}: {body.get('reason')}")
        self.status = status
        self.body = dict(body)


class AuthorityClient:
    def __init__(self, base_url: str, token: str, *, ca_file: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None
        self.keys: WarrantKeys | None = None
        self._keys_fetched_at = 0.0
        self._keys_lock = asyncio.Lock()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context = ssl.create_default_context(cafile=self._ca_file) if self._ca_file else None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, ssl=context if context is not None else True),
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT, connect=min(CALL_TIMEOUT, 3.0)),
                headers={"Authorization": f"Bearer {self._token}"},
                trust_env=False,  # the sidecar's own HTTPS_PROXY (if any) is never its way to the authority
                json_serialize=lambda value: json.dumps(value, separators=(",", ":")),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for a 2xx or 4xx answer; AuthorityUnavailable for anything else."""
        try:
            async with self._http().request(
                method, self.base_url + path, json=body, params=params, allow_redirects=False
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AuthorityUnavailable(
                f"cannot reach the authority at {self.base_url}: {exc or type(exc).__name__}"
            ) from None
        if status >= 500 or status < 200 or 300 <= status < 400:
            raise AuthorityUnavailable(f"the authority answered {status} to {method} {path}")
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            raise AuthorityUnavailable(
                f"the authority answered {status} without JSON to {method} {path}"
            ) from None
        if not isinstance(parsed, dict):
            raise AuthorityUnavailable(
                f"the authority answered {status} with a non-object to {method} {path}"
            )
        return status, parsed

    # --- keys ----------------------------------------------------------------------------------

    async def refresh_keys(self, *, force: bool = False) -> WarrantKeys | None:
        """Fetch the JWKS (at most once a second unless nothing was fetched yet); the keys held now."""
        async with self._keys_lock:
            now = time.monotonic()
            if (
                self.keys is not None
                and not force
                and now - self._keys_fetched_at < KEYS_REFRESH_MIN_INTERVAL
            ):
                return self.keys
            status, body = await self.call("GET", "/v1/keys")
            if status != 200:
                raise AuthorityUnavailable(f"the authority answered {status} to GET /v1/keys")
            public = {}
            for jwk in body.get("keys", []):
                if isinstance(jwk, dict):
                    try:
                        kid, key = public_key_from_jwk(jwk)
                    except ValueError:
                        continue  # a key we cannot use (another type) verifies nothing here
                    public[kid] = key
            if public:
                self.keys = WarrantKeys({}, None, public_keys=public)
            self._keys_fetched_at = now
            return self.keys

    # --- warrants ------------------------------------------------------------------------------

    async def consume(self, token: str) -> tuple[bool, dict[str, Any]]:
        status, body = await self.call("POST", "/v1/warrants/consume", body={"warrant": token})
        if status == 200:
            return True, body
        if status == 409:
            return False, body
        raise AuthorityRefused(status, body)

    # --- audit ---------------------------------------------------------------------------------

    async def audit_head_entry(self, chain: str) -> tuple[int, str | None]:
        """The authority's head of `chain`: (seq, hash of that event; None when it holds none)."""
        status, body = await self.call("GET", "/v1/audit/events/head", params={"chain": chain})
        if status != 200:
            raise AuthorityRefused(status, body)
        head_hash = body.get("head_hash")
        return int(body["head_seq"]), head_hash if isinstance(head_hash, str) else None

    async def ship(self, chain: str, events: Sequence[AuditEvent]) -> tuple[int, dict[str, Any]]:
        return await self.call(
            "POST", "/v1/audit/events", body={"chain": chain, "events": [event.as_dict() for event in events]}
        )
