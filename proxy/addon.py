"""The mitmproxy addon: adapt → decide → act → record → observe. Every failure refuses; nothing fails open."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.http import HTTPMode

from policy import engine
from policy.model import Decision, Request, Tier, Verdict
from policy.normalize import AmbiguousRequest, build_request, normalize_host, parse_authority
from proxy import mitm_hardening
from proxy.answers import DECISION_HEADER, DECISION_ID_HEADER, deny_body, json_response, plain_error
from proxy.forward import UpstreamError
from proxy.store import StoreUnavailable
from proxy.warrant_requests import canonical_request, constraints_preview

if TYPE_CHECKING:
    from proxy.runtime import Sidecar

log = logging.getLogger("vienna.addon")
WARRANT_HEADER = "vienna-warrant"


@dataclass(frozen=True, slots=True)
class _Refusal(Exception):
    status: int
    error: str
    code: str
    reason: str


class EnforcementAddon:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        mitm_hardening.install()  # JSON refusals and a bounded head for what mitmproxy refuses itself
        # Test-only fault injection, read once at start-up: with VIENNA_TEST_FAULT=addon the addon
        # raises right before forwarding an allowed request, so tests can prove that a raising addon
        # refuses instead of letting mitmproxy forward on its own. It can only ever refuse more.
        self._inject_fault = os.environ.get("VIENNA_TEST_FAULT") == "addon"
        if self._inject_fault:
            log.warning("VIENNA_TEST_FAULT=addon: every allowed request fails inside the addon (tests only)")

    def load(self, loader: Loader) -> None:
        # mitmproxy buffers a whole request body before the request hook runs. With its limit set, a body
        # announced or grown over --max-body-bytes is refused (413) at once instead of being buffered.
        loader.master.options.update(body_size_limit=str(self.sidecar.settings.max_body_bytes))

    # --- connection level ------------------------------------------------------------------------

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Only HTTP is ever relayed: a tunnel that does not speak HTTP gets no raw TCP/UDP passthrough."""
        chosen = nextlayer.layer
        if chosen is None:
            return
        if isinstance(chosen, layers.TCPLayer | layers.UDPLayer | layers.DNSLayer):
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """Refuse CONNECT to malformed or internal targets before any tunnel exists."""
        try:
            target = Request(
                method="CONNECT",
                scheme="https",
                host=normalize_host(flow.request.host),
                port=flow.request.port,
                path="/",
            )
            target = _with_address(target, await self._resolve(target))
            internal = engine.internal_destination_reason(target, self.sidecar.rules)
            if internal is not None:
                raise _Refusal(403, "denied", engine.INTERNAL_DESTINATION, internal)
        except AmbiguousRequest as exc:
            flow.response = self._refuse_early(flow, _Refusal(400, "bad_request", exc.code, exc.reason))
        except _Refusal as refusal:
            flow.response = self._refuse_early(flow, refusal)
        except Exception:
            log.exception("CONNECT handling failed; refusing")
            flow.response = self._refuse_early(
                flow, _Refusal(403, "denied", "internal.error", "internal error; refused")
            )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            length = flow.request.headers.get_all("content-length")
            limit = self.sidecar.settings.max_body_bytes
            if length and any(not value.strip().isdigit() or int(value) > limit for value in length):
                flow.response = self._refuse_early(flow, _body_too_large(limit))
            elif _transfer_codings(flow.request) not in ([], ["chunked"]):
                # mitmproxy removes only the chunked framing; a body under another coding would be
                # forwarded as if it had none, so it is refused rather than changed.
                flow.response = self._refuse_early(
                    flow,
                    _Refusal(
                        400,
                        "bad_request",
                        "request.bad_framing",
                        "transfer codings other than chunked are not relayed",
                    ),
                )
            elif flow.request.headers.get("upgrade"):
                flow.response = self._refuse_early(
                    flow,
                    _Refusal(
                        400,
                        "bad_request",
                        "request.upgrade",
                        "protocol upgrades (WebSocket, h2c) are not relayed",
                    ),
                )
        except Exception:
            log.exception("request header check failed; refusing")
            flow.response = self._refuse_early(
                flow, _Refusal(403, "denied", "internal.error", "internal error; refused")
            )

    # --- request ---------------------------------------------------------------------------------

    def error(self, flow: http.HTTPFlow) -> None:
        """Requests mitmproxy refused before our request hook (body over the limit, bad framing)."""
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
                    "reason_code": mitm_hardening.protocol_reason_code(400, flow.error.msg),
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
        flow.metadata["vienna.seen"] = True
        if flow.response is not None:
            return
        self.sidecar.inflight += 1
        try:
            await self._enforce(flow)
        except StoreUnavailable as exc:
            log.error("audit store unavailable, refusing: %s", exc)
            flow.response = plain_error(
                503, "denied", "audit.unavailable", "the audit store cannot record; refused"
            )
            self.sidecar.metrics.requests.labels(tier="deny", decision="error", action="unknown").inc()
        except Exception:
            log.exception("enforcement failed; refusing")
            flow.response = plain_error(
                403, "denied", "internal.error", "internal error while enforcing; refused"
            )
            self.sidecar.metrics.requests.labels(tier="deny", decision="error", action="unknown").inc()
        finally:
            self.sidecar.inflight -= 1
        if flow.response is None:  # never let mitmproxy contact the server on its own
            flow.response = plain_error(403, "denied", "internal.error", "no decision was reached; refused")

    async def _enforce(self, flow: http.HTTPFlow) -> None:
        sidecar = self.sidecar
        rules = sidecar.rules
        decision_id = "d_" + secrets.token_hex(8)
        started = time.perf_counter()
        raw_body = flow.request.raw_content
        if raw_body is not None and len(raw_body) > sidecar.settings.max_body_bytes:
            # Backstop only: mitmproxy's body_size_limit (set in load) refuses these before this hook.
            # Checked before adapting, which hashes the body.
            flow.response = self._refuse_early(flow, _body_too_large(sidecar.settings.max_body_bytes))
            return

        # adapt
        try:
            request, warrant = self._adapt(flow)
        except AmbiguousRequest as problem:
            decision = engine.refuse_malformed(problem, rules=rules)
            self._record_decision(flow, None, decision, decision_id, forwarded=False)
            self._observe(decision, started, "bad_request")
            flow.response = json_response(
                400, deny_body(decision, decision_id=decision_id), decision_id=decision_id
            )
            return
        unresolved: _Refusal | None = None
        try:
            request = _with_address(request, await self._resolve(request))
        except _Refusal as refusal:
            unresolved = refusal  # decided without an address; refused below only if it would forward

        # decide
        decision = engine.decide(
            request,
            rules=rules,
            warrant=warrant,
            agent=sidecar.settings.agent_id,
            keys=sidecar.keys,
            now=sidecar.clock(),
        )
        # act
        if unresolved is not None and (decision.forwards or sidecar.settings.dryrun):
            self._record_decision(
                flow, request, decision, decision_id, forwarded=False, label="upstream_error"
            )
            self._observe(decision, started, "upstream_error")
            body = deny_body(decision, error=unresolved.error, decision_id=decision_id)
            body.update(reason=unresolved.reason, reason_code=unresolved.code)
            flow.response = json_response(unresolved.status, body, decision_id=decision_id)
            return
        status, label, extra_headers, warrant_request = 200, decision.verdict.value, {}, None
        if decision.verdict is Verdict.ALLOW and decision.warrant_id is not None:
            if not sidecar.store.consume_warrant(
                decision.warrant_id, decision.warrant_max_uses, sidecar.clock()
            ):
                decision = _replace_verdict(
                    decision, Verdict.WARRANT_INVALID, "warrant.replayed", "warrant already used up (replay)"
                )
                label = decision.verdict.value
        elif decision.verdict is Verdict.ALLOW and decision.tier is Tier.T1:
            retry_after = self._rate_limited(decision)
            if retry_after > 0:
                status, label = 429, "rate_limited"
                extra_headers = {"Retry-After": str(max(1, int(retry_after + 0.999)))}
        if decision.verdict is Verdict.WARRANT_REQUIRED and not sidecar.settings.dryrun:
            # (in dryrun the request is forwarded anyway: operators get no request to approve)
            stored = sidecar.warrant_requests.open(
                agent=sidecar.settings.agent_id, decision=decision, canonical=canonical_request(request)
            )
            warrant_request = sidecar.warrant_requests.summary(stored)

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
                "request": _audit_request(request),
                "source": "proxy",
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
        )
        self._observe(decision, started, label)

        if not (forwards or dryrun_forward):
            if status == 429:
                body = deny_body(decision, error="denied", decision_id=decision_id)
                body["reason"] = f"rule {decision.rule_id!r} allows {self._limit_text(decision)}; retry later"
                body["reason_code"] = "policy.rate_limited"
                flow.response = json_response(429, body, decision_id=decision_id, headers=extra_headers)
                return
            extra = None
            if warrant_request is not None:
                extra = {
                    "instruction": "wait for operators to approve the warrant request, then retry this exact request "
                    "with the header Vienna-Warrant: <warrant>",
                    "constraints": constraints_preview(request, decision, rules),
                }
            body = deny_body(decision, warrant_request=warrant_request, decision_id=decision_id, extra=extra)
            flow.response = json_response(decision.verdict.http_status, body, decision_id=decision_id)
            return

        # forward, then record the execution and observe it
        outgoing = [(k, v) for k, v in request.headers if k != WARRANT_HEADER]
        try:
            if self._inject_fault:
                raise RuntimeError("injected fault (VIENNA_TEST_FAULT=addon)")
            relayed = await sidecar.forwarder.send(request, outgoing)
        except Exception as exc:
            if not isinstance(exc, UpstreamError):
                # The decision already says "forwarded": say what became of it before refusing.
                self._record_execution(
                    request, decision, decision_id, status=0, size=0, seconds=0.0, error="internal.error"
                )
                raise
            self._record_execution(
                request, decision, decision_id, status=exc.status, size=0, seconds=0.0, error=exc.code
            )
            error = "upstream_timeout" if exc.status == 504 else "upstream_error"
            body = deny_body(decision, error=error, decision_id=decision_id)
            body.update(reason=exc.reason, reason_code=exc.code)
            flow.response = json_response(exc.status, body, decision_id=decision_id)
            return
        sidecar.metrics.upstream_seconds.observe(relayed.seconds)
        self._record_execution(
            request,
            decision,
            decision_id,
            status=relayed.status,
            size=len(relayed.body),
            seconds=relayed.seconds,
            error=None,
        )
        flow.response = _relayed_response(
            relayed, request, "would-deny" if dryrun_forward else "allow", decision_id
        )

    def _adapt(self, flow: http.HTTPFlow) -> tuple[Request, str | None]:
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
        request = build_request(
            method=data.method,
            scheme=scheme,
            host=host,
            port=port,
            target=data.path,
            headers=headers,
            body=data.raw_content or b"",
        )
        return request, (warrants[0].strip() if warrants else None)

    async def _resolve(self, request: Request) -> str:
        destinations = self.sidecar.forwarder.destinations
        try:
            addresses = await destinations.lookup(request.host, request.port)
        except OSError as exc:
            raise _Refusal(
                502, "upstream_error", "upstream.dns", f"cannot resolve {request.host}: {exc}"
            ) from None
        return destinations.choose(addresses)

    def _rate_limited(self, decision: Decision) -> float:
        rule = self.sidecar.rules.rule(decision.rule_id)
        if rule is None or rule.limits is None:
            return 0.0
        return self.sidecar.rate_limiter.take(
            (self.sidecar.settings.agent_id, rule.id), rule.limits, time.monotonic()
        )

    def _limit_text(self, decision: Decision) -> str:
        rule = self.sidecar.rules.rule(decision.rule_id)
        if rule is None or rule.limits is None:
            return "a limited rate"
        return f"{rule.limits.count} requests per {rule.limits.per_seconds}s"

    # --- record and observe ----------------------------------------------------------------------

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
            payload["request"] = _audit_request(request)
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
            durable=self.sidecar.settings.durable_audit,
        )

    def _record_execution(
        self,
        request: Request,
        decision: Decision,
        decision_id: str,
        *,
        status: int,
        size: int,
        seconds: float,
        error: str | None,
    ) -> None:
        sidecar = self.sidecar
        payload: dict[str, Any] = {
            "decision_id": decision_id,
            "status": status,
            "bytes": size,
            "duration_ms": round(seconds * 1000, 3),
            "intent": decision.intent.as_dict(),
        }
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

    def _refuse_early(self, flow: http.HTTPFlow, refusal: _Refusal) -> http.Response:
        decision_id = "d_" + secrets.token_hex(8)
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


