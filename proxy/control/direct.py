"""§13 routes: intents that run built-in handlers (Vienna Direct), executions with a warrant, and the
verification of agent-executed passbacks (`/v1/executions/report`, `/v1/warrants/verify`)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web

from policy import engine
from policy.audit import redact
from policy.handlers import Handler, ParamError, check_params, params_digest
from policy.model import Decision, Verdict
from policy.warrants import WarrantClaims, WarrantRefused, read_warrant
from proxy.answers import deny_body, passback_headers
from proxy.authority_client import AuthorityRefused, AuthorityUnavailable
from proxy.direct.runners import Outcome, run_exec, run_http, run_sql
from proxy.store import StoreUnavailable
from proxy.warrant_requests import PendingLimit

if TYPE_CHECKING:
    from proxy.runtime import Sidecar

EXECUTE, INTENT = "EXECUTE", "INTENT"
MAX_CONCURRENT_EXECUTIONS = 8
_running = asyncio.Semaphore(MAX_CONCURRENT_EXECUTIONS)


def busy() -> bool:
    """All execution slots are taken: a new execution is refused (429) rather than queued without end."""
    return _running.locked()


def _busy_answer() -> web.Response:
    return _error(
        429, "denied", f"{MAX_CONCURRENT_EXECUTIONS} executions are running; retry later", "execution.busy"
    )


_STATUSES = ("succeeded", "failed")
MAX_REPORTED_RESULT = 64 * 1024


def intent_canonical(
    action: str, target: str, params: Mapping[str, Any], handler: Handler | None
) -> dict[str, Any]:
    """What a warrant request for an intent holds: the params as shown to operators (secret-named ones
    redacted) and their digest, which the warrant binds (with the action and the target)."""
    shown = redact(dict(params))
    canonical: dict[str, Any] = {
        "action": action,
        "target": target,
        "params": shown,
        "params_sha256": params_digest(action, target, dict(params)),
    }
    if handler is not None:
        canonical["handler"] = handler.id
    return canonical


def _error(status: int, error: str, reason: str, code: str, **extra: Any) -> web.Response:
    return web.json_response({"error": error, "reason": reason, "reason_code": code, **extra}, status=status)


async def run_handler(sidecar: Sidecar, handler: Handler, values: Mapping[str, str]) -> Outcome:
    if handler.exec is not None:
        return await run_exec(handler, values)
    if handler.http is not None:
        from proxy.runtime import ca_cert_path

        settings = sidecar.settings
        host = "127.0.0.1" if settings.listen_host in ("0.0.0.0", "") else settings.listen_host  # noqa: S104 -- comparing
        host = f"[{host}]" if ":" in host else host
        return await run_http(
            handler, values, proxy_url=f"http://{host}:{settings.listen_port}", ca_file=ca_cert_path(settings)
        )
    return await run_sql(handler, values)


async def execute_and_record(
    sidecar: Sidecar,
    handler: Handler,
    values: Mapping[str, str],
    decision: Decision,
    *,
    warrant_id: str | None = None,
) -> dict[str, Any]:
    """Run one handler and audit it: decision (durable before anything runs), then the execution."""
    execution_id = "ex_" + secrets.token_hex(8)
    decision_id = "d_" + secrets.token_hex(8)
    sidecar.recorder.record(
        "decision",
        agent=sidecar.settings.agent_id,
        policy_revision=decision.policy_revision,
        payload={
            "decision_id": decision_id,
            "decision": "allow",
            "forwarded": False,
            "executed": True,
            "execution_id": execution_id,
            "handler": handler.id,
            "params": redact(dict(values)),  # what runs, recorded before it runs
            "params_sha256": params_digest(decision.intent.action, decision.intent.target, values),
            "tier": decision.tier.value,
            "intent": decision.intent.as_dict(),
            "reason_code": "warrant.valid" if warrant_id else decision.reason_code,
            **({"warrant_id": warrant_id} if warrant_id else {}),
        },
    )
    async with _running:
        outcome = await run_handler(sidecar, handler, values)
    result = outcome.result
    execution: dict[str, Any] = {
        "decision_id": decision_id,
        "execution_id": execution_id,
        "handler": handler.id,
        "kind": handler.kind,
        "status": outcome.status,
        "error": outcome.error,
        "exit_code": result.get("exit_code"),
        "http_status": result.get("status") if handler.kind == "http" else None,
        "rows": result.get("row_count"),
        "duration_ms": outcome.duration_ms,
        "output_sha256": outcome.digest,
        "params_sha256": params_digest(decision.intent.action, decision.intent.target, values),
        **({"warrant_id": warrant_id} if warrant_id else {}),
    }
    record = functools.partial(
        sidecar.recorder.record,
        "execution",
        agent=sidecar.settings.agent_id,
        policy_revision=decision.policy_revision,
        payload=execution,
    )
    try:
        record()
    except StoreUnavailable:
        # The handler has run: its outcome goes back to the caller (a 503 would invite a rerun),
        # and its execution event waits in the queue for the store to write again.
        record(durable=False)
    sidecar.metrics.executions.labels(kind=handler.kind, status=outcome.status).inc()
    return {
        "mode": "direct",
        "execution_id": execution_id,
        "status": outcome.status,
        "result": result,
        **({"error": outcome.error} if outcome.error else {}),
        "tier": decision.tier.value,
        "intent": decision.intent.as_dict(),
        "policy_revision": decision.policy_revision,
        **({"warrant_id": warrant_id} if warrant_id else {}),
    }


async def submit_handler_intent(
    sidecar: Sidecar,
    handler: Handler,
    action: str,
    target: str,
    params: Mapping[str, Any],
    decision: Decision,
) -> web.Response:
    try:
        values = check_params(handler, target, params)
    except ParamError as exc:
        return _error(400, "bad_request", exc.reason, exc.code, intent=decision.intent.as_dict())
    if decision.verdict in (Verdict.DENIED, Verdict.BAD_REQUEST):
        return web.json_response(
            deny_body(decision), status=decision.verdict.http_status, headers={"Vienna-Decision": "deny"}
        )
    if not decision.tier.needs_warrant:
        if busy():
            return _busy_answer()
        return web.json_response(await execute_and_record(sidecar, handler, values, decision))
    canonical = intent_canonical(action, target, values, handler)
    try:
        opened = await sidecar.passbacks.open(
            agent=sidecar.settings.agent_id, decision=decision, canonical=canonical
        )
    except PendingLimit as full:
        return _error(429, "denied", str(full), "warrant_request.limit")
    except AuthorityUnavailable as exc:
        return _error(503, "unavailable", f"the authority cannot be reached: {exc}", "authority.unavailable")
    except AuthorityRefused as refused:
        code = str(refused.body.get("reason_code") or "authority.refused")
        return _error(
            403,
            "denied",
            f"the authority refused this sidecar's warrant request: {refused.body.get('reason')}",
            code,
        )
    summary = opened.summary
    answer: dict[str, Any] = {
        "mode": "passback",
        "status": "approved" if summary["status"] == "approved" else "pending_approval",
        "execution_id": None,
        "tier": decision.tier.value,
        "intent": decision.intent.as_dict(),
        "instruction": {
            "what": "wait for operator approval, then POST /v1/executions with the warrant: Vienna runs the handler",
            "execute": "/v1/executions",
            "poll": summary["url"],
            "handler": handler.id,
        },
        "constraints": {"action": action, "target": target, "params_sha256": canonical["params_sha256"]},
        "warrant_request": summary,
    }
    if opened.warrant is not None:
        answer["warrant_id"] = opened.warrant_id
        answer["warrant"] = opened.warrant
    return web.json_response(answer, headers=passback_headers(summary))


# --- warrants presented to the API ---------------------------------------------------------------


def _read(sidecar: Sidecar, token: object) -> WarrantClaims | WarrantRefused:
    if not isinstance(token, str):
        return WarrantRefused("warrant.malformed", "'warrant' must be a string")
    if sidecar.keys is None:
        return WarrantRefused("warrant.no_keys", "no warrant key is known yet")
    result = read_warrant(token, keys=sidecar.keys, now=sidecar.clock())
    if isinstance(result, WarrantRefused):
        return result
    claims = result.claims
    if claims.sub != sidecar.settings.agent_id:
        return WarrantRefused(
            "warrant.wrong_agent",
            f"the warrant is for agent {claims.sub[:40]!r}, this is {sidecar.settings.agent_id!r}",
        )
    if claims.sid is not None and claims.sid != sidecar.sidecar_id:
        return WarrantRefused(
            "warrant.wrong_sidecar", "the warrant was minted by another sidecar and is used up only there"
        )
    return claims


def _intent_mismatch(claims: WarrantClaims, action: object, target: object, params: object) -> str | None:
    """Which of action, target, params differs from what the warrant was approved for (None: none).
    Nothing given is taken on trust: a missing action or target is a mismatch, missing params are {}."""
    if action != claims.intent.action:
        return "action"
    if target != claims.intent.target:
        return "target"
    con = claims.con
    if con.scheme == "intent" and con.body_sha256 is not None:
        given = params if params is not None else {}
        if not isinstance(given, dict):
            return "params"
        try:
            digest = params_digest(claims.intent.action, claims.intent.target, given)
        except ValueError:
            return "params"
        if digest != con.body_sha256:
            return "params"
    return None


async def _used_up(sidecar: Sidecar, claims: WarrantClaims) -> bool:
    """Whether every use of the warrant is already counted (checked without counting one)."""
    if claims.wrq is None:
        return False
    view = await sidecar.passbacks.read(claims.wrq)
    uses = (view or {}).get("warrant_uses")
    return isinstance(uses, int) and uses >= claims.con.max_uses


async def _consume(sidecar: Sidecar, claims: WarrantClaims, token: str) -> tuple[str, str] | None:
    not_consumed = await sidecar.passbacks.consume(claims.jti, claims.con.max_uses, token)
    return None if not_consumed is None else (not_consumed.code, not_consumed.reason)


async def execute(request: web.Request) -> web.Response:
    """`POST /v1/executions {"warrant", "params"?}`: run exactly the approved handler intent, once."""
    from proxy.control.app import SIDECAR, _json_body

    sidecar = request.app[SIDECAR]
    body = await _json_body(request)
    claims = _read(sidecar, body.get("warrant"))
    if isinstance(claims, WarrantRefused):
        return _error(403, "warrant_invalid", claims.reason, claims.code)
    if claims.con.scheme != "intent" or claims.con.method != EXECUTE:
        return _error(
            400,
            "bad_request",
            "this warrant is not for a handler execution (it covers a request through the proxy)",
            "execution.not_an_execution_warrant",
        )
    rules = sidecar.rules
    handler = rules.handler(claims.intent.action)
    if handler is None:
        return _error(
            409,
            "denied",
            f"no handler runs {claims.intent.action!r} in the current policy",
            "execution.no_handler",
        )
    params = body.get("params")
    if params is None and claims.wrq:
        try:
            view = await sidecar.passbacks.read(claims.wrq)
        except AuthorityUnavailable as exc:
            return _error(
                503, "unavailable", f"the authority cannot be reached: {exc}", "authority.unavailable"
            )
        params = ((view or {}).get("request") or {}).get("params")
    if not isinstance(params, dict):
        return _error(
            400, "bad_request", "'params' must be the object the intent was approved with", "params.missing"
        )
    try:
        values = check_params(handler, claims.intent.target, params)
    except ParamError as exc:
        return _error(400, "bad_request", exc.reason, exc.code)
    if params_digest(claims.intent.action, claims.intent.target, values) != claims.con.body_sha256:
        return _error(
            403,
            "warrant_invalid",
            "these params are not the ones operators approved",
            "warrant.mismatch.params",
        )
    decision = engine.decide_action(claims.intent.action, claims.intent.target, rules=rules)
    if decision.verdict is Verdict.DENIED:
        return web.json_response(deny_body(decision), status=403, headers={"Vienna-Decision": "deny"})
    if decision.tier.needs_warrant and claims.tier.rank < decision.tier.rank:
        return _error(
            403,
            "warrant_invalid",
            f"a {claims.tier} warrant does not cover a {decision.tier} intent",
            "warrant.tier",
        )
    if busy():  # checked before the use is counted: a busy answer costs no use
        return _busy_answer()
    try:
        refused = await _consume(sidecar, claims, str(body["warrant"]))
    except AuthorityUnavailable as exc:
        return _error(503, "unavailable", f"the authority cannot be reached: {exc}", "authority.unavailable")
    if refused is not None:
        return _error(403, "warrant_invalid", refused[1], refused[0])
    return web.json_response(
        await execute_and_record(sidecar, handler, values, decision, warrant_id=claims.jti)
    )


def _verification(sidecar: Sidecar, payload: dict[str, Any]) -> None:
    sidecar.recorder.record(
        "verification",
        agent=sidecar.settings.agent_id,
        policy_revision=sidecar.rules.revision,
        payload=payload,
    )


async def report(request: web.Request) -> web.Response:
    """`POST /v1/executions/report {"warrant", "status", "result"}`: an agent-executed passback,
    recorded against its warrant; what does not match it is recorded as a violation."""
    from proxy.control.app import SIDECAR, _json_body

    sidecar = request.app[SIDECAR]
    body = await _json_body(request)
    status, result = body.get("status"), body.get("result", {})
    if status not in _STATUSES:
        return _error(400, "bad_request", "'status' must be succeeded or failed", "report.status")
    try:
        result_text = json.dumps(result, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return _error(
            400, "bad_request", "'result' must be plain JSON (no NaN or infinities)", "report.result"
        )
    if len(result_text) > MAX_REPORTED_RESULT:
        return _error(
            413, "bad_request", f"'result' is larger than {MAX_REPORTED_RESULT} bytes", "report.too_large"
        )
    verification_id = "vf_" + secrets.token_hex(8)
    violations: list[str] = []
    claims = _read(sidecar, body.get("warrant"))
    warrant_id = None
    if isinstance(claims, WarrantRefused):
        violations.append(claims.code)
    else:
        warrant_id = claims.jti
        # What the report names is checked; what it leaves out is not taken as a claim.
        mismatch = _intent_mismatch(
            claims,
            body.get("action", claims.intent.action),
            body.get("target", claims.intent.target),
            body.get("params"),
        )
        if mismatch is not None and (mismatch != "params" or "params" in body):
            violations.append(f"warrant.mismatch.{mismatch}")
        reported = result.get("request") if isinstance(result, dict) else None
        if (
            isinstance(reported, dict)
            and claims.con.scheme != "intent"
            and reported.get("method") not in (None, claims.con.method)
        ):
            violations.append("warrant.mismatch.method")
        if claims.con.scheme == "intent" and claims.con.method == INTENT:
            # The agent executed it itself: the report is the one use of the warrant.
            try:
                refused = await _consume(sidecar, claims, str(body["warrant"]))
            except AuthorityUnavailable as exc:
                return _error(
                    503, "unavailable", f"the authority cannot be reached: {exc}", "authority.unavailable"
                )
            if refused is not None:
                violations.append(refused[0])
    for violation in violations:
        sidecar.metrics.verification_violations.labels(reason=violation).inc()
    _verification(
        sidecar,
        {
            "event": "execution_report",
            "verification_id": verification_id,
            "warrant_id": warrant_id,
            "status": status,
            "result_sha256": hashlib.sha256(result_text.encode()).hexdigest(),
            "result": redact(result),
            "violation": bool(violations),
            "violations": violations,
        },
    )
    return web.json_response(
        {
            "recorded": True,
            "verification_id": verification_id,
            "valid": not violations,
            "violations": violations,
            "warrant_id": warrant_id,
        }
    )


async def verify_warrant(request: web.Request) -> web.Response:
    """`POST /v1/warrants/verify`: a downstream service checks a warrant before it executes."""
    from proxy.control.app import SIDECAR, _json_body

    sidecar = request.app[SIDECAR]
    body = await _json_body(request)
    consume = body.get("consume", False)
    if not isinstance(consume, bool):
        return _error(400, "bad_request", "'consume' must be true or false", "request.invalid")
    if not isinstance(body.get("action"), str) or not isinstance(body.get("target", ""), str):
        return _error(
            400,
            "bad_request",
            "'action' (and 'target') are what the warrant is checked against",
            "request.invalid",
        )
    body.setdefault("target", "")
    claims = _read(sidecar, body.get("warrant"))
    answer: dict[str, Any]
    if isinstance(claims, WarrantRefused):
        answer = {"valid": False, "reason_code": claims.code, "reason": claims.reason}
    elif claims.con.scheme != "intent" or claims.con.method != INTENT:
        answer = {
            "valid": False,
            "reason_code": "warrant.not_verifiable",
            "reason": "this warrant is used by the proxy or by /v1/executions, not by a downstream service",
        }
    else:
        mismatch = _intent_mismatch(claims, body.get("action"), body.get("target"), body.get("params"))
        if mismatch is not None:
            answer = {
                "valid": False,
                "reason_code": f"warrant.mismatch.{mismatch}",
                "reason": f"the warrant was not approved for this {mismatch}",
            }
        else:
            answer = {
                "valid": True,
                "reason_code": "warrant.valid",
                "reason": f"warrant {claims.jti} approved by {', '.join(a.who for a in claims.approvals)}",
            }
            try:
                used_up = not consume and await _used_up(sidecar, claims)
            except AuthorityUnavailable as exc:
                return _error(
                    503, "unavailable", f"the authority cannot be reached: {exc}", "authority.unavailable"
                )
            if used_up:
                answer = {
                    "valid": False,
                    "reason_code": "warrant.replayed",
                    "reason": "warrant already used up",
                }
            elif consume:
                try:
                    refused = await _consume(sidecar, claims, str(body["warrant"]))
                except AuthorityUnavailable as exc:
                    return _error(
                        503, "unavailable", f"the authority cannot be reached: {exc}", "authority.unavailable"
                    )
                if refused is not None:
                    answer = {"valid": False, "reason_code": refused[0], "reason": refused[1]}
        answer["warrant_id"] = claims.jti
    answer["consumed"] = bool(answer["valid"] and consume)
    if not answer["valid"]:
        sidecar.metrics.verification_violations.labels(reason=answer["reason_code"]).inc()
    _verification(
        sidecar,
        {
            "event": "warrant_verified",
            "warrant_id": answer.get("warrant_id"),
            "valid": answer["valid"],
            "reason_code": answer["reason_code"],
            "consume": consume,
            "action": body.get("action") if isinstance(body.get("action"), str) else None,
            "target": body.get("target") if isinstance(body.get("target"), str) else None,
        },
    )
    return web.json_response(answer)


def target_query(target: str) -> str:
    return "target=" + quote(target, safe="")
