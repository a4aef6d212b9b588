"""Where a sidecar's passbacks live: in its own data dir (standalone), or at `vienna authority`.

Both answer the same three questions for the data plane and the control API: open (or reuse) the
warrant request for a refused request, read one back for the agent, and count one use of a warrant
before a request is forwarded on it."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from policy.model import Decision
from policy.rules import RuleSet
from policy.warrants import terms_for
from proxy.audit_log import Recorder
from proxy.authority_client import AuthorityClient, AuthorityRefused, AuthorityUnavailable
from proxy.store import Store
from proxy.warrant_requests import PendingLimit, WarrantRequests

_REQUEST_ID = re.compile(r"wr_[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Opened:
    summary: dict[str, Any]  # the `warrant_request` object of a passback body
    warrant: str | None = None  # set once approved (a reused request whose warrant is still usable)
    warrant_id: str | None = None


@dataclass(frozen=True, slots=True)
class NotConsumed:
    code: str
    reason: str


class Passbacks(Protocol):
    remote: bool

    async def open(self, *, agent: str, decision: Decision, canonical: Mapping[str, Any]) -> Opened: ...

    async def read(self, request_id: str) -> dict[str, Any] | None: ...

    async def consume(self, warrant_id: str, max_uses: int, token: str) -> NotConsumed | None: ...


class LocalPassbacks:
    remote = False

    def __init__(self, requests: WarrantRequests, store: Store, clock: Callable[[], float]) -> None:
        self.requests = requests
        self.store = store
        self.clock = clock

    async def open(self, *, agent: str, decision: Decision, canonical: Mapping[str, Any]) -> Opened:
        stored = self.requests.open(agent=agent, decision=decision, canonical=canonical)
        summary = self.requests.summary(stored)
        if stored.warrant is not None and summary["status"] == "approved":
            return Opened(summary, stored.warrant, stored.warrant_id)
        return Opened(summary)

    async def read(self, request_id: str) -> dict[str, Any] | None:
        stored = self.store.get_request(request_id)
        return None if stored is None else self.requests.view(stored, include_warrant=True)

    async def consume(self, warrant_id: str, max_uses: int, token: str) -> NotConsumed | None:
        if self.store.consume_warrant(warrant_id, max_uses, self.clock()):
            return None
        return NotConsumed("warrant.replayed", "warrant already used up (replay)")


class RemotePassbacks:
    """Warrant requests opened at the authority and read back from it; uses counted there, so
    `max_uses` holds across every sidecar and replica. The agent only ever talks to its sidecar."""

    remote = True

    def __init__(
        self,
        client: AuthorityClient,
        recorder: Recorder,
        *,
        rules: Callable[[], RuleSet],
        api_base_url: str,
    ) -> None:
        self.client = client
        self.recorder = recorder
        self._rules = rules
        self.api_base_url = api_base_url

    def url(self, request_id: str) -> str:
        return f"{self.api_base_url}/v1/warrant-requests/{request_id}"

    async def open(self, *, agent: str, decision: Decision, canonical: Mapping[str, Any]) -> Opened:
        rules = self._rules()
        terms = terms_for(decision.tier, rules.rule(decision.rule_id))
        status, body = await self.client.call(
            "POST",
            "/v1/sidecar/warrant-requests",
            body={
                "agent": agent,
                "tier": decision.tier.value,
                "intent": decision.intent.as_dict(),
                "request": dict(canonical),
                "rule_id": decision.rule_id,
                "terms": {
                    "ttl_seconds": terms.ttl_seconds,
                    "max_uses": terms.max_uses,
                    "bind": terms.bind.value,
                },
                "policy_revision": decision.policy_revision,
            },
        )
        if status == 429:
            raise PendingLimit(_limit_of(body))
        if status == 403:
            # The authority answered, and says this sidecar may not act for the agent: a refusal
            # (a configuration to fix), not an outage.
            raise AuthorityRefused(status, body)
        if status not in (200, 201):
            raise AuthorityUnavailable(
                f"the authority refused to open a warrant request: {body.get('reason')}"
            )
        request_id = str(body["id"])
        if body.get("created"):
            self.recorder.record(
                "warrant_request",
                agent=agent,
                policy_revision=decision.policy_revision,
                payload={
                    "warrant_request_id": request_id,
                    "authority": self.client.base_url,
                    "tier": decision.tier.value,
                    "intent": decision.intent.as_dict(),
                    "request": dict(canonical),
                    "approvals_required": body.get("approvals_required"),
                    "expires_at": body.get("expires_at"),
                },
            )
        summary = {
            "id": request_id,
            "status": body.get("status"),
            "approvals_required": body.get("approvals_required"),
            "approvals": body.get("approvals"),
            "url": self.url(request_id),
            "expires_at": body.get("expires_at"),
        }
        warrant = body.get("warrant") if body.get("status") == "approved" else None
        return Opened(summary, warrant if isinstance(warrant, str) else None, body.get("warrant_id"))

    async def read(self, request_id: str) -> dict[str, Any] | None:
        # The id is the agent's input: only a well-formed id becomes part of a URL we send with our
        # token (an encoded `../` must never reach another authority route).
        if not _REQUEST_ID.fullmatch(request_id):
            return None
        status, body = await self.client.call("GET", f"/v1/warrant-requests/{quote(request_id, safe='')}")
        if status == 404:
            return None
        if status != 200:
            raise AuthorityUnavailable(f"the authority answered {status} for warrant request {request_id}")
        return {**body, "url": self.url(request_id), "authority_url": body.get("url")}

    async def consume(self, warrant_id: str, max_uses: int, token: str) -> NotConsumed | None:
        try:
            consumed, body = await self.client.consume(token)
        except AuthorityRefused as refused:
            return NotConsumed(
                str(refused.body.get("reason_code") or "warrant.refused_by_authority"),
                f"the authority refused this warrant: {refused.body.get('reason')}",
            )
        if not consumed:
            return NotConsumed(
                "warrant.replayed", "warrant already used up (replay, counted at the authority)"
            )
        # Only an answer that says, for this warrant, that one more use was counted lets it through.
        uses, limit = body.get("uses"), body.get("max_uses")
        if (
            body.get("consumed") is not True
            or body.get("warrant_id") != warrant_id
            or not isinstance(uses, int)
            or not isinstance(limit, int)
            or not 1 <= uses <= limit
        ):
            raise AuthorityUnavailable(
                "the authority's answer to a consume does not confirm this warrant's use"
            )
        return None


def _limit_of(body: Mapping[str, Any]) -> int:
    limit = body.get("limit")
    return limit if isinstance(limit, int) else 0


__all__ = [
    "AuthorityRefused",
    "AuthorityUnavailable",
    "LocalPassbacks",
    "NotConsumed",
    "Opened",
    "Passbacks",
    "RemotePassbacks",
]