def _transfer_codings(request: http.Request) -> list[str]:
    return [
        token.strip().lower()
        for value in request.headers.get_all("transfer-encoding")
        for token in value.split(",")
        if token.strip()
    ]


def _body_too_large(limit: int) -> _Refusal:
    return _Refusal(413, "bad_request", "request.body_too_large", f"request body over the {limit}-byte limit")


def _with_address(request: Request, address: str) -> Request:
    return replace(request, address=address)


def _replace_verdict(decision: Decision, verdict: Verdict, code: str, reason: str) -> Decision:
    return replace(decision, verdict=verdict, reason_code=code, reason=reason)


def _audit_request(request: Request) -> dict[str, Any]:
    return {
        "method": request.method,
        "scheme": request.scheme,
        "host": request.host,
        "port": request.port,
        "path": request.path,
        "query_sha256": hashlib.sha256(request.query.encode()).hexdigest() if request.query else None,
        "body_sha256": request.body_sha256,
        "body_bytes": len(request.body),
        "address": request.address,
    }


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


_NO_BODY_STATUS = frozenset({204, 304})


def _relayed_response(relayed: Any, request: Request, decision: str, decision_id: str) -> http.Response:
    headers = [(k, v) for k, v in relayed.headers if k.lower() != "content-length"]
    if request.method == "HEAD":
        headers.extend((k, v) for k, v in relayed.headers if k.lower() == "content-length")
    elif relayed.status not in _NO_BODY_STATUS and not 100 <= relayed.status < 200:
        headers.append(("Content-Length", str(len(relayed.body))))
    headers.append((DECISION_HEADER, decision))
    headers.append((DECISION_ID_HEADER, decision_id))
    now = time.time()
    return http.Response(
        http_version=b"HTTP/1.1",
        status_code=relayed.status,
        reason=relayed.reason.encode("latin-1", "replace"),
        headers=http.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]),
        content=relayed.body,
        trailers=None,
        timestamp_start=now,
        timestamp_end=now,
    )
