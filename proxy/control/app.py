"""The control API (DESIGN.md §7): health, metrics, CA, intents, warrant requests, approvals, audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from policy import engine
from policy.approvals import ApprovalError
from policy.model import Verdict
from policy.normalize import AmbiguousRequest, build_request
from proxy.answers import deny_body, passback_headers
from proxy.authority_client import AuthorityRefused, AuthorityUnavailable
from proxy.console import add_console_routes
from proxy.control.auth import AuthThrottle, authenticate
from proxy.control.direct import execute, intent_canonical, report, submit_handler_intent, verify_warrant
from proxy.control.paging import list_query, page_headers
from proxy.openapi import add_openapi_route
from proxy.store import AuditFull, StoreUnavailable
from proxy.warrant_requests import PendingLimit, canonical_request, constraints_preview

if TYPE_CHECKING:
    from proxy.runtime import Sidecar

SIDECAR: web.AppKey[Sidecar] = web.AppKey("sidecar")
CA_CERT: web.AppKey[Path] = web.AppKey("ca_cert")
_MAX_JSON = 1 << 20


def _error(
    status: int, error: str, reason: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    all_headers = dict(headers or {})
    if status == 401:
        all_headers["WWW-Authenticate"] = 'Bearer realm="vienna"'
    return web.json_response({"error": error, "reason": reason, **extra}, status=status, headers=all_headers)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > _MAX_JSON:
        raise web.HTTPRequestEntityTooLarge(max_size=_MAX_JSON, actual_size=request.content_length)
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise _BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


class _BadRequest(Exception):
    pass


THROTTLE: web.AppKey[AuthThrottle] = web.AppKey("auth_throttle")


def _operator(request: web.Request) -> str | web.Response:
    return authenticate(request, request.app[THROTTLE], request.app[SIDECAR])


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.method == "POST":
        # Every POST records something (an intent, a vote, an execution): none while the audit is full.
        blocked = request.app[SIDECAR].recorder.blocked
        if blocked is not None:
            return _error(503, "unavailable", f"{blocked[1]}; refused", reason_code=blocked[0])
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except _BadRequest as exc:
        return _error(400, "bad_request", str(exc))
    except AuditFull as exc:
        return _error(
            503, "unavailable", f"the audit cannot take more events: {exc}", reason_code="audit.full"
        )
    except StoreUnavailable as exc:
        return _error(
            503, "unavailable", f"the audit store cannot record: {exc}", reason_code="audit.unavailable"
        )
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, "bad_request" if exc.status < 500 else "error", exc.reason)
        raise


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    body: dict[str, object] = {
        "status": "ready" if sidecar.ready else "not_ready",
        "policy_revision": sidecar.rules.revision,
        "policy_rules": len(sidecar.rules.rules),
        "proxy_listening": sidecar.proxy_listening,
        "api_listening": sidecar.api_listening,
    }
    if sidecar.authority is not None:
        body["authority"] = {"url": sidecar.authority.base_url, "keys_known": sidecar.keys is not None}
    ready = sidecar.ready
    blocked = sidecar.recorder.blocked
    keeper = sidecar.recorder.keeper
    if keeper is not None or blocked is not None:
        audit: dict[str, object] = {"status": "ok" if blocked is None else blocked[0]}
        if blocked is not None:
            audit["reason"] = blocked[1]
            ready = False
        if keeper is not None:
            audit["first_seq"] = keeper.first_seq
            if keeper.warning is not None:
                audit["warning"] = keeper.warning
        body["audit"] = audit
        if blocked is not None:
            body["status"] = "not_ready"
            body["reason_code"] = blocked[0]
    return web.json_response(body, status=200 if ready else 503)


async def startupz(request: web.Request) -> web.Response:
    """Started: the policy is loaded and both listeners are up, whatever the audit's state. For a
    startup probe: a sidecar that starts with a full audit must stay up (refusing, NotReady) so
    that an operator can export and release it, not be restarted in a loop."""
    sidecar = request.app[SIDECAR]
    started = sidecar.proxy_listening and sidecar.api_listening
    return web.json_response({"status": "started" if started else "starting"}, status=200 if started else 503)


async def metrics(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    sidecar.warrant_requests.refresh_pending()
    return web.Response(
        body=sidecar.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def ca_pem(request: web.Request) -> web.Response:
    path = request.app[CA_CERT]
    try:
        content = path.read_bytes()
    except OSError:
        return _error(503, "unavailable", "the interception CA is not created yet")
    return web.Response(body=content, headers={"Content-Type": "application/x-pem-file"})


async def submit_intent(request: web.Request) -> web.Response:
    """The seed SDK's contract: an agent announces an intent, gets direct or passback."""
    sidecar = request.app[SIDECAR]
    body = await _json_body(request)
    action, target = body.get("action"), body.get("target", "")
    params = body.get("params") or {}
    agent = body.get("agent_id") or sidecar.settings.agent_id
    if not isinstance(action, str) or not action.strip():
        raise _BadRequest("'action' must be a non-empty string")
    if not isinstance(target, str) or not isinstance(agent, str) or not isinstance(params, dict):
        raise _BadRequest("'target' and 'agent_id' must be strings and 'params' an object")
    rules = sidecar.rules
    handler = rules.handler(action)
    http_request = None
    if handler is None and ("url" in params or "method" in params):
        http_request = _params_request(params)
    if http_request is not None:
        decision = engine.decide(
            http_request,
            rules=rules,
            warrant=None,
            agent=sidecar.settings.agent_id,
            keys=sidecar.keys,
            now=sidecar.clock(),
        )
    else:
        decision = engine.decide_action(action, target, rules=rules)
    intent = decision.intent
    sidecar.recorder.record(
        "intent",
        agent=sidecar.settings.agent_id,  # the chain's agent is the one this sidecar serves
        policy_revision=rules.revision,
        payload={
            "claimed_agent_id": agent,  # what the caller said, kept but not trusted
            "source": "api",
            "action": action,
            "target": target,
            "params_keys": sorted(params),
            "tier": decision.tier.value,
            "rule": decision.rule_id,
            "reason_code": decision.reason_code,
        },
    )
    sidecar.metrics.requests.labels(
        tier=decision.tier.value,
        decision=decision.verdict.value,
        action=sidecar.metrics.action_label(intent.action),
    ).inc()
    if handler is not None:
        return await submit_handler_intent(sidecar, handler, action, target, params, decision)
    if decision.verdict in (Verdict.DENIED, Verdict.BAD_REQUEST):
        return web.json_response(
            deny_body(decision), status=decision.verdict.http_status, headers={"Vienna-Decision": "deny"}
        )
    if not decision.tier.needs_warrant:
        # §13: no handler runs this action, so nothing was executed here: no execution id.
        return web.json_response(
            {
                "mode": "direct",
                "execution_id": None,
                "status": "allowed",
                "tier": decision.tier.value,
                "intent": intent.as_dict(),
                "policy_revision": rules.revision,
            }
        )
    canonical: dict[str, Any] | None = (
        canonical_request(http_request)
        if http_request is not None
        else _intent_canonical_or_none(action, target, params)
    )
    if canonical is None:
        raise _BadRequest("'params' must be plain JSON (no NaN or infinities)")
    try:
        opened = await sidecar.passbacks.open(
            agent=sidecar.settings.agent_id, decision=decision, canonical=canonical
        )
    except PendingLimit as full:
        return _error(429, "denied", str(full), reason_code="warrant_request.limit")
    except AuthorityUnavailable as exc:
        return _authority_down(exc)
    except AuthorityRefused as refused:
        return _error(
            403,
            "denied",
            f"the authority refused this sidecar's warrant request: {refused.body.get('reason')}",
            reason_code=str(refused.body.get("reason_code") or "authority.refused"),
        )
    summary = opened.summary
    answer: dict[str, Any] = {
        "mode": "passback",
        "status": "approved" if summary["status"] == "approved" else "pending_approval",
        "tier": decision.tier.value,
        "intent": intent.as_dict(),
        "instruction": {
            "what": "wait for operator approval, then send the request through the proxy with the warrant",
            "header": "Vienna-Warrant",
            "poll": summary["url"],
            **({"method": http_request.method, "url": http_request.url} if http_request is not None else {}),
        },
        "constraints": constraints_preview(http_request, decision, rules) if http_request is not None else {},
        "warrant_request": summary,
    }
    if opened.warrant is not None:
        answer["warrant_id"] = opened.warrant_id
        answer["warrant"] = opened.warrant
    return web.json_response(answer, headers=passback_headers(summary))


