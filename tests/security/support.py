"""Real parts for the attack suite: a recording upstream behind a byte tap, `vienna run`, raw HTTP exchanges."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests
from aiohttp import web

from policy.model import Intent, Tier
from policy.warrants import Approval, Constraints, WarrantClaims, WarrantKeys, mint
from proxy.keys import key_id
from tests.background_server import BackgroundServer, Seen, read_seen
from tests.vienna_process import run_command

AGENT_ID = "sec-agent"
READY_TIMEOUT = 30.0
MAX_BODY = 4096
METADATA_PATH = "/latest/meta-data/iam/security-credentials/"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def clean_env() -> dict[str, str]:
    """This process's environment without proxy or VIENNA_* variables that would change what runs."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy") and not key.startswith("VIENNA_")
    }


def session(proxy: str | None = None) -> requests.Session:
    http = requests.Session()
    http.trust_env = False  # NO_PROXY, netrc or REQUESTS_CA_BUNDLE must not change where a request goes
    if proxy is not None:
        http.proxies = {"http": proxy, "https": proxy}
    return http


# --- the upstream -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Chunk:
    connection: int
    data: bytes


class Upstream(BackgroundServer):
    """An aiohttp server that records what it parses, behind a TCP tap that records every byte sent to it.

    Clients (the sidecar) connect to `port`, the tap; the tap relays to aiohttp. So tests can assert both
    what a strict parser saw (`seen`) and the exact bytes that crossed the wire (`wire_since`).
    Paths: `/redirect/internal` → 302 to the cloud metadata address, `/redirect/private` → 302 to
    10.0.0.1, `/slow` → answers after a second; anything else → 200 JSON echo.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__("security-upstream")
        self._ssl = ssl_context
        self._seen: list[Seen] = []
        self._wire: list[_Chunk] = []
        self._lock = threading.Lock()
        self._tap_server: asyncio.Server | None = None
        self._connections = 0
        self.port = 0
        self._app_port = 0

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def app_port(self) -> int:
        """The aiohttp server's own port, behind the tap."""
        return self._app_port

    def url(self, path: str, *, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def seen(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [item for item in self._seen if path is None or item.path == path]

    def seen_containing(self, marker: str) -> list[Seen]:
        with self._lock:
            return [item for item in self._seen if marker in item.path or marker.encode() in item.body]

    def wire_mark(self) -> int:
        with self._lock:
            return len(self._wire)

    def wire_since(self, mark: int) -> bytes:
        """Every byte the sidecar sent to the upstream since `mark`, connections concatenated in order."""
        with self._lock:
            return b"".join(chunk.data for chunk in self._wire[mark:])

    async def _open_sites(self, runner: web.AppRunner) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self._app_port = listener.getsockname()[1]
        await web.SockSite(runner, listener, ssl_context=self._ssl).start()
        self._tap_server = await asyncio.start_server(self._tap, "127.0.0.1", 0)
        self.port = self._tap_server.sockets[0].getsockname()[1]

    async def _close_extra(self) -> None:
        if self._tap_server is not None:
            self._tap_server.close()

    async def _tap(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._app_port)
        except OSError:
            client_writer.close()
            return

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if record:
                        with self._lock:
                            self._wire.append(_Chunk(number, data))
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()

        await asyncio.gather(
            pipe(client_reader, server_writer, True), pipe(server_reader, client_writer, False)
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = await read_seen(request)
        path = seen.path
        with self._lock:
            self._seen.append(seen)
        if path == "/redirect/internal":
            return web.Response(status=302, headers={"Location": f"http://169.254.169.254{METADATA_PATH}"})
        if path == "/redirect/private":
            return web.Response(status=302, headers={"Location": "http://10.0.0.1/admin"})
        if path == "/slow":
            await asyncio.sleep(1.0)
        return web.json_response({"ok": True, "method": request.method, "path": path})


# --- the sidecar ------------------------------------------------------------------------------------


class Sidecar:
    """One `vienna run` subprocess with its own policy, warrant key and data dir."""

    def __init__(self, workdir: Path, *, policy: str, args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.policy_file = workdir / "policy.yaml"
        self.policy_file.write_text(policy)
        self.key_file = workdir / "warrant.key"
        self.key_file.write_text(secrets.token_hex(48))
        self.data_dir = workdir / "data"
        self.log_file = workdir / "vienna.log"
        self.args = list(args)
        self.proxy_port = free_port()
        self.api_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.http = session()
        self.proxied = session(self.proxy_url)
        self.ca_file = workdir / "sidecar-ca.pem"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def keys(self) -> WarrantKeys:
        secret = self.key_file.read_bytes().strip()
        return WarrantKeys(keys={key_id(secret): secret}, active_kid=key_id(secret))

    @property
    def secret(self) -> bytes:
        return self.key_file.read_bytes().strip()

    @property
    def kid(self) -> str:
        return key_id(self.secret)

    def launch(self) -> None:
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            run_command(
                policy=self.policy_file,
                proxy_port=self.proxy_port,
                api_port=self.api_port,
                data_dir=self.data_dir,
                agent_id=AGENT_ID,
                warrant_key=self.key_file,
                extra=["--audit-stdout", "false", *self.args],
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=clean_env(),
        )
        log.close()

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vienna run exited early:\n{self.log_tail()}")
            with contextlib.suppress(requests.RequestException):
                if self.http.get(self.api_url + "/readyz", timeout=1).status_code == 200:
                    self.ca_file.write_bytes(self.http.get(self.api_url + "/v1/ca.pem", timeout=5).content)
                    return
            time.sleep(0.1)
        raise RuntimeError(f"vienna run was not ready in {READY_TIMEOUT:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exchange(self, data: bytes, *, expect: int = 1, timeout: float = 5.0) -> list[RawResponse]:
        return exchange(self.proxy_port, data, expect=expect, timeout=timeout)


# --- raw HTTP ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name.lower()), None)

    def json(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


def parse_responses(data: bytes) -> tuple[list[RawResponse], bytes]:
    """Complete responses at the front of `data` (all carry Content-Length, or end the stream), and the rest."""
    responses: list[RawResponse] = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return responses, data
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = tuple(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        )
        lengths = [value for name, value in headers if name == "content-length"]
        if not lengths:
            if 100 <= status < 200:
                data = data[end + 4 :]
                continue
            return responses, data  # body runs to the end of the stream: read_all decides
        size = int(lengths[0])
        if len(data) < end + 4 + size:
            return responses, data
        responses.append(RawResponse(status, headers, data[end + 4 : end + 4 + size]))
        data = data[end + 4 + size :]


def read_responses(sock: socket.socket, *, expect: int, timeout: float) -> list[RawResponse]:
    """Read until `expect` responses arrived, the peer closed, or `timeout` passed."""
    sock.settimeout(timeout)
    buffer = b""
    done: list[RawResponse] = []
    deadline = time.monotonic() + timeout
    while len(done) < expect and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        buffer += chunk
        parsed, buffer = parse_responses(buffer)
        done.extend(parsed)
    return done


def exchange(port: int, data: bytes, *, expect: int = 1, timeout: float = 5.0) -> list[RawResponse]:
    """Write exactly `data` to the proxy on one connection; the responses that came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_responses(sock, expect=expect, timeout=timeout)


def one(responses: list[RawResponse]) -> RawResponse:
    assert len(responses) >= 1, "the proxy sent no complete response"
    return responses[0]


def connect_tunnel(
    proxy_port: int, target: str, *, ca_file: Path, server_name: str | None, extra: bytes = b""
) -> tuple[ssl.SSLSocket | None, RawResponse | None]:
    """CONNECT `target`, then TLS with `server_name` as SNI (None: no SNI) trusting the sidecar's CA.

    Returns the TLS socket, or None and the proxy's refusal of the CONNECT.
    """
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=5)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode() + extra + b"\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        sock.settimeout(5)
        parsed, _ = parse_responses(head)
        while not parsed:
            chunk = sock.recv(65536)
            if not chunk:
                break
            head += chunk
            parsed, _ = parse_responses(head)
        sock.close()
        return None, parsed[0] if parsed else None
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False  # the name checks under test are the sidecar's, not the client's
    return context.wrap_socket(sock, server_hostname=server_name), None


# --- refusals ---------------------------------------------------------------------------------------


def assert_refused(
    answer: RawResponse | requests.Response, status: int, reason_code: str, error: str | None = None
) -> dict[str, Any]:
    """A refusal the proxy made itself: status, Vienna-Decision: deny, JSON body with this reason_code."""
    if isinstance(answer, requests.Response):
        got, decision, raw = answer.status_code, answer.headers.get("Vienna-Decision"), answer.content
    else:
        got, decision, raw = answer.status, answer.header("vienna-decision"), answer.body
    assert (got, decision) == (status, "deny"), raw[:1500]
    body = json.loads(raw)
    assert isinstance(body, dict)
    assert body["reason_code"] == reason_code, body
    if error is not None:
        assert body["error"] == error, body
    for key in ("error", "reason", "reason_code", "tier", "intent"):
        assert key in body, body
    return body


# --- warrants ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """What a warrant covers: by default one exact request on the plain upstream."""

    method: str
    path: str | None
    port: int
    body: bytes = b""
    host: str = "127.0.0.1"
    scheme: str = "http"
    query: str | None = ""
    path_prefix: str | None = None
    bind_body: bool = True


def warrant_claims(
    binding: Binding,
    *,
    tier: Tier = Tier.T3,
    agent: str = AGENT_ID,
    issued: float | None = None,
    lifetime: int = 300,
    changes: Mapping[str, object] | None = None,
) -> WarrantClaims:
    now = int(issued if issued is not None else time.time())
    claims = WarrantClaims(
        iss="vienna",
        sub=agent,
        jti="wt_" + secrets.token_urlsafe(16),
        iat=now,
        nbf=now,
        exp=now + lifetime,
        tier=tier,
        intent=Intent(action="demo.delete_repo", target="acme/x", rule="delete-repo"),
        approvals=(
            Approval(who="alice", at=float(now), justification="security suite"),
            Approval(who="bob", at=float(now), justification="security suite"),
        ),
        con=Constraints(
            method=binding.method,
            scheme=binding.scheme,
            host=binding.host,
            port=binding.port,
            path=binding.path,
            path_prefix=binding.path_prefix,
            query=binding.query,
            body_sha256=hashlib.sha256(binding.body).hexdigest() if binding.bind_body else None,
            max_uses=1,
        ),
    )
    return replace(claims, **dict(changes or {}))  # type: ignore[arg-type]


def mint_for(sidecar: Sidecar, binding: Binding, **options: Any) -> str:
    return mint(warrant_claims(binding, **options), sidecar.keys)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64json(value: Mapping[str, object]) -> str:
    return b64url(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def hand_signed(
    header: Mapping[str, object], payload: Mapping[str, object], key: bytes, digest: str = "sha256"
) -> str:
    """A JWS built by hand, HMAC-signed with `digest`: how a forger would build one."""
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


@dataclass(slots=True)
class FamilyCounts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    names: list[str] = field(default_factory=list)


# test_fuzz adds the number of examples each property ran; the conftest prints them in the summary.
FUZZ_EXAMPLES: dict[str, int] = {}


def raw_request(
    method: str,
    authority: str,
    target: str | bytes,
    *,
    host: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    absolute: bool = True,
    close: bool = True,
    scheme: str = "http",
) -> bytes:
    """The exact bytes of one HTTP/1.1 request to the proxy: absolute-form unless `absolute` is false."""
    path = target if isinstance(target, bytes) else target.encode("latin-1")
    line = (f"{method} {scheme}://{authority}".encode() if absolute else method.encode() + b" ") + path
    lines = [line + b" HTTP/1.1", f"Host: {host if host is not None else authority}".encode()]
    lines.extend(f"{key}: {value}".encode("latin-1") for key, value in headers)
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}".encode())
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def exchange_until_closed(port: int, data: bytes, *, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Write `data`, read everything until the proxy closes: (bytes read, whether it closed in time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
        return received, False


def h2_exchange(
    proxy_port: int,
    connect: str,
    headers: Sequence[tuple[str, str]],
    *,
    ca_file: Path,
    server_name: str | None = None,
    timeout: float = 5.0,
) -> RawResponse:
    """One HTTP/2 request through a CONNECT tunnel (ALPN h2); `headers` include the pseudo-headers.

    Outbound header validation is off, so a request can carry a Host header that contradicts its
    :authority, as a hostile client could.
    """
    import h2.config
    import h2.connection
    import h2.events

    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    sock.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(sock, server_hostname=server_name) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        config = h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        connection = h2.connection.H2Connection(config=config)
        connection.initiate_connection()
        connection.send_headers(1, list(headers), end_stream=True)
        tls.sendall(connection.data_to_send())
        status, got, body = 0, [], b""
        deadline = time.monotonic() + timeout
        ended = False
        while not ended and time.monotonic() < deadline:
            data = tls.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    for key, value in event.headers or []:
                        name, text = bytes(key).decode(), bytes(value).decode()
                        if name == ":status":
                            status = int(text)
                        else:
                            got.append((name, text))
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data or b""
                    connection.acknowledge_received_data(event.flow_controlled_length or 0, 1)
                elif isinstance(event, h2.events.StreamReset):
                    got.append(("x-stream-reset", str(event.error_code)))
                    ended = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    got.append(("x-connection-terminated", str(event.error_code)))
                    ended = True
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            tls.sendall(connection.data_to_send())
    return RawResponse(status, tuple(got), body)
