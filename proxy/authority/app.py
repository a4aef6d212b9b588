"""The authority's HTTP API (aiohttp): §7's operator routes, the sidecar routes, JWKS, health, metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from policy import approvals
from policy.approvals import ApprovalError, RequestStatus
from policy.audit import AuditEvent, redact
from policy.model import Intent, Tier
from policy.rules import WARRANT_TTL_CAPS
from policy.warrants import (
    Bind,
    WarrantKeys,
    WarrantRefused,
    WarrantTerms,
    approved_claims,
    constraints_from_claim,
    mint_eddsa,
    public_key_from_jwk,
    read_warrant,
)
from proxy.authority.db import StoreError
from proxy.authority.sidecars import SidecarIdentity, Sidecars
from proxy.authority.signing import SigningKey
from proxy.authority.store import AUTHORITY_CHAIN, AuthorityStore, Minted, RequestRow
from proxy.console import add_console_routes
from proxy.control.auth import AuthThrottle
from proxy.control.paging import list_query, page_headers
from proxy.keys import Operators
from proxy.notify import NotifyConfig
from proxy.warrant_requests import PREVIEW_BYTES, warrant_constraints

log = logging.getLogger("vienna.authority")
MAX_JSON = 1 << 20
MAX_AUDIT_BATCH_BYTES = 4 << 20  # the sidecar sends batches of at most 1 MiB; parsing more costs memory
MAX_AUDIT_BATCH = 1000
MAX_USES_CAP = 1000
KEY_CACHE_SECONDS = 5.0


class AuthorityMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.approvals = Counter(
            "vienna_approvals_total", "Operator votes, by decision", ("decision",), registry=r
        )
        self.pending = Gauge(
            "vienna_warrant_requests_pending", "Warrant requests waiting for operators", registry=r
        )
        self.requests_opened = Counter(
            "vienna_warrant_requests_total",
            "Warrant requests opened by sidecars, by result",
            ("result",),
            registry=r,
        )
        self.consumes = Counter(
            "vienna_warrant_consumes_total",
            "Warrant uses asked for by sidecars, by result",
            ("result",),
            registry=r,
        )
        self.audit_received = Counter(
            "vienna_audit_events_received_total", "Shipped audit events, by result", ("result",), registry=r
        )
        self.chain_problems = Counter(
            "vienna_audit_chain_problems_total",
            "Gaps and bad links found in shipped chains",
            ("kind",),
            registry=r,
        )
        self.notifications = Counter(
            "vienna_notifications_total",
            "Webhook notification attempts, by result (delivered, retried, failed)",
            ("result",),
            registry=r,
        )
        self.store_errors = Counter(
            "vienna_authority_store_errors_total", "Store calls that failed", registry=r
        )
        self.consume_seconds = Histogram(
            "vienna_warrant_consume_seconds",
            "Time to verify and count one warrant use",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Authority:
    store: AuthorityStore
    operators: Operators
    sidecars: Sidecars
    signing: SigningKey
    public_url: str
    pending_ttl: float = 3600.0
    max_pending: int = 100
    metrics: AuthorityMetrics = field(default_factory=AuthorityMetrics)
    throttle: AuthThrottle = field(default_factory=AuthThrottle)
    listening: bool = False
    notify: NotifyConfig | None = None
    wake: Callable[[], None] | None = None
    _keys: WarrantKeys | None = None
    _keys_at: float = 0.0

    @staticmethod
    def clock() -> float:
        return time.time()

    def url(self, request_id: str) -> str:
        return f"{self.public_url}/v1/warrant-requests/{request_id}"

    async def verify_keys(self, *, refresh: bool = False) -> WarrantKeys:
        """Public keys of every replica (from the store), so a warrant any replica minted verifies here."""
        now = self.clock()
        if self._keys is None or refresh or now - self._keys_at > KEY_CACHE_SECONDS:
            public = {self.signing.kid: self.signing.private.public_key()}
            for jwk in await self.store.jwks(now):
                try:
                    kid, key = public_key_from_jwk(jwk)
                except ValueError:
                    continue
                public.setdefault(kid, key)
            self._keys, self._keys_at = WarrantKeys({}, None, public_keys=public), now
        return self._keys

    def mint(self, row: RequestRow, now: float) -> Minted:
        state = row.state
        constraints = constraints_from_claim(row.constraints)
        ttl = int(row.terms.get("ttl_seconds", WARRANT_TTL_CAPS[Tier.T3]))
        claims = approved_claims(
            state, constraints, ttl_seconds=ttl, now=now, jti="wt_" + secrets.token_urlsafe(16)
        )
        token = mint_eddsa(claims, self.signing.private, self.signing.kid)
        return Minted(token=token, jti=claims.jti, exp=float(claims.exp), kid=self.signing.kid)

    def announce(self, event: str, row: RequestRow, now: float) -> list[tuple[Any, ...]]:
        """Outbox rows for one event (called inside the store's transaction)."""
        if self.notify is None:
            return []
        if self.wake is not None:
            self.wake()
        view: dict[str, Any] = approvals.as_dict(row.state, now)
        view.update(
            url=self.url(row.state.id),
            request=dict(row.request),
            rule=row.rule_id,
            sidecar=row.sidecar,
            constraints=dict(row.constraints),
        )
        return self.notify.rows(event, view, now)

    async def view(self, row: RequestRow, *, include_warrant: bool) -> dict[str, Any]:
        body: dict[str, Any] = approvals.as_dict(row.state, self.clock())
        body["url"] = self.url(row.state.id)
        body["request"] = dict(row.request)
        body["rule"] = row.rule_id
        body["sidecar"] = row.sidecar
        body["constraints"] = dict(row.constraints)
        if row.warrant_id is not None:
            body["warrant_id"] = row.warrant_id
            body["warrant_expires_at"] = row.warrant_expires_at
            body["warrant_uses"] = await self.store.uses(row.warrant_id)
        if include_warrant and row.warrant is not None and body["status"] == RequestStatus.APPROVED.value:
            body["warrant"] = row.warrant
        return body


AUTHORITY: web.AppKey[Authority] = web.AppKey("authority")


class _BadRequest(Exception):
    pass


def _error(status: int, error: str, reason: str, **extra: Any) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="vienna"'} if status == 401 else {}
    extra_headers = extra.pop("headers", None) or {}
    return web.json_response(
        {"error": error, "reason": reason, **extra}, status=status, headers={**headers, **extra_headers}
    )


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except _BadRequest as exc:
        return _error(400, "bad_request", str(exc), reason_code="request.invalid")
    except StoreError as exc:
        request.app[AUTHORITY].metrics.store_errors.inc()
        return _error(
            503,
            "unavailable",
            f"the authority's store is unavailable: {exc}",
            reason_code="store.unavailable",
        )
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, "bad_request" if exc.status < 500 else "error", exc.reason)
        raise


