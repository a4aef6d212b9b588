"""Warrant requests: opened by passbacks, voted on by operators, turned into minted warrants on quorum."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from policy import approvals
from policy.approvals import RequestStatus, WarrantRequest
from policy.audit import REDACTED, SECRET_KEYS, redact
from policy.model import Decision, Intent, Request
from policy.rules import RuleSet
from policy.warrants import (
    Bind,
    Constraints,
    WarrantKeys,
    WarrantTerms,
    approved_claims,
    constraints_for,
    mint,
    single_call,
    terms_for,
)
from proxy.audit_log import Recorder
from proxy.metrics import Metrics
from proxy.notify import NotifyConfig
from proxy.store import Store, StoredRequest, with_state


class PendingLimit(Exception):
    """The agent already has as many pending warrant requests as allowed: a flood must not bury them."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this agent already has {limit} pending warrant requests; wait for operators")
        self.limit = limit


def request_fingerprint(agent: str, canonical: Mapping[str, Any]) -> str:
    text = json.dumps({"agent": agent, **canonical}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


PREVIEW_BYTES = 4096


def body_preview(body: bytes, content_type: str | None) -> str:
    """What an operator sees of a body: at most 4 KiB, secret-named JSON and form fields redacted."""
    if not body:
        return ""
    media = (content_type or "").split(";")[0].strip().lower()
    text: str
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError:
        return f"({len(body)} bytes, not UTF-8 text)"
    if media.endswith("json") or media.endswith("+json"):
        try:
            text = json.dumps(redact(json.loads(decoded)), ensure_ascii=False, separators=(",", ":"))
        except (ValueError, RecursionError):
            text = decoded
    elif media == "application/x-www-form-urlencoded":
        pairs = parse_qsl(decoded, keep_blank_values=True)
        text = urlencode([(k, REDACTED if k.lower() in SECRET_KEYS else v) for k, v in pairs])
    else:
        text = decoded
    encoded = text.encode("utf-8")
    if len(encoded) <= PREVIEW_BYTES:
        return text
    return encoded[:PREVIEW_BYTES].decode("utf-8", "ignore") + f"… ({len(body)} bytes in all)"


def canonical_request(request: Request) -> dict[str, Any]:
    return {
        "method": request.method,
        "scheme": request.scheme,
        "host": request.host,
        "port": request.port,
        "path": request.path,
        "query": request.query,
        "body_sha256": request.body_sha256,
        "content_type": request.header("content-type"),
        "url": request.url,
        "body_preview": body_preview(request.body, request.header("content-type")),
        **_mcp_view(request),
    }


def _mcp_view(request: Request) -> dict[str, Any]:
    """§14: an MCP tool call's tool and arguments, for operators; their digest, for the warrant."""
    call = single_call(request)
    if call is None:
        return {}
    arguments = redact(dict(call.arguments or {}))
    return {"mcp": {"tool": call.tool, "arguments": arguments, "arguments_sha256": call.arguments_sha256}}


class WarrantRequests:
    def __init__(
        self,
        store: Store,
        recorder: Recorder,
        metrics: Metrics,
        *,
        keys: WarrantKeys | None,
        rules: Callable[[], RuleSet],
        api_base_url: str,
        pending_ttl: float,
        clock: Callable[[], float] = time.time,
        max_pending: int = 100,
        sidecar_id: str | None = None,
        notify: NotifyConfig | None = None,
    ) -> None:
        self.store = store
        self.recorder = recorder
        self.metrics = metrics
        self.keys = keys
        self._rules = rules
        self.api_base_url = api_base_url
        self.pending_ttl = pending_ttl
        self.clock = clock
        self.max_pending = max_pending
        self.sidecar_id = sidecar_id
        self.notify = notify
        self.wake: Callable[[], None] | None = None  # the notifier's, set when it runs

    def url(self, request_id: str) -> str:
        return f"{self.api_base_url}/v1/warrant-requests/{request_id}"

    def open(self, *, agent: str, decision: Decision, canonical: Mapping[str, Any]) -> StoredRequest:
        """The pending request for this agent and this exact request: reused, or created and audited."""
        now = self.clock()
        fingerprint = request_fingerprint(agent, canonical)
        existing = self.store.find_open_request(agent, fingerprint, now)
        if existing is not None:
            return existing
        if self.max_pending and self.store.count_pending_for(agent, now) >= self.max_pending:
            raise PendingLimit(self.max_pending)
        state = WarrantRequest(
            id="wr_" + secrets.token_urlsafe(16),
            agent=agent,
            tier=decision.tier,
            intent=decision.intent,
            status=RequestStatus.PENDING,
            created_at=now,
            expires_at=now + self.pending_ttl,
        )
        stored = StoredRequest(
            state=state, fingerprint=fingerprint, request=dict(canonical), rule_id=decision.rule_id
        )
        self.store.save_request(stored, notifications=self._announce("warrant_request.created", stored, now))
        self.recorder.record(
            "warrant_request",
            agent=agent,
            policy_revision=decision.policy_revision,
            payload={
                "warrant_request_id": state.id,
                "tier": state.tier.value,
                "intent": state.intent.as_dict(),
                "request": dict(canonical),
                "approvals_required": state.approvals_required,
                "expires_at": state.expires_at,
            },
        )
        self.refresh_pending()
        return stored

    def _announce(self, event: str, stored: StoredRequest, now: float) -> list[tuple[Any, ...]]:
        if self.notify is None:
            return []
        if self.wake is not None:
            self.wake()  # the rows commit with the change; the notifier looks right after
        return self.notify.rows(event, self.view(stored, include_warrant=False), now)

    def expire_due(self) -> int:
        """Mark pending requests past their deadline expired, announcing each; the number marked."""
        now = self.clock()
        expired = 0
        for stored in self.store.pending_past(now):
            updated = with_state(stored, approvals.expire(stored.state, now))
            self.store.save_request(
                updated, notifications=self._announce("warrant_request.expired", updated, now)
            )
            expired += 1
        if expired:
            self.refresh_pending()
        return expired

    def refresh_pending(self) -> None:
        self.metrics.warrant_requests_pending.set(self.store.count_pending(self.clock()))

    def vote(self, request_id: str, *, operator: str, approve: bool, justification: str) -> StoredRequest:
        """Cast one vote; raises KeyError (unknown id) or approvals.ApprovalError."""
        stored = self.store.get_request(request_id)
        if stored is None:
            raise KeyError(request_id)
        now = self.clock()
        state = approvals.cast_vote(
            stored.state, operator=operator, approve=approve, justification=justification, now=now
        )
        updated = with_state(stored, state)
        decision = "approve" if approve else "deny"
        self.metrics.approvals.labels(decision=decision).inc()
        revision = self._rules().revision
        self.recorder.record(
            "approval",
            agent=state.agent,
            policy_revision=revision,
            payload={
                "warrant_request_id": state.id,
                "operator": operator,
                "decision": decision,
                "justification": justification,
                "approvals": state.approvals,
                "approvals_required": state.approvals_required,
                "status": state.status.value,
            },
        )
        if state.status is RequestStatus.APPROVED:
            updated = self._issue(updated, now, revision)
        announced = {
            RequestStatus.APPROVED: "warrant_request.approved",
            RequestStatus.DENIED: "warrant_request.denied",
        }
        event = announced.get(state.status)
        self.store.save_request(updated, notifications=self._announce(event, updated, now) if event else ())
        self.refresh_pending()
        return updated

    def _issue(self, stored: StoredRequest, now: float, revision: str) -> StoredRequest:
        state = stored.state
        terms = terms_for(state.tier, self._rules().rule(stored.rule_id))
        constraints = warrant_constraints(stored.request, state.intent, terms)
        claims = approved_claims(
            state,
            constraints,
            ttl_seconds=terms.ttl_seconds,
            now=now,
            jti="wt_" + secrets.token_urlsafe(16),
            sid=self.sidecar_id,
        )
        if self.keys is None:
            raise RuntimeError("this sidecar holds no warrant key: warrants are minted by its authority")
        token = mint(claims, self.keys)
        self.recorder.record(
            "warrant",
            agent=state.agent,
            policy_revision=revision,
            payload={
                "warrant_id": claims.jti,
                "warrant_request_id": state.id,
                "tier": state.tier.value,
                "intent": state.intent.as_dict(),
                "constraints": constraints.as_claim(),
                "approvals": [a.who for a in claims.approvals],
                "exp": claims.exp,
                "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
            },
        )
        return StoredRequest(
            state=state,
            fingerprint=stored.fingerprint,
            request=stored.request,
            rule_id=stored.rule_id,
            warrant=token,
            warrant_id=claims.jti,
            warrant_expires_at=float(claims.exp),
        )

    def view(self, stored: StoredRequest, *, include_warrant: bool) -> dict[str, Any]:
        now = self.clock()
        body: dict[str, Any] = approvals.as_dict(stored.state, now)
        body["url"] = self.url(stored.state.id)
        body["request"] = dict(stored.request)
        body["rule"] = stored.rule_id
        if stored.warrant_id is not None:
            body["warrant_id"] = stored.warrant_id
            body["warrant_expires_at"] = stored.warrant_expires_at
            body["warrant_uses"] = self.store.warrant_uses(stored.warrant_id)
        if include_warrant and stored.warrant is not None and body["status"] == RequestStatus.APPROVED.value:
            body["warrant"] = stored.warrant
        return body

    def summary(self, stored: StoredRequest) -> dict[str, Any]:
        """The `warrant_request` object of a passback body."""
        state = stored.state
        return {
            "id": state.id,
            "status": state.effective_status(self.clock()).value,
            "approvals_required": state.approvals_required,
            "approvals": state.approvals,
            "url": self.url(state.id),
            "expires_at": state.expires_at,
        }


def bound_request(request: Mapping[str, Any], intent: Intent) -> Request:
    """The request a warrant binds to. An intent named only by action/target (POST /v1/intents
    without params.url) has no HTTP request: its warrant records the approval for the SDK and is
    bound to the pseudo-scheme "intent", which no proxied request has, so on the data plane it opens nothing."""
    if "method" not in request:
        # An intent with params (§13) binds their digest with the action and target: a handler's
        # execution warrant (method EXECUTE) runs only those params; an intent without a handler
        # (method INTENT) is verified against them.
        digest = request.get("params_sha256")
        request = {
            "method": "EXECUTE" if request.get("handler") else "INTENT",
            "scheme": "intent",
            "host": "intent.invalid",
            "port": 1,
            "path": "/" + str(intent.action),
            "query": "target=" + quote(str(intent.target), safe="") if digest else "",
            "body_sha256": digest,
        }
    return Request(
        method=str(request["method"]),
        scheme=str(request["scheme"]),
        host=str(request["host"]),
        port=int(request["port"]),
        path=str(request["path"]),
        query=str(request["query"]),
        body_sha256=str(request["body_sha256"] or ""),
        headers=(("content-type", str(request["content_type"])),) if request.get("content_type") else (),
    )


def warrant_constraints(request: Mapping[str, Any], intent: Intent, terms: WarrantTerms) -> Constraints:
    if "method" not in request:
        # An intent warrant is exact and single use whatever the rule's warrant settings say: it
        # stands for one approved execution of these params (§13).
        return constraints_for(bound_request(request, intent), bind=Bind.EXACT, max_uses=1)
    mcp = request.get("mcp")
    if terms.bind is Bind.MCP:
        if not isinstance(mcp, Mapping) or not isinstance(mcp.get("tool"), str):
            raise ValueError("bind: mcp needs the request's one tools/call")
        pair = (str(mcp["tool"]), str(mcp["arguments_sha256"]))
        return constraints_for(
            bound_request(request, intent), bind=Bind.MCP, max_uses=terms.max_uses, mcp=pair
        )
    return constraints_for(bound_request(request, intent), bind=terms.bind, max_uses=terms.max_uses)


def constraints_preview(request: Request, decision: Decision, rules: RuleSet) -> dict[str, object]:
    terms = terms_for(decision.tier, rules.rule(decision.rule_id))
    if terms.bind is Bind.MCP and single_call(request) is None:
        return {}
    return constraints_for(request, bind=terms.bind, max_uses=terms.max_uses).as_claim()


__all__ = ["PendingLimit", "WarrantRequests", "canonical_request", "constraints_preview"]
