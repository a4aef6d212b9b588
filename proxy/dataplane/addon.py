"""The enforcement addon: adapt → decide → act → record → observe. Every failure refuses; nothing fails open.

A request whose decision does not depend on its body is decided on its headers and its body streams
upstream (hashed on the way); otherwise the body is buffered (up to --max-body-bytes) and the decision
waits for it. Responses always stream. mitmproxy itself forwards, to the pinned address (pinning.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.http import HTTPMode

from policy import engine
from policy.classify import body_needed, mcp_endpoint
from policy.model import Decision, Request, Tier, Verdict
from policy.normalize import (
    AmbiguousRequest,
    build_request,
    hop_by_hop_names,
    normalize_host,
    normalize_method,
    overridden_method,
    parse_authority,
)
from policy.warrants import single_call
from proxy.answers import (
    DECISION_HEADER,
    DECISION_ID_HEADER,
    WARRANT_REQUEST_HEADER,
    WARRANT_REQUEST_URL_HEADER,
    deny_body,
    json_response,
    passback_headers,
    passback_reason,
    plain_error,
)
from proxy.authority_client import AuthorityRefused, AuthorityUnavailable
from proxy.dataplane import patches
from proxy.dataplane.exchange import Exchange, ExchangeWatch
from proxy.dataplane.mcp import ToolsListFilter, deny_tool, jsonrpc_refusal, mcp_body
from proxy.dataplane.pinning import AddressPins
from proxy.dataplane.tunnels import Tunnels
from proxy.secrets import SecretMissing
from proxy.store import AuditFull, StoreUnavailable
from proxy.warrant_requests import PendingLimit, canonical_request, constraints_preview

if TYPE_CHECKING:
    from proxy.runtime import Sidecar

log = logging.getLogger("vienna.addon")
WARRANT_HEADER = "vienna-warrant"
_TOOLS_LIST = "vienna.tools_list"
LOOP = "request.loop"
_EXCHANGE = "vienna.exchange"
_WEBSOCKET = "vienna.websocket"


@dataclass(frozen=True, slots=True)
class _Refusal(Exception):
    status: int
    error: str
    code: str
    reason: str


class EnforcementAddon:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        settings = sidecar.settings
        patches.install()  # JSON refusals, a bounded head, exchanges ended from outside their hooks
        self.pins = AddressPins(sidecar.listeners, settings.upstream_proxy_address)
        self.watch = ExchangeWatch(
            response_timeout=settings.response_timeout,
            idle_timeout=settings.idle_timeout,
            connect_timeout=settings.connect_timeout,
            finish=self._record_finished,
        )
        self.via = f"1.1 {sidecar.instance}"
        self.tunnels = Tunnels(sidecar, self.pins)
        # Pins and tunnels are addons of their own: mitmproxy registers an addon's `addons` with it,
        # so their hooks go straight to them.
        self.addons = [self.pins, self.tunnels]
        # Test-only fault injection, read once at start-up: with VIENNA_TEST_FAULT=addon the addon
        # raises right before forwarding an allowed request, so tests can prove that a raising addon
        # refuses instead of letting mitmproxy forward on its own. It can only ever refuse more.
        self._inject_fault = os.environ.get("VIENNA_TEST_FAULT") == "addon"
        if self._inject_fault:
            log.warning("VIENNA_TEST_FAULT=addon: every allowed request fails inside the addon (tests only)")

    def load(self, loader: Loader) -> None:
        # Bodies the decision needs are buffered; mitmproxy refuses (413, connection closed) one announced
        # or grown over --max-body-bytes. Streamed bodies (and every response) are not buffered at all.
        loader.master.options.update(body_size_limit=str(self.sidecar.settings.max_body_bytes))

    def running(self) -> None:
        self.watch.start()

    async def done(self) -> None:
        await self.watch.stop()

    # --- connection level ------------------------------------------------------------------------

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Only HTTP is ever relayed, except the raw tunnels passthrough rules open (tunnels.py)."""
        if self.tunnels.choose_layer(nextlayer):
            return
        chosen = nextlayer.layer
        if chosen is None:
            return
        if isinstance(chosen, layers.TCPLayer | layers.UDPLayer | layers.DNSLayer):
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """Refuse CONNECT to malformed, internal or own targets before any tunnel exists."""
        blocked = self._audit_blocked()
        if blocked is not None:
            flow.response = blocked
            return
        try:
            target = Request(
                method="CONNECT",
                scheme="https",
                host=normalize_host(flow.request.host),
                port=flow.request.port,
                path="/",
            )
            target = _with_address(target, await self._resolve(target))
            if self._is_loop(target):
                raise _loop_refusal(target)
            internal = engine.internal_destination_reason(target, self.sidecar.rules)
            if internal is not None:
                raise _Refusal(403, "denied", engine.INTERNAL_DESTINATION, internal)
            self.tunnels.connect(flow, target)
        except StoreUnavailable as exc:
            flow.response = self._store_unavailable(exc)
        except AmbiguousRequest as exc:
            flow.response = self._refuse_early(flow, _Refusal(400, "bad_request", exc.code, exc.reason))
        except _Refusal as refusal:
            flow.response = self._refuse_early(flow, refusal)
        except Exception:
            log.exception("CONNECT handling failed; refusing")
            flow.response = self._refuse_early(
                flow, _Refusal(403, "denied", "internal.error", "internal error; refused")
            )

    # --- request headers: checks, and the decision when it does not need the body ---------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.sidecar.inflight += 1
        try:
            blocked = self._audit_blocked()
            if blocked is not None:
                flow.metadata["vienna.seen"] = True
                flow.response = blocked
                return
            refusal = self._check_head(flow)
            if refusal is not None:
                flow.response = self._refuse_early(flow, refusal)
                return
            try:
                request, warrant = self._adapt(flow, body=b"")
            except AmbiguousRequest:
                return  # refused with its audit record in the request hook, once the body is in
            # A GET body is decided with it; a form POST may carry `_method`; with a method override the
            # decision must hold for the method sent too (whose rules may read the body).
            needs_body = (
                (_announces_body(flow.request) and request.method == "GET")
                or request.wire_method is not None
                or _is_form_post(flow.request)
            ) or body_needed(
                request, self.sidecar.rules, agent=self.sidecar.settings.agent_id, warrant=warrant is not None
            )
            if needs_body:
                length = flow.request.headers.get_all("content-length")
                limit = self.sidecar.settings.max_body_bytes
                if any(int(value) > limit for value in length if value.strip().isdigit()):
                    flow.response = self._refuse_early(flow, _body_too_large(limit))
                return  # decided in the request hook, with the buffered body
            flow.metadata["vienna.seen"] = True
            await self._decide_and_act(flow, request, warrant, streamed=True)
        except StoreUnavailable as exc:
            flow.response = self._store_unavailable(exc)
        except Exception:
            log.exception("request header check failed; refusing")
            flow.response = self._internal_error(flow)
        finally:
            self.sidecar.inflight -= 1

    def _check_head(self, flow: http.HTTPFlow) -> _Refusal | None:
        """Framing, upgrades and loops; drops hop-by-hop headers so what is classified is what is sent."""
        headers = flow.request.headers
        if _transfer_codings(flow.request) not in ([], ["chunked"]):
            # mitmproxy removes only the chunked framing; a body under another coding would be
            # forwarded as if it had none, so it is refused rather than changed.
            return _Refusal(
                400,
                "bad_request",
                "request.bad_framing",
                "transfer codings other than chunked are not relayed",
            )
        if flow.request.method.upper() == "HEAD" and _announces_body(flow.request):
            # Some upstreams ignore a body on HEAD and read it as the next request (a desync).
            return _Refusal(400, "bad_request", "request.body_on_head", "a HEAD request cannot carry a body")
        if any(self.sidecar.instance in value for value in headers.get_all("via")):
            return _Refusal(508, "denied", LOOP, "the request already passed through this sidecar (Via)")
        keep: frozenset[str] = frozenset()
        upgrade = [
            token.strip().lower() for value in headers.get_all("upgrade") for token in value.split(",")
        ]
        if upgrade:
            if upgrade == ["h2c"]:
                # h2c is an offer the client makes; declining it (by not passing it on) is always allowed.
                headers.pop("upgrade")
                headers.pop("http2-settings", None)
            elif upgrade == ["websocket"] and flow.request.method == "GET":
                flow.metadata[_WEBSOCKET] = True
                keep = frozenset({"connection", "upgrade"})
            else:
                return _Refusal(
                    403,
                    "denied",
                    "request.upgrade",
                    f"protocol upgrade to {', '.join(upgrade)} is not relayed",
                )
        if keep:
            tokens = [t.strip() for v in headers.get_all("connection") for t in v.split(",") if t.strip()]
            named = {t.lower() for t in tokens} - {"upgrade", "keep-alive", "close"}
            for name in named | {"keep-alive", "te", "trailer", "proxy-connection"}:
                headers.pop(name, None)
            for name in [k for k in headers if k.lower().startswith("proxy-")]:
                headers.pop(name, None)
            headers["connection"] = "Upgrade"
        else:
            fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers.fields]
            close = any(
                token.strip().lower() == "close"
                for value in headers.get_all("connection")
                for token in value.split(",")
            )
            for name in hop_by_hop_names(fields):
                headers.pop(name, None)
            if close:
                # mitmproxy reads the client's `Connection: close` from these same headers to close
                # after the answer; it stays (the one hop-by-hop token the upstream may also see).
                headers["connection"] = "close"
        return None

    # --- request: the decision that needs the body, or the end of a streamed one ----------------

    def error(self, flow: http.HTTPFlow) -> None:
        exchange = self.watch.pop(flow)
        if exchange is not None:
            message = flow.error.msg if flow.error is not None else "error"
            exchange.error = exchange.error or patches.protocol_reason_code(502, message)
            self._record_finished(exchange)
            return
        # Requests mitmproxy refused before our request hook (body over the limit, bad framing).
        if flow.metadata.get("vienna.seen") or flow.request is None or flow.error is None:
            return
        flow.metadata["vienna.seen"] = True
        try:
            self.sidecar.recorder.record(
                "decision",
                agent=self.sidecar.settings.agent_id,
                policy_revision=self.sidecar.rules.revision,
                payload={
                    "decision_id": "d_" + secrets.token_hex(8),
                    "decision": "bad_request",
                    "forwarded": False,
                    "reason_code": patches.protocol_reason_code(400, flow.error.msg),
                    "reason": flow.error.msg[:300],
                    "tier": "deny",
                    "request": {
                        "method": flow.request.method,
                        "host": flow.request.host,
                        "port": flow.request.port,
                        "path": flow.request.path[:300],  # as received: it was never normalised
                    },
                    "client": _peer(flow),
                },
            )
            self.sidecar.metrics.requests.labels(tier="deny", decision="bad_request", action="unknown").inc()
        except Exception:
            log.exception("could not record a refused request")

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.request.trailers:
            # Trailer fields arrive after the decision and would be sent after this hook unclassified
            # (a Vienna-Warrant or method override among them): they are dropped, never forwarded.
            flow.metadata["vienna.trailers_dropped"] = len(flow.request.trailers)
            flow.request.trailers = None
        exchange: Exchange | None = flow.metadata.get(_EXCHANGE)
        if exchange is not None:
            exchange.request_sent()  # a streamed body has gone upstream; now the response timeout runs
            return
        flow.metadata["vienna.seen"] = True
        if flow.response is not None:
            return
        self.sidecar.inflight += 1
        try:
            await self._enforce_buffered(flow)
        except StoreUnavailable as exc:
            flow.response = self._store_unavailable(exc)
        except Exception:
            log.exception("enforcement failed; refusing")
            flow.response = self._internal_error(flow)
        finally:
            self.sidecar.inflight -= 1
        if flow.response is None and flow.metadata.get(_EXCHANGE) is None:
            # never let mitmproxy contact the server on its own
            flow.response = plain_error(403, "denied", "internal.error", "no decision was reached; refused")

    async def _enforce_buffered(self, flow: http.HTTPFlow) -> None:
        sidecar = self.sidecar
        blocked = self._audit_blocked()  # it may have filled while the body was uploaded
        if blocked is not None:
            flow.response = blocked
            return
        raw_body = flow.request.raw_content
        if raw_body is not None and len(raw_body) > sidecar.settings.max_body_bytes:
            # Backstop only: mitmproxy's body_size_limit (set in load) refuses these before this hook.
            flow.response = self._refuse_early(flow, _body_too_large(sidecar.settings.max_body_bytes))
            return
        started = time.perf_counter()
        try:
            request, warrant = self._adapt(flow, body=raw_body or b"")
        except AmbiguousRequest as problem:
            decision_id = "d_" + secrets.token_hex(8)
            decision = engine.refuse_malformed(problem, rules=sidecar.rules)
            self._record_decision(flow, None, decision, decision_id, forwarded=False)
            self._observe(decision, started, "bad_request")
            flow.response = json_response(
                400, deny_body(decision, decision_id=decision_id), decision_id=decision_id
            )
            return
        await self._decide_and_act(flow, request, warrant, streamed=False, started=started)

    # --- decide and act (both hooks) -------------------------------------------------------------

    async def _decide_and_act(
        self,
        flow: http.HTTPFlow,
        request: Request,
        warrant: str | None,
        *,
        streamed: bool,
        started: float | None = None,
    ) -> None:
        sidecar = self.sidecar
        rules = sidecar.rules
        decision_id = "d_" + secrets.token_hex(8)
        started = time.perf_counter() if started is None else started
        unresolved: _Refusal | None = None
        try:
            request = _with_address(request, await self._resolve(request))
        except _Refusal as refusal:
            unresolved = refusal  # decided without an address; refused below only if it would forward

        decision = engine.decide(
            request,
            rules=rules,
            warrant=warrant,
            agent=sidecar.settings.agent_id,
            keys=sidecar.keys,
            now=sidecar.clock(),
            sidecar=sidecar.sidecar_id,
        )
        if (
            warrant is not None
            and sidecar.authority is not None
            and decision.reason_code in ("warrant.unknown_key", "warrant.no_keys")
        ):
            # Authority mode: a key id we do not hold may be a key the authority rotated in; ask it
            # (at most once a second), then decide again. Unreachable: refused, never let through.
            try:
                sidecar.keys = await sidecar.authority.refresh_keys()
            except AuthorityUnavailable as exc:
                self._refuse_with(flow, request, decision, decision_id, started, _authority_down(exc))
                return
            decision = engine.decide(
                request,
                rules=rules,
                warrant=warrant,
                agent=sidecar.settings.agent_id,
                keys=sidecar.keys,
                now=sidecar.clock(),
                sidecar=sidecar.sidecar_id,
            )
        if self._is_loop(request):
            self._refuse_with(flow, request, decision, decision_id, started, _loop_refusal(request))
            return
        if flow.metadata.get(_WEBSOCKET) and decision.verdict is not Verdict.DENIED:
            rule = rules.rule(decision.rule_id)
            if rule is None or not rule.websocket:
                upgrade = _Refusal(
                    403,
                    "denied",
                    "request.upgrade",
                    "WebSocket upgrades pass only where the matching rule says websocket: true",
                )
                self._refuse_with(flow, request, decision, decision_id, started, upgrade)
                return
        if unresolved is not None and (decision.forwards or sidecar.settings.dryrun):
            self._refuse_with(
                flow, request, decision, decision_id, started, unresolved, label="upstream_error"
            )
            return
        injected: list[tuple[str, str]] = []
        rule = rules.rule(decision.rule_id)
        if rule is not None and rule.inject_headers and (decision.forwards or sidecar.settings.dryrun):
            try:
                if request.scheme != "https" and not _loopback(request):
                    raise SecretMissing("a credential is injected over https only (or to loopback)")
                injected = [(name, sidecar.secrets.render(value)) for name, value in rule.inject_headers]
            except SecretMissing as missing:
                # (the message names the secret, never a value)
                unavailable = _Refusal(
                    503, "unavailable", "secret.unavailable", f"{missing}; refused (fail closed)"
                )
                self._refuse_with(flow, request, decision, decision_id, started, unavailable)
                return
        status, label, extra_headers, warrant_request = 200, decision.verdict.value, {}, None
        if decision.verdict is Verdict.ALLOW and decision.warrant_id is not None:
            assert warrant is not None
            try:
                not_consumed = await sidecar.passbacks.consume(
                    decision.warrant_id, decision.warrant_max_uses, warrant
                )
            except AuthorityUnavailable as exc:
                self._refuse_with(flow, request, decision, decision_id, started, _authority_down(exc))
                return
            if not_consumed is not None:
                decision = _replace_verdict(
                    decision, Verdict.WARRANT_INVALID, not_consumed.code, not_consumed.reason
                )
                label = decision.verdict.value
        elif decision.verdict is Verdict.ALLOW and decision.tier is Tier.T1:
            mcp = mcp_body(request)
            retry_after = self._rate_limited(decision, len(mcp.calls) if mcp is not None else 1)
            if retry_after > 0:
                status, label = 429, "rate_limited"
                extra_headers = {"Retry-After": str(max(1, int(retry_after + 0.999)))}
        if (
            decision.verdict is Verdict.WARRANT_REQUIRED
            and not sidecar.settings.dryrun
            and rule is not None
            and rule.warrant.bind == "mcp"
            and single_call(request) is None
        ):
            batch = _Refusal(
                403,
                "warrant_required",
                "mcp.batch_needs_warrant",
                f"{decision.reason}; a warrant binds one tool call: send the tools/call on its own to have it approved",
            )
            self._refuse_with(flow, request, decision, decision_id, started, batch)
            return
        if decision.verdict is Verdict.WARRANT_REQUIRED and not sidecar.settings.dryrun:
            # (in dryrun the request is forwarded anyway: operators get no request to approve)
            try:
                opened = await sidecar.passbacks.open(
                    agent=sidecar.settings.agent_id, decision=decision, canonical=canonical_request(request)
                )
            except PendingLimit as full:
                limit = _Refusal(429, "denied", "warrant_request.limit", str(full))
                self._refuse_with(flow, request, decision, decision_id, started, limit, label="rate_limited")
                return
            except AuthorityUnavailable as exc:
                self._refuse_with(flow, request, decision, decision_id, started, _authority_down(exc))
                return
            except AuthorityRefused as refused:
                code = str(refused.body.get("reason_code") or "authority.refused")
                reason = f"the authority refused this sidecar's warrant request: {refused.body.get('reason')}"
                self._refuse_with(
                    flow, request, decision, decision_id, started, _Refusal(403, "denied", code, reason)
                )
                return
            warrant_request = opened.summary

        if warrant is not None and decision.tier.needs_warrant:
            valid = decision.verdict is Verdict.ALLOW
            result = "valid" if valid else decision.reason_code.removeprefix("warrant.")
            sidecar.metrics.warrant_checks.labels(result=result).inc()
        forwards = decision.forwards and status == 200
        dryrun_forward = (
            not forwards and sidecar.settings.dryrun and decision.verdict is not Verdict.BAD_REQUEST
        )

        # record: the intent (queued), then the decision, committed together before anything is forwarded
        sidecar.recorder.record(
            "intent",
            agent=sidecar.settings.agent_id,
            policy_revision=decision.policy_revision,
            payload={
                "decision_id": decision_id,
                "intent": decision.intent.as_dict(),
                "tier": decision.tier.value,
                "source": "proxy",  # the request itself is in the decision event (same decision_id)
            },
            durable=False,
        )
        self._record_decision(
            flow,
            request,
            decision,
            decision_id,
            forwarded=forwards or dryrun_forward,
            label=label,
            warrant_request=warrant_request,
            would_deny=dryrun_forward,
            streamed=streamed,
            durable=False,
        )
        if sidecar.settings.durable_audit:
            try:
                # committed before anything is forwarded (or answered), in one commit with every
                # decision taken in the same turn of the event loop
                await sidecar.recorder.committed()
            except StoreUnavailable as exc:
                # The queued decision says what was decided; say that it was not carried out.
                self._record_execution(request, decision, decision_id, status=503, error=_store_code(exc))
                raise
        self._observe(decision, started, label)

        if not (forwards or dryrun_forward):
            if status == 429:
                body = deny_body(decision, error="denied", decision_id=decision_id)
                body["reason"] = f"rule {decision.rule_id!r} allows {self._limit_text(decision)}; retry later"
                body["reason_code"] = "policy.rate_limited"
                flow.response = self._answer(request, 429, body, decision_id, extra_headers)
                return
            extra = None
            if warrant_request is not None:
                extra = {
                    "instruction": "wait for operators to approve the warrant request, then retry this exact request "
                    "with the header Vienna-Warrant: <warrant>",
                    "constraints": constraints_preview(request, decision, rules),
                }
            body = deny_body(decision, warrant_request=warrant_request, decision_id=decision_id, extra=extra)
            headers: dict[str, str] = {}
            if warrant_request is not None:
                body["reason"] = passback_reason(decision, warrant_request)
                headers = passback_headers(warrant_request)
            flow.response = self._answer(request, decision.verdict.http_status, body, decision_id, headers)
            if warrant_request is not None and flow.response.status_code != 200:
                # The HTTP/1 status line too: `requests`' raise_for_status and curl -v print its reason.
                flow.response.reason = f"Warrant Required ({warrant_request['id']})"
            return
        try:
            if self._inject_fault:
                raise RuntimeError("injected fault (VIENNA_TEST_FAULT=addon)")
            self._forward(
                flow,
                request,
                decision,
                decision_id,
                streamed=streamed,
                would_deny=dryrun_forward,
                injected=injected,
            )
        except Exception:
            # The decision already says "forwarded": say what became of it before refusing.
            self._record_execution(request, decision, decision_id, status=0, error="internal.error")
            raise

    def _forward(
        self,
        flow: http.HTTPFlow,
        request: Request,
        decision: Decision,
        decision_id: str,
        *,
        streamed: bool,
        would_deny: bool,
        injected: list[tuple[str, str]] | None = None,
    ) -> None:
        """Hand the request to mitmproxy exactly as classified, to the checked address only."""
        assert request.address is not None
        data = flow.request.data
        data.method = (request.wire_method or request.method).encode()  # an override header stays as sent
        data.host = request.host  # the name (for SNI and Host); the connection goes to the pinned address
        data.port = request.port
        data.path = (request.path + (f"?{request.query}" if request.query else "")).encode()
        if not (flow.request.is_http2 or flow.request.is_http3):
            data.authority = b""  # origin-form upstream: the destination is Host (and the pinned address)
        headers = flow.request.headers
        headers.pop(WARRANT_HEADER, None)
        flow.request.host_header = request.authority  # the name as classified (127.1 goes up as 127.0.0.1)
        if "transfer-encoding" in headers:
            headers["transfer-encoding"] = "chunked"  # the one coding relayed, spelled so every parser agrees
        headers.add("Via", self.via)
        for name, value in injected or ():
            headers.pop(name, None)  # every header of that name the agent sent goes first
            headers[name] = value  # the credential: in the forwarded request only, never recorded
        mcp = mcp_body(request) if mcp_endpoint(request, self.sidecar.rules) else None
        if mcp is not None and mcp.lists_tools:
            ids = {m.id for m in mcp.messages if m.method == "tools/list" and isinstance(m.id, (str, int))}
            if ids:
                flow.metadata[_TOOLS_LIST] = ids
                headers.pop("accept-encoding", None)  # the answer is read (to filter it): ask for it plain
        self.pins.pin(flow.client_conn, request.host, request.port, request.address)
        upstream = self.sidecar.settings.upstream_proxy_address
        if upstream is not None:
            flow.server_conn.via = ("http", upstream)
        exchange = Exchange(
            flow=flow,
            request=request,
            decision=decision,
            decision_id=decision_id,
            streamed_body=streamed,
            max_response=self.sidecar.settings.max_response_bytes,
            on_overflow=self.watch.overflow,
        )
        flow.metadata[_EXCHANGE] = exchange
        flow.metadata[patches.UPSTREAM_ERROR_ANSWER] = lambda status, message: self._upstream_error_answer(
            exchange, status, message
        )
        flow.metadata["vienna.decision"] = "would-deny" if would_deny else "allow"
        self.watch.add(exchange)
        if streamed:
            flow.request.stream = exchange.request_chunk
        else:
            exchange.request_sent()

    def _upstream_error_answer(self, exchange: Exchange, status: int, message: str) -> http.Response:
        code = exchange.error or patches.protocol_reason_code(status, message)
        error = "upstream_timeout" if status == 504 else "upstream_error"
        body = deny_body(exchange.decision, error=error, decision_id=exchange.decision_id)
        body.update(reason=f"upstream {exchange.request.authority} failed: {message[:300]}", reason_code=code)
        return json_response(status, body, decision_id=exchange.decision_id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(_EXCHANGE)
        if exchange is None or flow.response is None:
            return
        try:
            exchange.response_started(flow.response.status_code)
            limit = exchange.max_response
            length = flow.response.headers.get("content-length", "")
            if limit and length.strip().isdigit() and int(length) > limit:
                # Known to be too long before a byte is relayed: refuse whole rather than cut.
                exchange.error = "response.too_large"
                body = deny_body(exchange.decision, error="upstream_error", decision_id=exchange.decision_id)
                body.update(
                    reason=f"the upstream response ({length} bytes) is over --max-response-bytes {limit}",
                    reason_code="response.too_large",
                )
                self.watch.abort(
                    exchange, "response.too_large", json_response(502, body, decision_id=exchange.decision_id)
                )
                return
            flow.response.stream = exchange.response_chunk
            list_ids = flow.metadata.get(_TOOLS_LIST)
            if list_ids and flow.response.headers.get("content-encoding", "identity").lower() == "identity":
                kind = flow.response.headers.get("content-type", "").split(";")[0].strip().lower()
                if kind in ("application/json", "text/event-stream"):
                    flow.response.headers.pop("content-length", None)  # the answer may get shorter
                    flow.response.stream = ToolsListFilter(
                        exchange.response_chunk,
                        sse=kind == "text/event-stream",
                        list_ids=set(list_ids),
                        keep=deny_tool(self.sidecar.rules, exchange.request, self.sidecar.settings.agent_id),
                    )
            flow.response.headers[DECISION_HEADER] = flow.metadata.get("vienna.decision", "allow")
            # Only the sidecar names warrant requests: an upstream's copies of these headers would
            # send SDKs to wait on (and fetch) a URL of the upstream's choosing.
            for name in (WARRANT_REQUEST_HEADER, WARRANT_REQUEST_URL_HEADER):
                flow.response.headers.pop(name, None)
            flow.response.headers[DECISION_ID_HEADER] = exchange.decision_id
        except Exception:
            log.exception("response headers failed; cutting the exchange")
            self.watch.abort(exchange, "internal.error", None)

    def response(self, flow: http.HTTPFlow) -> None:
        exchange = self.watch.pop(flow)
        if exchange is not None:
            self._record_finished(exchange)

    def _record_finished(self, exchange: Exchange) -> None:
        if exchange.finished:
            return
        exchange.finished = True
        try:
            if exchange.response_at is not None:
                self.sidecar.metrics.upstream_seconds.observe(exchange.response_at - exchange.started)
            self._record_execution(
                exchange.request,
                exchange.decision,
                exchange.decision_id,
                status=exchange.status,
                error=exchange.error,
                exchange=exchange,
            )
        except Exception:
            log.exception("could not record an execution")

    def _adapt(self, flow: http.HTTPFlow, *, body: bytes) -> tuple[Request, str | None]:
        """The request exactly as it will be forwarded; disagreeing names are refused, never guessed."""
        data = flow.request
        scheme = data.scheme
        if scheme not in ("http", "https"):
            raise AmbiguousRequest("request.bad_target", f"scheme {scheme!r} is not relayed")
        host_headers = data.headers.get_all("host")
        if (data.is_http2 or data.is_http3) and data.authority and data.authority not in host_headers:
            # :authority is HTTP/2's Host header; mitmproxy routes by the CONNECT target, so they must agree
            host_headers = [*host_headers, data.authority]
        if len(host_headers) > 1:
            raise AmbiguousRequest("request.host_mismatch", "more than one Host header")
        if not (data.is_http2 or data.is_http3) and data.authority:
            # An absolute-form target inside a tunnel (or in transparent mode): mitmproxy keeps it, and
            # upstreams route by it rather than by Host, so it must name the destination decided on.
            target = parse_authority(data.authority, scheme)
            if self.sidecar.settings.mode == "transparent":
                expected = parse_authority(host_headers[0], scheme) if host_headers else None
            else:
                expected = (normalize_host(data.host), data.port)
            if target != expected:
                raise AmbiguousRequest(
                    "request.host_mismatch",
                    f"request target {data.authority!r} disagrees with the destination {data.host}:{data.port}",
                )
        header_authority = parse_authority(host_headers[0], scheme) if host_headers else None
        sni = flow.client_conn.sni if flow.client_conn.tls else None
        if self.sidecar.settings.mode == "transparent":
            # mitmproxy gives the original destination IP as request.host; the name comes from Host/SNI
            # and is resolved by us, so the connection goes to the address we checked for that name.
            if header_authority is not None:
                host, port = header_authority[0], data.port
            elif sni:
                host, port = normalize_host(sni), data.port
            else:
                host, port = normalize_host(data.host), data.port
        else:
            host, port = normalize_host(data.host), data.port
            if header_authority is not None and header_authority != (host, port):
                raise AmbiguousRequest(
                    "request.host_mismatch",
                    f"Host header {host_headers[0]!r} disagrees with the request target {host}:{port}",
                )
        if sni and normalize_host(sni) != host:
            raise AmbiguousRequest(
                "request.host_mismatch", f"TLS server name {sni!r} disagrees with the request host {host}"
            )
        warrants = data.headers.get_all(WARRANT_HEADER)
        if len(warrants) > 1:
            raise AmbiguousRequest("request.duplicate_warrant", "more than one Vienna-Warrant header")
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in data.headers.fields]
        content_types = data.headers.get_all("content-type")
        if len(content_types) > 1 or len(data.headers.get_all("content-encoding")) > 1:
            # which one decides how the body is parsed differs between parsers
            raise AmbiguousRequest(
                "request.ambiguous_parameter", "more than one Content-Type or Content-Encoding"
            )
        is_form = bool(content_types) and content_types[0].split(";")[0].strip().lower() == _FORM
        override = overridden_method(
            headers,
            query=data.path.partition("?")[2],
            form=body.decode("utf-8", "replace") if is_form and body else None,
        )
        request = build_request(
            method=override or data.method,
            scheme=scheme,
            host=host,
            port=port,
            target=data.path,
            headers=headers,
            body=body,
        )
        if override is not None:
            request = replace(request, wire_method=normalize_method(data.method))
        return request, (warrants[0].strip() if warrants else None)

    async def _resolve(self, request: Request) -> str:
        destinations = self.sidecar.destinations
        try:
            addresses = await destinations.lookup(request.host, request.port)
        except OSError as exc:
            raise _Refusal(
                502, "upstream_error", "upstream.dns", f"cannot resolve {request.host}: {exc}"
            ) from None
        return destinations.choose(addresses)

    def _is_loop(self, request: Request) -> bool:
        listeners = self.sidecar.listeners
        return listeners.is_own(request.host, request.port) or (
            request.address is not None and listeners.is_own(request.address, request.port)
        )

    def _rate_limited(self, decision: Decision, calls: int = 1) -> float:
        rule = self.sidecar.rules.rule(decision.rule_id)
        if rule is None or rule.limits is None:
            return 0.0
        return self.sidecar.rate_limiter.take(
            (self.sidecar.settings.agent_id, rule.id), rule.limits, time.monotonic(), cost=max(1, calls)
        )

    def _limit_text(self, decision: Decision) -> str:
        rule = self.sidecar.rules.rule(decision.rule_id)
        if rule is None or rule.limits is None:
            return "a limited rate"
        return f"{rule.limits.count} requests per {rule.limits.per_seconds}s"

    # --- record and observe ----------------------------------------------------------------------

    def _refuse_with(
        self,
        flow: http.HTTPFlow,
        request: Request,
        decision: Decision,
        decision_id: str,
        started: float,
        refusal: _Refusal,
        *,
        label: str | None = None,
    ) -> None:
        """A decided request refused for a reason outside the policy (loop, upgrade, DNS): recorded as such."""
        refused = replace(decision, verdict=Verdict.DENIED, reason_code=refusal.code, reason=refusal.reason)
        self._record_decision(
            flow, request, refused, decision_id, forwarded=False, label=label or refusal.error
        )
        self._observe(refused, started, label or refusal.error)
        body = deny_body(refused, error=refusal.error, decision_id=decision_id)
        flow.response = self._answer(request, refusal.status, body, decision_id, {})

    def _answer(
        self,
        request: Request,
        status: int,
        body: dict[str, Any],
        decision_id: str,
        headers: Mapping[str, str],
    ) -> http.Response:
        """A refusal: §5's JSON body, or — for a request holding MCP tool calls — §14's JSON-RPC error."""
        plain = json_response(status, body, decision_id=decision_id, headers=headers)
        mcp = mcp_body(request)
        if mcp is None:
            return plain
        answer_headers = {DECISION_HEADER: "deny", DECISION_ID_HEADER: decision_id, **headers}
        shaped = jsonrpc_refusal(mcp, status, body, answer_headers)
        return shaped if shaped is not None else plain

    def _record_decision(
        self,
        flow: http.HTTPFlow,
        request: Request | None,
        decision: Decision,
        decision_id: str,
        *,
        forwarded: bool,
        label: str | None = None,
        warrant_request: dict[str, Any] | None = None,
        would_deny: bool = False,
        streamed: bool = False,
        durable: bool | None = None,
    ) -> None:
        payload: dict[str, Any] = {
            "decision_id": decision_id,
            "decision": label or decision.verdict.value,
            "forwarded": forwarded,
            "reason_code": decision.reason_code,
            "reason": decision.reason,
            "tier": decision.tier.value,
            "intent": decision.intent.as_dict(),
            "enforcement": self.sidecar.settings.enforcement,
            "client": _peer(flow),
        }
        if would_deny:
            payload["would_deny"] = True
        if request is not None:
            payload["request"] = _audit_request(request, streamed=streamed)
        else:
            payload["request"] = {
                "method": flow.request.method,
                "host": flow.request.host,
                "port": flow.request.port,
            }
        if decision.warrant_id is not None:
            payload["warrant_id"] = decision.warrant_id
        if warrant_request is not None:
            payload["warrant_request_id"] = warrant_request["id"]
        self.sidecar.recorder.record(
            "decision",
            agent=self.sidecar.settings.agent_id,
            policy_revision=decision.policy_revision,
            payload=payload,
            durable=self.sidecar.settings.durable_audit if durable is None else durable,
        )

    def _record_execution(
        self,
        request: Request,
        decision: Decision,
        decision_id: str,
        *,
        status: int,
        error: str | None,
        exchange: Exchange | None = None,
    ) -> None:
        sidecar = self.sidecar
        payload: dict[str, Any] = {
            "decision_id": decision_id,
            "status": status,
            "bytes": exchange.bytes_down if exchange is not None else 0,
            "bytes_up": exchange.bytes_up if exchange is not None else 0,
            "bytes_down": exchange.bytes_down if exchange is not None else 0,
            "duration_ms": round(exchange.seconds * 1000, 3) if exchange is not None else 0.0,
            "intent": decision.intent.as_dict(),
        }
        if exchange is not None and exchange.streamed_body and exchange.bytes_up:
            payload["body_sha256"] = exchange.body_sha256  # of the body as it streamed upstream
        if error is not None:
            payload["error"] = error
        if decision.warrant_id is not None:
            payload["warrant_id"] = decision.warrant_id
        sidecar.recorder.record(
            "execution",
            agent=sidecar.settings.agent_id,
            policy_revision=decision.policy_revision,
            payload=payload,
            durable=False,
        )
        if decision.warrant_id is not None:
            # The forwarded request is the verified one (same value); record the binding that held.
            sidecar.recorder.record(
                "verification",
                agent=sidecar.settings.agent_id,
                policy_revision=decision.policy_revision,
                payload={
                    "decision_id": decision_id,
                    "warrant_id": decision.warrant_id,
                    "request_sha256": _request_digest(request),
                    "matched": True,
                    "status": status,
                },
                durable=False,
            )

    def _observe(self, decision: Decision, started: float, label: str) -> None:
        metrics = self.sidecar.metrics
        metrics.decision_seconds.observe(time.perf_counter() - started)
        metrics.requests.labels(
            tier=decision.tier.value, decision=label, action=metrics.action_label(decision.intent.action)
        ).inc()

    def _store_unavailable(self, exc: StoreUnavailable) -> http.Response:
        log.error("audit store unavailable, refusing: %s", exc)
        self.sidecar.metrics.requests.labels(tier="deny", decision="error", action="unknown").inc()
        if isinstance(exc, AuditFull):
            return plain_error(
                503, "denied", "audit.full", f"the audit cannot take more events: {exc}; refused"
            )
        return plain_error(503, "denied", "audit.unavailable", "the audit store cannot record; refused")

    def _audit_blocked(self) -> http.Response | None:
        """503 before anything is decided or recorded while the audit cannot take more events."""
        blocked = self.sidecar.recorder.blocked
        if blocked is None:
            return None
        code, why = blocked
        self.sidecar.metrics.requests.labels(tier="deny", decision="error", action="unknown").inc()
        return plain_error(503, "denied", code, f"{why}; refused (nothing is forwarded unrecorded)")

    def _internal_error(self, flow: http.HTTPFlow) -> http.Response:
        self.sidecar.metrics.requests.labels(tier="deny", decision="error", action="unknown").inc()
        exchange = self.watch.pop(flow)
        if exchange is not None:
            flow.metadata.pop(_EXCHANGE, None)
            flow.request.stream = False
        return plain_error(403, "denied", "internal.error", "internal error while enforcing; refused")

    def _refuse_early(self, flow: http.HTTPFlow, refusal: _Refusal) -> http.Response:
        decision_id = "d_" + secrets.token_hex(8)
        flow.metadata["vienna.seen"] = True
        try:
            self.sidecar.recorder.record(
                "decision",
                agent=self.sidecar.settings.agent_id,
                policy_revision=self.sidecar.rules.revision,
                payload={
                    "decision_id": decision_id,
                    "decision": refusal.error,
                    "forwarded": False,
                    "reason_code": refusal.code,
                    "reason": refusal.reason,
                    "tier": "deny",
                    "request": {
                        "method": flow.request.method,
                        "host": flow.request.host,
                        "port": flow.request.port,
                    },
                    "client": _peer(flow),
                },
            )
        except StoreUnavailable:
            log.error(
                "audit store unavailable while refusing early"
            )  # refusing anyway; nothing was forwarded
        self.sidecar.metrics.requests.labels(tier="deny", decision=refusal.error, action="unknown").inc()
        return plain_error(
            refusal.status, refusal.error, refusal.code, refusal.reason, decision_id=decision_id
        )


