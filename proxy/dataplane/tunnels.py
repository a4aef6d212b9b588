"""What is relayed without being read: passthrough TLS tunnels and WebSocket messages, counted and audited."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import http, tcp
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.tls import parse_client_hello

from policy.classify import tunnel_rule
from policy.model import Request, Tier
from policy.normalize import AmbiguousRequest, normalize_host
from proxy.dataplane.pinning import AddressPins

if TYPE_CHECKING:
    from proxy.runtime import Sidecar

log = logging.getLogger("vienna.tunnels")
_TUNNEL = "vienna.tunnel"
_COUNTS = "vienna.websocket_counts"


@dataclass(slots=True)
class _Tunnel:
    host: str
    port: int
    address: str
    rule: str
    decision_id: str
    decided: bool = False
    started: float = field(default_factory=time.monotonic)
    up: int = 0
    down: int = 0


class Tunnels:
    def __init__(self, sidecar: Sidecar, pins: AddressPins) -> None:
        self.sidecar = sidecar
        self.pins = pins
        self._pending: dict[str, _Tunnel] = {}  # client connection id → a CONNECT that is to be a tunnel

    # --- passthrough ---------------------------------------------------------------------------------

    def connect(self, flow: http.HTTPFlow, target: Request) -> None:
        """A CONNECT that passed the destination checks: a tunnel if a passthrough rule names it."""
        rule = tunnel_rule(target.host, target.port, self.sidecar.rules)
        if rule is None:
            return  # intercepted: each request inside is decided on its own
        assert target.address is not None
        decision_id = "d_" + secrets.token_hex(8)
        forwarded = rule.tier is not Tier.DENY
        if forwarded and self.sidecar.settings.upstream_proxy:
            from proxy.answers import plain_error

            # A raw tunnel would go around the upstream proxy (mitmproxy tunnels only HTTP through one).
            flow.response = plain_error(
                403,
                "denied",
                "request.passthrough_unavailable",
                "passthrough tunnels are not available with --upstream-proxy",
                decision_id=decision_id,
            )
            return
        self._record_strict(
            "decision",
            {
                "decision_id": decision_id,
                "decision": "allow" if forwarded else "denied",
                "forwarded": forwarded,
                "reason_code": "policy.passthrough" if forwarded else "policy.deny",
                "reason": f"matched passthrough rule {rule.id!r}",
                "tier": rule.tier.value,
                "intent": {"action": rule.action, "target": f"{target.host}:{target.port}", "rule": rule.id},
                "request": {
                    "method": "CONNECT",
                    "host": target.host,
                    "port": target.port,
                    "address": target.address,
                },
                "passthrough": True,
            },
            durable=self.sidecar.settings.durable_audit,
        )
        self.sidecar.metrics.requests.labels(
            tier=rule.tier.value,
            decision="allow" if forwarded else "denied",
            action=self.sidecar.metrics.action_label(rule.action),
        ).inc()
        if not forwarded:
            from proxy.answers import plain_error

            flow.response = plain_error(
                403,
                "denied",
                "policy.deny",
                f"rule {rule.id!r}: tier deny never passes",
                decision_id=decision_id,
            )
            return
        self._pending[flow.client_conn.id] = _Tunnel(
            target.host, target.port, target.address, rule.id, decision_id
        )

    def choose_layer(self, nextlayer: layer.NextLayer) -> bool:
        """True when this connection is a passthrough tunnel and the layer was chosen here."""
        tunnel = self._pending.get(nextlayer.context.client.id)
        if tunnel is None or tunnel.decided:
            return False
        data: bytes = nextlayer.data_client()  # type: ignore[no-untyped-call]
        client = nextlayer.context.client
        problem: str | None = None
        if not data:
            nextlayer.layer = None  # the client speaks first in TLS: wait for its ClientHello
            return True
        if data[:1] != b"\x16":
            problem = "a passthrough tunnel carries TLS only; the client did not start with a ClientHello"
        else:  # a TLS handshake record: its server name must be the CONNECT host
            try:
                hello = parse_client_hello(data)
            except ValueError:
                problem = "the tunnel did not start with a valid TLS ClientHello"
            else:
                if hello is None:
                    nextlayer.layer = None  # wait for the rest of the ClientHello
                    return True
                if hello.sni is not None and not _same_host(hello.sni, tunnel.host):
                    problem = f"TLS server name {hello.sni!r} disagrees with the CONNECT host {tunnel.host}"
        tunnel.decided = True
        if problem is None:
            self.pins.pin(client, tunnel.host, tunnel.port, tunnel.address)
        else:
            self._refuse(tunnel, client, problem)
        nextlayer.layer = layers.TCPLayer(nextlayer.context, ignore=False)
        return True

    def _refuse(self, tunnel: _Tunnel, client: Any, reason: str) -> None:
        # No pin: the connection to the upstream is refused in server_connect, so nothing is relayed.
        self.pins.unpin(client, tunnel.host, tunnel.port)
        self._record(
            "decision",
            {
                "decision_id": tunnel.decision_id,
                "decision": "bad_request",
                "forwarded": False,
                "reason_code": "request.host_mismatch",
                "reason": reason,
                "tier": "deny",
                "request": {"method": "CONNECT", "host": tunnel.host, "port": tunnel.port},
                "passthrough": True,
            },
            durable=False,
        )
        self._pending.pop(client.id, None)

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        tunnel = self._pending.get(flow.client_conn.id)
        if flow.messages:
            message = flow.messages[-1]
            if tunnel is not None:
                if message.from_client:
                    tunnel.up += len(message.content)
                else:
                    tunnel.down += len(message.content)
            flow.messages.clear()  # relayed; keeping them would grow without bound

    def tcp_end(self, flow: tcp.TCPFlow) -> None:
        self._finish(flow.client_conn.id, flow.error.msg if flow.error is not None else None)

    tcp_error = tcp_end

    def client_disconnected(self, client: Any) -> None:
        self._finish(client.id, None)

    def _finish(self, client_id: str, error: str | None) -> None:
        tunnel = self._pending.pop(client_id, None)
        if tunnel is None or not tunnel.decided:
            return
        payload: dict[str, Any] = {
            "decision_id": tunnel.decision_id,
            "status": 200,
            "passthrough": True,
            "bytes_up": tunnel.up,
            "bytes_down": tunnel.down,
            "bytes": tunnel.down,
            "duration_ms": round((time.monotonic() - tunnel.started) * 1000, 3),
            "intent": {
                "action": "passthrough",
                "target": f"{tunnel.host}:{tunnel.port}",
                "rule": tunnel.rule,
            },
        }
        if error is not None:
            payload["error"] = error[:200]
        self._record("execution", payload, durable=False)

    # --- WebSocket -----------------------------------------------------------------------------------

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        flow.metadata[_COUNTS] = [0, 0, 0, 0]  # messages up, bytes up, messages down, bytes down
        self._record("execution", {**self._ws_base(flow), "websocket": "open"}, durable=False)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None or not flow.websocket.messages:
            return
        counts = flow.metadata.setdefault(_COUNTS, [0, 0, 0, 0])
        for message in flow.websocket.messages:
            offset = 0 if message.from_client else 2
            counts[offset] += 1
            counts[offset + 1] += len(message.content)
        flow.websocket.messages.clear()  # relayed already; a long session must not accumulate them

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        counts = flow.metadata.get(_COUNTS, [0, 0, 0, 0])
        payload = {
            **self._ws_base(flow),
            "websocket": "close",
            "messages_up": counts[0],
            "bytes_up": counts[1],
            "messages_down": counts[2],
            "bytes_down": counts[3],
            "close_code": flow.websocket.close_code if flow.websocket is not None else None,
        }
        self._record("execution", payload, durable=False)

    @staticmethod
    def _ws_base(flow: http.HTTPFlow) -> dict[str, Any]:
        exchange = flow.metadata.get("vienna.exchange")
        base: dict[str, Any] = {
            "host": flow.request.host,
            "port": flow.request.port,
            "path": flow.request.path[:300],
        }
        if exchange is not None:
            base["decision_id"] = exchange.decision_id
            base["intent"] = exchange.decision.intent.as_dict()
        return base

    def _record_strict(self, type_: str, payload: dict[str, Any], *, durable: bool) -> None:
        """A tunnel's decision: when it cannot be recorded, StoreUnavailable reaches the CONNECT
        handler, which refuses (503): no tunnel opens unrecorded."""
        self.sidecar.recorder.record(
            type_,
            agent=self.sidecar.settings.agent_id,
            policy_revision=self.sidecar.rules.revision,
            payload=payload,
            durable=durable,
        )

    def _record(self, type_: str, payload: dict[str, Any], *, durable: bool) -> None:
        try:
            self.sidecar.recorder.record(
                type_,
                agent=self.sidecar.settings.agent_id,
                policy_revision=self.sidecar.rules.revision,
                payload=payload,
                durable=durable,
            )
        except Exception:
            log.exception("could not record a %s event", type_)


def _same_host(name: str, host: str) -> bool:
    try:
        return normalize_host(name) == host
    except AmbiguousRequest:
        return False