def _intent_canonical_or_none(action: str, target: str, params: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return intent_canonical(action, target, params, None)
    except ValueError:
        return None


def _params_request(params: dict[str, Any]) -> Any:
    url, method = params.get("url"), params.get("method", "GET")
    if not isinstance(url, str) or not isinstance(method, str):
        raise _BadRequest("params.url and params.method must be strings")
    parts = urlsplit(url)
    body = params.get("body", "")
    if not isinstance(body, str):
        body = json.dumps(body, separators=(",", ":"))
    try:
        return build_request(
            method=method,
            scheme=parts.scheme,
            host=parts.hostname or "",
            port=parts.port,
            target=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            headers=[(str(k), str(v)) for k, v in (params.get("headers") or {}).items()],
            body=body.encode(),
        )
    except (AmbiguousRequest, ValueError) as exc:
        raise _BadRequest(f"params.url: {getattr(exc, 'reason', exc)}") from None


async def get_warrant_request(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    try:
        view = await sidecar.passbacks.read(request.match_info["id"])
    except AuthorityUnavailable as exc:
        return _authority_down(exc)
    if view is None:
        return _error(404, "not_found", "no such warrant request")
    return web.json_response(view)


def _authority_down(exc: Exception) -> web.Response:
    return _error(
        503,
        "unavailable",
        f"the authority cannot be reached; warrant requests wait there: {exc}",
        reason_code="authority.unavailable",
    )


def _decided_at_authority(sidecar: Sidecar) -> web.Response | None:
    if sidecar.settings.authority is None:
        return None
    return _error(
        409,
        "authority_mode",
        f"this sidecar's warrant requests are listed and decided at its authority, {sidecar.settings.authority}",
        reason_code="authority.mode",
        authority=sidecar.settings.authority,
    )


async def list_warrant_requests(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    who = _operator(request)
    if isinstance(who, web.Response):
        return who
    elsewhere = _decided_at_authority(sidecar)
    if elsewhere is not None:
        return elsewhere
    try:
        query = list_query(request)
    except ValueError as exc:
        raise _BadRequest(str(exc)) from None
    now = sidecar.clock()
    found = sidecar.store.list_requests(query.status, now, limit=query.limit, offset=query.offset)
    total = sidecar.store.count_requests(query.status, now)
    items = [sidecar.warrant_requests.view(item, include_warrant=False) for item in found]
    headers = page_headers(request, query, len(found), total)
    return web.json_response(items, headers=headers)


async def _vote(request: web.Request, approve: bool) -> web.Response:
    sidecar = request.app[SIDECAR]
    operator = _operator(request)
    if isinstance(operator, web.Response):
        return operator
    elsewhere = _decided_at_authority(sidecar)
    if elsewhere is not None:
        return elsewhere
    body = await _json_body(request)
    justification = body.get("justification", "")
    if not isinstance(justification, str):
        raise _BadRequest("'justification' must be a string")
    # Looked up here, not by catching KeyError around vote(): a KeyError raised while minting is
    # an internal error, not "no such warrant request".
    if sidecar.store.get_request(request.match_info["id"]) is None:
        return _error(404, "not_found", "no such warrant request")
    try:
        stored = sidecar.warrant_requests.vote(
            request.match_info["id"], operator=operator, approve=approve, justification=justification
        )
    except ApprovalError as exc:
        return _error(exc.http_status, exc.code.split(".")[-1], exc.reason, reason_code=exc.code)
    return web.json_response(sidecar.warrant_requests.view(stored, include_warrant=False))


async def approve(request: web.Request) -> web.Response:
    return await _vote(request, True)


async def deny(request: web.Request) -> web.Response:
    return await _vote(request, False)


async def audit(request: web.Request) -> web.Response:
    sidecar = request.app[SIDECAR]
    who = _operator(request)
    if isinstance(who, web.Response):
        return who
    try:
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise _BadRequest("after and limit must be integers") from None
    if after < 0 or not 1 <= limit <= 10_000:
        raise _BadRequest("after must be >= 0 and limit 1-10000")
    events = [event.as_dict() for event in sidecar.store.events(after=after, limit=limit)]
    next_after = events[-1]["seq"] if events else after
    page: dict[str, object] = {"events": events, "next_after": next_after, "head_seq": sidecar.store.head[0]}
    keeper = sidecar.recorder.keeper
    if keeper is not None:
        page["first_seq"] = keeper.first_seq  # events before it were dropped by retention, once released
    return web.json_response(page)


def make_app(sidecar: Sidecar, *, ca_cert: Path) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=_MAX_JSON)
    app[SIDECAR] = sidecar
    app[THROTTLE] = AuthThrottle()
    app[CA_CERT] = ca_cert
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/startupz", startupz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/ca.pem", ca_pem)
    app.router.add_post("/v1/intents", submit_intent)
    app.router.add_get("/v1/warrant-requests", list_warrant_requests)
    app.router.add_get("/v1/warrant-requests/{id}", get_warrant_request)
    app.router.add_post("/v1/warrant-requests/{id}/approve", approve)
    app.router.add_post("/v1/warrant-requests/{id}/deny", deny)
    app.router.add_get("/v1/audit", audit)
    app.router.add_post("/v1/executions", execute)
    app.router.add_post("/v1/executions/report", report)
    app.router.add_post("/v1/warrants/verify", verify_warrant)
    add_console_routes(app)
    add_openapi_route(app, sidecar.settings.api_base_url)
    return app