_FORM = "application/x-www-form-urlencoded"


def _is_form_post(request: http.Request) -> bool:
    value = request.headers.get("content-type", "")
    return request.method.upper() == "POST" and value.split(";")[0].strip().lower() == _FORM


def _announces_body(request: http.Request) -> bool:
    lengths = request.headers.get_all("content-length")
    if any(value.strip() not in ("", "0") for value in lengths):
        return True
    return bool(request.headers.get_all("transfer-encoding")) or (
        (request.is_http2 or request.is_http3)
        and not lengths
        and request.method.upper() not in ("GET", "HEAD")
    )


def _transfer_codings(request: http.Request) -> list[str]:
    return [
        token.strip().lower()
        for value in request.headers.get_all("transfer-encoding")
        for token in value.split(",")
        if token.strip()
    ]


def _body_too_large(limit: int) -> _Refusal:
    return _Refusal(413, "bad_request", "request.body_too_large", f"request body over the {limit}-byte limit")


def _loopback(request: Request) -> bool:
    address = request.address or request.host
    return address == "::1" or address.startswith("127.")


def _authority_down(exc: Exception) -> _Refusal:
    return _Refusal(
        503,
        "unavailable",
        "authority.unavailable",
        f"this request needs the authority, which cannot be reached; refused (fail closed): {exc}",
    )


