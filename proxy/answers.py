"""Answers the proxy makes itself: JSON bodies with Vienna-Decision, in the shape of DESIGN.md §5."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mitmproxy import http

from policy.model import Decision

DECISION_HEADER = "Vienna-Decision"
DECISION_ID_HEADER = "Vienna-Decision-Id"
WARRANT_REQUEST_HEADER = "Vienna-Warrant-Request"
WARRANT_REQUEST_URL_HEADER = "Vienna-Warrant-Request-Url"


def passback_headers(warrant_request: Mapping[str, Any]) -> dict[str, str]:
    """§12: the warrant request to wait for, where tools that print only headers or the status show it."""
    return {
        WARRANT_REQUEST_HEADER: str(warrant_request["id"]),
        WARRANT_REQUEST_URL_HEADER: str(warrant_request["url"]),
    }


def passback_reason(decision: Decision, warrant_request: Mapping[str, Any]) -> str:
    """The `reason` of a refusal that opened (or found) a warrant request: names its id and URL, so an
    SDK that prints only the message still says what to wait for."""
    needed = warrant_request.get("approvals_required")
    votes = "1 operator approval" if needed == 1 else f"{needed} operator approvals"
    status = warrant_request.get("status")
    if status == "approved":
        return (
            f"{decision.reason}; warrant request {warrant_request['id']} is approved: fetch the warrant at "
            f"{warrant_request['url']} and retry with the Vienna-Warrant header"
        )
    return (
        f"{decision.reason}; waiting for {votes} on warrant request {warrant_request['id']} "
        f"at {warrant_request['url']}, then retry with the Vienna-Warrant header"
    )


def deny_body(
    decision: Decision,
    *,
    error: str | None = None,
    warrant_request: Mapping[str, Any] | None = None,
    decision_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "error": error or decision.verdict.value,
        "reason": decision.reason,
        "reason_code": decision.reason_code,
        "tier": decision.tier.value,
        "intent": decision.intent.as_dict(),
        "policy_revision": decision.policy_revision,
    }
    if decision_id is not None:
        body["decision_id"] = decision_id
    if warrant_request is not None:
        body["warrant_request"] = dict(warrant_request)
    if extra:
        body.update(extra)
    return body


def json_response(
    status: int,
    body: Mapping[str, Any],
    *,
    decision: str = "deny",
    decision_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> http.Response:
    content = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    all_headers = {"Content-Type": "application/json", DECISION_HEADER: decision, "Cache-Control": "no-store"}
    if decision_id is not None:
        all_headers[DECISION_ID_HEADER] = decision_id
    if headers:
        all_headers.update(headers)
    return http.Response.make(status, content, all_headers)


def plain_error(
    status: int, error: str, reason_code: str, reason: str, *, decision_id: str | None = None
) -> http.Response:
    """For refusals that happen before any intent exists (bad CONNECT, oversize body, internal error)."""
    body = {
        "error": error,
        "reason": reason,
        "reason_code": reason_code,
        "tier": "deny",
        "intent": {"action": "unknown", "target": "", "rule": None},
    }
    if decision_id is not None:
        body["decision_id"] = decision_id
    return json_response(status, body, decision_id=decision_id)