async def _json(request: web.Request, limit: int = MAX_JSON) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        return _raise_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():  # a chunked body has no Content-Length to trust
        size += len(chunk)
        if size > limit:
            return _raise_too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise _BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


def _raise_too_large(limit: int) -> dict[str, Any]:
    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=limit + 1)


def _token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _refused_auth(request: web.Request, who: str, token: str | None) -> web.Response:
    authority = request.app[AUTHORITY]
    client, now = request.remote or "unknown", time.monotonic()
    wait = authority.throttle.retry_after(client, now)
    if wait > 0:
        return _error(
            429,
            "rate_limited",
            f"too many failed authentications from {client}; retry in {int(wait) + 1} s",
            reason_code="auth.throttled",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    authority.throttle.failed(client, now)
    if token is None:
        return _error(401, "unauthorized", f"a {who} bearer token is required", reason_code="auth.missing")
    return _error(401, "unauthorized", "token not recognised", reason_code="auth.unrecognised")


def _operator(request: web.Request) -> str | web.Response:
    token = _token(request)
    name = request.app[AUTHORITY].operators.authenticate(token) if token else None
    return name if name is not None else _refused_auth(request, "operator", token)


def _sidecar(request: web.Request) -> SidecarIdentity | web.Response:
    token = _token(request)
    identity = request.app[AUTHORITY].sidecars.authenticate(token) if token else None
    return identity if identity is not None else _refused_auth(request, "sidecar", token)


def _not_for(identity: SidecarIdentity, agent: str) -> web.Response:
    return _error(
        403,
        "forbidden",
        f"sidecar {identity.name!r} is not listed for agent {agent[:80]!r}",
        reason_code="sidecar.agent_not_allowed",
    )


# --- anyone -------------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    store_ok, problem = True, None
    try:
        await authority.store.ping()
    except StoreError as exc:
        store_ok, problem = False, str(exc)
    ready = store_ok and authority.listening
    body: dict[str, Any] = {
        "status": "ready" if ready else "not_ready",
        "store": authority.store.db.dialect,
        "store_reachable": store_ok,
        "signing_kid": authority.signing.kid,
    }
    if problem:
        log.error("readiness: the store does not answer: %s", problem)  # the details stay in the log
        body["reason"] = "the store does not answer"
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    try:
        authority.metrics.pending.set(await authority.store.count_pending(authority.clock()))
    except StoreError:
        authority.metrics.store_errors.inc()
    return web.Response(
        body=authority.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def keys(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    listed = await authority.store.jwks(authority.clock())
    if not any(jwk.get("kid") == authority.signing.kid for jwk in listed):
        listed.append(authority.signing.jwk)
    return web.json_response({"keys": listed}, headers={"Cache-Control": "max-age=60"})


async def get_warrant_request(request: web.Request) -> web.Response:
    """§7's status read, for the sidecars and operators of the fleet (the agent asks its own sidecar,
    which asks here): a sidecar listed for the request's agent also gets the warrant once approved,
    an operator sees everything but the warrant, anyone else nothing."""
    authority = request.app[AUTHORITY]
    token = _token(request)
    identity = authority.sidecars.authenticate(token) if token else None
    operator = authority.operators.authenticate(token) if token and identity is None else None
    if identity is None and operator is None:
        return _refused_auth(request, "sidecar or operator", token)
    row = await authority.store.get_request(request.match_info["id"])
    if row is None:
        return _error(404, "not_found", "no such warrant request", reason_code="warrant_request.unknown")
    if identity is not None and not identity.may_act_for(row.state.agent):
        return _not_for(identity, row.state.agent)
    return web.json_response(await authority.view(row, include_warrant=identity is not None))


# --- operators ----------------------------------------------------------------------------------


async def list_warrant_requests(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    who = _operator(request)
    if isinstance(who, web.Response):
        return who
    try:
        query = list_query(request)
    except ValueError as exc:
        raise _BadRequest(str(exc)) from None
    rows, total = await authority.store.list_requests(
        query.status, authority.clock(), limit=query.limit, offset=query.offset
    )
    items = [await authority.view(row, include_warrant=False) for row in rows]
    headers = page_headers(request, query, len(rows), total)
    return web.json_response(items, headers=headers)


async def _vote(request: web.Request, approve: bool) -> web.Response:
    authority = request.app[AUTHORITY]
    operator = _operator(request)
    if isinstance(operator, web.Response):
        return operator
    body = await _json(request)
    justification = body.get("justification", "")
    if not isinstance(justification, str):
        raise _BadRequest("'justification' must be a string")
    try:
        row = await authority.store.vote(
            request.match_info["id"],
            operator=operator,
            approve=approve,
            justification=justification,
            now=authority.clock(),
            mint=authority.mint,
            announce=authority.announce,
        )
    except KeyError:
        return _error(404, "not_found", "no such warrant request", reason_code="warrant_request.unknown")
    except ApprovalError as exc:
        return _error(exc.http_status, exc.code.split(".")[-1], exc.reason, reason_code=exc.code)
    authority.metrics.approvals.labels(decision="approve" if approve else "deny").inc()
    return web.json_response(await authority.view(row, include_warrant=False))


async def approve(request: web.Request) -> web.Response:
    return await _vote(request, True)


async def deny(request: web.Request) -> web.Response:
    return await _vote(request, False)


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query.get(name, str(default)))
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise _BadRequest(f"{name} must be {low}-{high}")
    return value


async def audit(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    who = _operator(request)
    if isinstance(who, web.Response):
        return who
    selector = request.query.get("sidecar") or AUTHORITY_CHAIN
    after = _int_query(request, "after", 0, 0, 2**62)
    limit = _int_query(request, "limit", 100, 1, 10_000)
    chains = await authority.store.chains_of(selector)
    if len(chains) > 1 and after == 0 and len(chains) <= 100:
        # Several chains under one name (replicas sharing a token): all of them at once when they
        # fit in one answer, each event naming its chain. Paged, `after` would be ambiguous.
        everything: list[dict[str, Any]] = []
        for name in chains:
            found_in = await authority.store.events(name, after=0, limit=limit + 1 - len(everything))
            everything += [{**event.as_dict(), "chain": name} for _, event in found_in]
            if len(everything) > limit:
                break
        if len(everything) <= limit:
            return web.json_response(
                {"events": everything, "next_after": 0, "head_seq": None, "chains": chains}
            )
    if len(chains) > 1:
        # `after` is a position in one chain: paging several at once would skip events silently.
        return _error(
            400,
            "bad_request",
            f"sidecar {selector[:80]!r} has {len(chains)} chains (one per data dir); ask for one of them",
            reason_code="audit.ambiguous_sidecar",
            chains=chains[:1000],
        )
    if not chains:
        return web.json_response({"events": [], "next_after": after, "head_seq": 0, "chain": None})
    chain = chains[0]
    found = await authority.store.events(chain, after=after, limit=limit)
    events = [{**event.as_dict(), "chain": chain} for _, event in found]
    head = await authority.store.head(chain)
    return web.json_response(
        {
            "events": events,
            "next_after": events[-1]["seq"] if events else after,
            "head_seq": head[0],
            "chain": chain,
        }
    )


async def audit_chains(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    who = _operator(request)
    if isinstance(who, web.Response):
        return who
    limit = _int_query(request, "limit", 1000, 1, 1000)
    offset = _int_query(request, "offset", 0, 0, 2**62)
    chains = await authority.store.chains(limit=limit, offset=offset)
    return web.json_response(
        {
            "chains": [
                {
                    "chain": c.chain,
                    "sidecar": c.sidecar,
                    "head_seq": c.head_seq,
                    "head_hash": c.head_hash,
                    "problems": c.problems,
                    "recent_problems": list(c.recent_problems),
                    "updated_at": c.updated_at,
                }
                for c in chains
            ]
        }
    )


# --- sidecars -----------------------------------------------------------------------------------


async def whoami(request: web.Request) -> web.Response:
    identity = _sidecar(request)
    if isinstance(identity, web.Response):
        return identity
    return web.json_response({"name": identity.name, "agents": sorted(identity.agents)})


def _str_field(body: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > 1000:
        raise _BadRequest(f"'{key}' must be a non-empty string")
    return value


async def open_warrant_request(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    identity = _sidecar(request)
    if isinstance(identity, web.Response):
        return identity
    body = await _json(request)
    agent = _str_field(body, "agent")
    assert agent is not None
    if not identity.may_act_for(agent):
        return _not_for(identity, agent)
    try:
        tier = Tier.parse(str(body.get("tier")))
    except ValueError:
        raise _BadRequest("'tier' must be T2 or T3") from None
    if not tier.needs_warrant:
        raise _BadRequest("only T2 and T3 requests need a warrant")
    intent_body, canonical = body.get("intent"), body.get("request")
    if not isinstance(intent_body, dict) or not isinstance(canonical, dict):
        raise _BadRequest("'intent' and 'request' must be objects")
    action, target = intent_body.get("action"), intent_body.get("target", "")
    rule = intent_body.get("rule")
    if (
        not isinstance(action, str)
        or not isinstance(target, str)
        or not (rule is None or isinstance(rule, str))
    ):
        raise _BadRequest("'intent' needs a string action and target")
    terms = body.get("terms") or {}
    if not isinstance(terms, dict):
        raise _BadRequest("'terms' must be an object")
    ttl, max_uses, bind = terms.get("ttl_seconds"), terms.get("max_uses", 1), terms.get("bind", "exact")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not ttl >= 1:
        raise _BadRequest("'terms.ttl_seconds' must be a positive integer")
    if not isinstance(max_uses, int) or isinstance(max_uses, bool) or not 1 <= max_uses <= MAX_USES_CAP:
        raise _BadRequest(f"'terms.max_uses' must be an integer from 1 to {MAX_USES_CAP}")
    if bind not in {b.value for b in Bind}:
        raise _BadRequest("'terms.bind' must be exact, path or host")
    canonical = _redacted_request(canonical)
    intent = Intent(action=action, target=target, rule=rule)
    agreed = WarrantTerms(ttl_seconds=min(ttl, WARRANT_TTL_CAPS[tier]), max_uses=max_uses, bind=Bind(bind))
    # The constraints are derived here, from the very request operators are shown (and the bind the
    # rule asks for): a sidecar cannot show one request and have another bound.
    try:
        constraints = warrant_constraints(canonical, intent, agreed).as_claim()
    except (KeyError, TypeError, ValueError) as exc:
        raise _BadRequest(f"'request' is not a complete request: {exc}") from None
    revision = body.get("policy_revision", "")
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "agent": agent,
                "tier": tier.value,
                "intent": intent.as_dict(),
                "request": canonical,
                "terms": {"ttl_seconds": agreed.ttl_seconds, "max_uses": max_uses, "bind": bind},
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
    ).hexdigest()
    opened = await authority.store.open_request(
        sidecar=identity.name,
        agent=agent,
        fingerprint=fingerprint,
        tier=tier,
        intent=intent,
        request=canonical,
        rule_id=body.get("rule_id") if isinstance(body.get("rule_id"), str) else None,
        # the tier's cap holds whatever a sidecar asks for
        terms={"ttl_seconds": agreed.ttl_seconds, "max_uses": max_uses, "bind": bind},
        constraints=constraints,
        now=authority.clock(),
        pending_ttl=authority.pending_ttl,
        max_pending=authority.max_pending,
        policy_revision=revision if isinstance(revision, str) else "",
        announce=authority.announce,
    )
    if opened is None:
        authority.metrics.requests_opened.labels(result="limit").inc()
        return _error(
            429,
            "denied",
            f"this agent already has {authority.max_pending} pending warrant requests; wait for operators",
            reason_code="warrant_request.limit",
            limit=authority.max_pending,
        )
    row, created = opened
    authority.metrics.requests_opened.labels(result="created" if created else "reused").inc()
    view = await authority.view(row, include_warrant=True)
    return web.json_response({**view, "created": created}, status=201 if created else 200)


def _redacted_request(canonical: dict[str, Any]) -> dict[str, Any]:
    """What the authority keeps and shows of a request: secret-named fields redacted (headers,
    intent params), the body preview at most 4 KiB. The URL and query stay as sent: a warrant
    binds the exact query."""
    cleaned = redact(canonical)
    assert isinstance(cleaned, dict)
    preview = cleaned.get("body_preview")
    if isinstance(preview, str) and len(preview.encode()) > PREVIEW_BYTES:
        cleaned["body_preview"] = preview.encode()[:PREVIEW_BYTES].decode("utf-8", "ignore") + "…"
    return cleaned


async def consume_warrant(request: web.Request) -> web.Response:
    """Count one use of a warrant this authority minted, for a sidecar listed for its agent."""
    authority = request.app[AUTHORITY]
    started = time.perf_counter()
    identity = _sidecar(request)
    if isinstance(identity, web.Response):
        return identity
    body = await _json(request)
    token = body.get("warrant")
    if not isinstance(token, str):
        raise _BadRequest("'warrant' must be a string")
    now = authority.clock()
    result = read_warrant(token, keys=await authority.verify_keys(), now=now)
    if isinstance(result, WarrantRefused) and result.code == "warrant.unknown_key":
        result = read_warrant(token, keys=await authority.verify_keys(refresh=True), now=now)
    if isinstance(result, WarrantRefused):
        authority.metrics.consumes.labels(result="invalid").inc()
        return _error(403, "warrant_invalid", result.reason, reason_code=result.code)
    claims = result.claims
    if not identity.may_act_for(claims.sub):
        authority.metrics.consumes.labels(result="forbidden").inc()
        return _not_for(identity, claims.sub)
    counted, uses = await authority.store.consume(
        claims.jti, claims.con.max_uses, sidecar=identity.name, agent=claims.sub, now=now
    )
    authority.metrics.consume_seconds.observe(time.perf_counter() - started)
    answer = {"consumed": counted, "warrant_id": claims.jti, "uses": uses, "max_uses": claims.con.max_uses}
    if not counted:
        authority.metrics.consumes.labels(result="replayed").inc()
        return _error(
            409,
            "warrant_invalid",
            "warrant already used up (replay)",
            reason_code="warrant.replayed",
            **answer,
        )
    authority.metrics.consumes.labels(result="consumed").inc()
    return web.json_response(answer)


def _chain_id(identity: SidecarIdentity, request: web.Request, given: object) -> str:
    if not isinstance(given, str) or not given or len(given) > 200 or "/" in given:
        raise _BadRequest("'chain' must be the sidecar's id (from its data dir)")
    return f"{identity.name}/{given}"


async def audit_head(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    identity = _sidecar(request)
    if isinstance(identity, web.Response):
        return identity
    chain = _chain_id(identity, request, request.query.get("chain"))
    seq, hash_ = await authority.store.head(chain)
    return web.json_response({"chain": chain, "head_seq": seq, "head_hash": hash_})


async def receive_audit(request: web.Request) -> web.Response:
    authority = request.app[AUTHORITY]
    identity = _sidecar(request)
    if isinstance(identity, web.Response):
        return identity
    body = await _json(request, MAX_AUDIT_BATCH_BYTES)
    chain = _chain_id(identity, request, body.get("chain"))
    raw = body.get("events")
    if not isinstance(raw, list) or len(raw) > MAX_AUDIT_BATCH:
        raise _BadRequest(f"'events' must be a list of at most {MAX_AUDIT_BATCH} events")
    events: list[AuditEvent] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _BadRequest(f"events[{index}] must be an object")
        if not isinstance(item.get("ts"), float):
            # Stored as a float and served back as one: an integer ts would hash differently then.
            raise _BadRequest(
                f"events[{index}]: 'ts' must be a number with a fraction (seconds, as recorded)"
            )
        try:
            event = AuditEvent.from_dict(item)
        except (ValueError, TypeError) as exc:
            raise _BadRequest(f"events[{index}]: {exc}") from None
        if not identity.may_act_for(event.agent):
            return _not_for(identity, event.agent)
        events.append(event)
    received = await authority.store.receive(chain, identity.name, events, authority.clock())
    metrics = authority.metrics
    metrics.audit_received.labels(result="accepted").inc(received.accepted)
    metrics.audit_received.labels(result="duplicate").inc(received.duplicates)
    answer = {
        "chain": chain,
        "accepted": received.accepted,
        "duplicates": received.duplicates,
        "head_seq": received.head_seq,
        "head_hash": received.head_hash,
    }
    if received.problem is not None:
        metrics.audit_received.labels(result="rejected").inc(
            len(events) - received.accepted - received.duplicates
        )
        metrics.chain_problems.labels(kind=received.problem).inc()
        return _error(
            409,
            "audit_rejected",
            f"event {received.problem_seq}: {received.detail}",
            reason_code=f"audit.{received.problem}",
            seq=received.problem_seq,
            **answer,
        )
    return web.json_response(answer)


def make_authority_app(authority: Authority) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_AUDIT_BATCH_BYTES)
    app[AUTHORITY] = authority
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/keys", keys)
    app.router.add_get("/v1/warrant-requests", list_warrant_requests)
    app.router.add_get("/v1/warrant-requests/{id}", get_warrant_request)
    app.router.add_post("/v1/warrant-requests/{id}/approve", approve)
    app.router.add_post("/v1/warrant-requests/{id}/deny", deny)
    app.router.add_get("/v1/audit", audit)
    app.router.add_get("/v1/audit/chains", audit_chains)
    app.router.add_get("/v1/sidecar/whoami", whoami)
    app.router.add_post("/v1/sidecar/warrant-requests", open_warrant_request)
    app.router.add_post("/v1/warrants/consume", consume_warrant)
    app.router.add_get("/v1/audit/events/head", audit_head)
    app.router.add_post("/v1/audit/events", receive_audit)
    add_console_routes(app)
    return app