def _loop_refusal(request: Request) -> _Refusal:
    return _Refusal(
        508, "denied", LOOP, f"{request.authority} is this sidecar itself; a request there would loop"
    )


def _with_address(request: Request, address: str) -> Request:
    return replace(request, address=address)


def _replace_verdict(decision: Decision, verdict: Verdict, code: str, reason: str) -> Decision:
    return replace(decision, verdict=verdict, reason_code=code, reason=reason)


def _audit_request(request: Request, *, streamed: bool = False) -> dict[str, Any]:
    audited: dict[str, Any] = {
        "method": request.method,
        "scheme": request.scheme,
        "host": request.host,
        "port": request.port,
        "path": request.path,
        "query_sha256": hashlib.sha256(request.query.encode()).hexdigest() if request.query else None,
        "address": request.address,
    }
    if streamed:  # the body streams after the decision: its digest is in the execution event
        audited["body"] = "streamed"
    else:
        audited.update(body_sha256=request.body_sha256, body_bytes=len(request.body))
    return audited


def _store_code(exc: StoreUnavailable) -> str:
    return "audit.full" if isinstance(exc, AuditFull) else "audit.unavailable"


def _request_digest(request: Request) -> str:
    text = "\n".join(
        (
            request.method,
            request.scheme,
            request.host,
            str(request.port),
            request.path,
            request.query,
            request.body_sha256,
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _peer(flow: http.HTTPFlow) -> str:
    peer = flow.client_conn.peername
    return f"{peer[0]}:{peer[1]}" if peer else ""
