"""Address pinning: mitmproxy connects only to the address the decision checked, never looking a name up again."""

from __future__ import annotations

import logging

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from proxy.dataplane.destinations import OwnListeners

log = logging.getLogger("vienna.pinning")
_REFUSED_TARGET = b"vienna-refused.invalid:1"  # a CONNECT target no proxy can reach: fails closed


class AddressPins:
    """For each client connection, (host, port) → the checked address. A server connection mitmproxy
    opens to anything not pinned is refused; a pinned one goes to the pinned address, by number."""

    def __init__(self, listeners: OwnListeners, upstream_proxy: tuple[str, int] | None) -> None:
        self._listeners = listeners
        self._upstream_proxy = upstream_proxy
        self._pins: dict[str, dict[tuple[str, int], str]] = {}
        self._names: dict[str, tuple[str, int]] = {}

    def pin(self, client: connection.Client, host: str, port: int, address: str) -> None:
        self._pins.setdefault(client.id, {})[(host, port)] = address

    def unpin(self, client: connection.Client, host: str, port: int) -> None:
        self._pins.get(client.id, {}).pop((host, port), None)

    def pinned(self, client: connection.Client, host: str, port: int) -> str | None:
        return self._pins.get(client.id, {}).get((host, port))

    # --- mitmproxy hooks ---------------------------------------------------------------------------

    def client_disconnected(self, client: connection.Client) -> None:
        self._pins.pop(client.id, None)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            self._server_connect(data)
        except Exception:  # mitmproxy would connect to the name, with its own lookup: refuse instead
            log.exception("pinning failed; refusing the connection")
            data.server.error = "vienna: internal error while pinning; refused"

    def _server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.error or server.address is None:
            return
        host, port = str(server.address[0]), int(server.address[1])
        if self._upstream_proxy is not None and (host, port) == self._upstream_proxy:
            return  # the tunnel to the configured upstream proxy; its CONNECT names the checked address
        address = self.pinned(data.client, host, port)
        if address is None:
            server.error = "vienna: no checked address for this destination; refused"
            log.error("refused an unpinned server connection to %s:%d", host, port)
            return
        if self._listeners.is_own(address, port):
            server.error = "vienna: the destination is this sidecar itself (loop); refused"
            return
        self._names[server.id] = (host, port)
        server.address = (address, port)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        # Connected to the number; the name comes back so that later requests reuse this connection.
        name = self._names.pop(data.server.id, None)
        if name is not None:
            # mitmproxy refuses to change the address of an open connection (Server.__setattr__); this
            # is the name the connection was opened for, which its reuse is matched on.
            object.__setattr__(data.server, "address", name)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._names.pop(data.server.id, None)

    def http_connect_upstream(self, flow: http.HTTPFlow) -> None:
        """The CONNECT sent to an upstream proxy names the checked address, so it cannot resolve anew."""
        host, port = flow.request.host, flow.request.port
        address = self.pinned(flow.client_conn, host, port)
        if address is None or self._listeners.is_own(address, port):
            flow.request.data.authority = _REFUSED_TARGET
            flow.request.data.host = "vienna-refused.invalid"
            flow.request.headers.pop("host", None)
            return
        authority = (f"[{address}]" if ":" in address else address) + f":{port}"
        flow.request.data.host = address
        flow.request.data.authority = authority.encode()
        if "host" in flow.request.headers:
            flow.request.headers["host"] = authority
