"""Data plane v2 with real clients and servers on loopback: streaming, silence timeouts, big bodies, loops,
WebSocket, passthrough and an upstream proxy (DESIGN §10)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.background_server import BackgroundServer
from tests.integration.harness import TOKENS, Sidecar, free_port, running_sidecar, unique

POLICY = """\
version: 1
default_tier: T3
rules:
  - id: ws
    match: {hosts: ["127.0.0.1"], methods: [GET], paths: ["/ws/**"]}
    action: demo.socket
    tier: T0
    websocket: true
  - id: tunnel
    match: {hosts: ["localhost:PASSPORT"]}
    action: demo.tunnel
    tier: T0
    passthrough: true
  - id: read
    match: {hosts: ["127.0.0.1", "localhost"], methods: [GET, HEAD]}
    action: demo.read
    tier: T0
  - id: upload
    match: {hosts: ["127.0.0.1"], methods: [PUT, POST], paths: ["/upload/**"]}
    action: demo.upload
    tier: T1
  - id: guarded
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/guarded/**"]}
    action: demo.guarded
    tier: T2
"""


class StreamingUpstream(BackgroundServer):
    """SSE, slow drips, big downloads, uploads counted without keeping them, a WebSocket echo."""

    def __init__(self) -> None:
        super().__init__("streaming-upstream")
        self.port = free_port()
        self.uploads: dict[str, tuple[int, str, dict[str, str]]] = {}

    async def _open_sites(self, runner: web.AppRunner) -> None:
        await web.TCPSite(runner, "127.0.0.1", self.port).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path.startswith("/ws/"):
            socket_ = web.WebSocketResponse()
            await socket_.prepare(request)
            async for message in socket_:
                await socket_.send_str("echo:" + str(message.data))
            return socket_
        if path.startswith("/sse"):
            events = int(request.query.get("events", "5"))
            gap = float(request.query.get("gap", "0.5"))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for index in range(events):
                await response.write(f"data: {index} {time.time()}\n\n".encode())
                await asyncio.sleep(gap)
            await response.write_eof()
            return response
        if path.startswith("/big"):
            size = int(request.query["bytes"])
            response = web.StreamResponse(headers={"Content-Length": str(size)})
            await response.prepare(request)
            block = b"b" * 65536
            sent = 0
            while sent < size:
                piece = block[: size - sent]
                await response.write(piece)
                sent += len(piece)
            await response.write_eof()
            return response
        if path.startswith("/upload/") or path.startswith("/guarded/"):
            digest, total = hashlib.sha256(), 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                total += len(chunk)
            self.uploads[path] = (
                total,
                digest.hexdigest(),
                {k.lower(): v for k, v in request.headers.items()},
            )
            return web.json_response({"bytes": total})
        if path.startswith("/quiet"):
            await asyncio.sleep(float(request.query.get("seconds", "5")))
            return web.Response(text="late")
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        return web.Response(
            text="ok " + path,
            headers={
                "X-Via-Seen": request.headers.get("Via", ""),
                "X-Peer-Port": str(peer[1] if peer else ""),
            },
        )


@pytest.fixture(scope="module")
def streaming_upstream() -> Iterator[StreamingUpstream]:
    server = StreamingUpstream()
    server.start()
    yield server
    server.stop()


class TlsEcho(threading.Thread):
    """A TLS server whose certificate the sidecar does not trust: only a passthrough tunnel reaches it."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ca = trustme.CA()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost").configure_cert(self.context)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    data = tls.recv(1000)
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\npinned!!"
                        if data
                        else b""
                    )
            except (OSError, ssl.SSLError):
                pass


@pytest.fixture(scope="module")
def tls_echo() -> Iterator[TlsEcho]:
    server = TlsEcho()
    server.start()
    yield server
    server.sock.close()


@pytest.fixture(scope="module")
def v2(
    tmp_path_factory: pytest.TempPathFactory, streaming_upstream: StreamingUpstream, tls_echo: TlsEcho
) -> Iterator[Sidecar]:
    with running_sidecar(
        tmp_path_factory.mktemp("v2"),
        policy=POLICY.replace("PASSPORT", str(tls_echo.port)),
        args=["--max-body-bytes", "65536", "--response-timeout", "1.5", "--idle-timeout", "2"],
    ) as running:
        yield running


def _audit(sidecar: Sidecar) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = sidecar.api(
        "GET", "/v1/audit?after=0&limit=10000", token=TOKENS["alice"]
    ).json()["events"]
    return events


def _executions(sidecar: Sidecar, decision_id: str) -> list[dict[str, Any]]:
    return [
        e["payload"]
        for e in _audit(sidecar)
        if e["type"] == "execution" and e["payload"].get("decision_id") == decision_id
    ]


def test_sse_chunks_arrive_as_they_are_sent_not_at_the_end(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    import httpx

    url = f"http://127.0.0.1:{streaming_upstream.port}/sse?events=4&gap=0.5"
    received: list[float] = []  # when each event reached the client
    sent: list[float] = []  # when the upstream wrote it (each event carries the upstream's clock)
    with (
        httpx.Client(proxy=v2.proxy_url, trust_env=False, timeout=10) as client,
        client.stream("GET", url) as response,
    ):
        assert response.headers["vienna-decision"] == "allow"
        for line in response.iter_lines():
            if line.startswith("data:"):
                received.append(time.time())
                sent.append(float(line.split()[-1]))
    assert len(received) == 4
    # the first event reached the client before the upstream had even written the last one
    assert received[0] < sent[-1], (received, sent)


def test_a_slow_stream_longer_than_every_timeout_is_not_cut(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    # response-timeout 1.5 s and idle-timeout 2 s, a stream of 5 s with a byte every 0.5 s: it must pass whole
    response = v2.request("GET", f"http://127.0.0.1:{streaming_upstream.port}/sse?events=10&gap=0.5")
    assert response.status_code == 200
    assert response.content.count(b"data:") == 10


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("VIENNA_LONG_TESTS") != "1", reason="a 10-minute stream; VIENNA_LONG_TESTS=1 runs it"
)
def test_a_ten_minute_stream_of_a_byte_a_second_is_relayed_whole(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    response = v2.request("GET", f"http://127.0.0.1:{streaming_upstream.port}/sse?events=600&gap=1")
    assert response.status_code == 200
    assert response.content.count(b"data:") == 600


def test_no_response_headers_within_the_response_timeout_is_504(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    started = time.monotonic()
    response = v2.request("GET", f"http://127.0.0.1:{streaming_upstream.port}/quiet?seconds=6")
    assert response.status_code == 504
    body = response.json()
    assert (body["error"], body["reason_code"], body["tier"]) == (
        "upstream_timeout",
        "upstream.timeout",
        "T0",
    )
    assert time.monotonic() - started < 4
    [execution] = _executions(v2, body["decision_id"])
    assert execution["error"] == "upstream.timeout"


def test_silence_mid_stream_over_the_idle_timeout_closes_and_is_audited(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    import requests

    started = time.monotonic()
    with pytest.raises(requests.exceptions.RequestException):
        v2.request("GET", f"http://127.0.0.1:{streaming_upstream.port}/sse?events=2&gap=5").content  # noqa: B018
    assert time.monotonic() - started < 4.5  # cut at the 2 s idle timeout, not after the upstream's 10 s
    idle = _eventually(
        lambda: [
            e["payload"]
            for e in _audit(v2)
            if e["type"] == "execution" and e["payload"].get("error") == "upstream.idle"
        ]
    )
    assert idle, "the idle cut is audited"


def test_one_gigabyte_download_streams_with_bounded_memory(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    size = 1024 * 1024 * 1024
    pid = v2.process.pid if v2.process is not None else 0
    before = _rss(pid)
    digest = hashlib.sha256()
    received = 0
    with v2.proxied.get(
        f"http://127.0.0.1:{streaming_upstream.port}/big?bytes={size}", stream=True, timeout=60
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_content(1 << 20):
            received += len(chunk)
            digest.update(chunk)
        peak = _rss(pid)
    assert received == size
    assert peak - before < 60 * 1024 * 1024, (before, peak)  # a whole-body buffer would add 200 MB


def test_big_upload_streams_and_its_hash_is_audited(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    path = "/upload/" + unique("big")
    block = os.urandom(1 << 20)
    expected = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for _ in range(200):  # 200 MB, far over --max-body-bytes 64 KiB: T1 without a body `when` streams
            expected.update(block)
            yield block

    response = v2.request("PUT", f"http://127.0.0.1:{streaming_upstream.port}{path}", data=body())
    assert response.status_code == 200, response.text
    total, digest, headers = streaming_upstream.uploads[path]
    assert (total, digest) == (200 << 20, expected.hexdigest())
    assert headers["via"].startswith("1.1 vienna-")
    [execution] = _eventually(lambda: _executions(v2, response.headers["Vienna-Decision-Id"]))
    assert (execution["body_sha256"], execution["bytes_up"], execution["status"]) == (
        expected.hexdigest(),
        200 << 20,
        200,
    )


def test_chunked_upload_over_the_limit_where_the_body_is_needed_gets_413_and_the_connection_closes(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    path = "/guarded/" + unique("too-big")  # T2: the body is needed (a warrant binds its hash)
    with socket.create_connection(("127.0.0.1", v2.proxy_port), timeout=10) as sock:
        sock.sendall(
            f"POST http://127.0.0.1:{streaming_upstream.port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{streaming_upstream.port}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        answer = b""
        deadline = time.monotonic() + 10
        closed = False
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        while time.monotonic() < deadline and not closed:
            with contextlib.suppress(OSError):
                sock.sendall(chunk)
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    closed = True
                    break
                if not data:
                    closed = True
                answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request.body_too_large" in answer
    assert closed, "the connection is closed after the 413, never left hanging"
    assert path not in streaming_upstream.uploads


def test_requests_to_the_sidecars_own_ports_are_refused_508(v2: Sidecar) -> None:
    for port in (v2.proxy_port, v2.api_port):
        response = v2.request("GET", f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 508, response.text
        assert (response.json()["error"], response.json()["reason_code"]) == ("denied", "request.loop")
        assert response.headers["Vienna-Decision"] == "deny"


def test_a_request_carrying_this_sidecars_via_is_refused_508(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    seen = v2.request("GET", f"http://127.0.0.1:{streaming_upstream.port}/via")
    via = seen.headers["X-Via-Seen"]
    assert via.startswith("1.1 vienna-")
    looped = v2.request("GET", f"http://127.0.0.1:{streaming_upstream.port}/via", headers={"Via": via})
    assert (looped.status_code, looped.json()["reason_code"]) == (508, "request.loop")


def test_websocket_on_a_websocket_rule_relays_both_ways_and_is_audited(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    from websockets.sync.client import connect

    url = f"ws://127.0.0.1:{streaming_upstream.port}/ws/{unique('chat')}"
    with socket.create_connection(("127.0.0.1", v2.proxy_port), timeout=10) as raw:
        # an explicit proxy: the handshake goes absolute-form through the sidecar
        key = base64.b64encode(os.urandom(16)).decode()
        with connect(url, sock=raw, additional_headers={"X-Test": key}, open_timeout=10) as socket_:
            socket_.send("hello")
            assert socket_.recv(timeout=10) == "echo:hello"
            socket_.send("x" * 1000)
            assert socket_.recv(timeout=10) == "echo:" + "x" * 1000
    closes = _eventually(
        lambda: [
            e["payload"]
            for e in _audit(v2)
            if e["type"] == "execution" and e["payload"].get("websocket") == "close"
        ]
    )
    assert closes, v2.log_text()[-4000:]
    assert closes[-1]["messages_up"] == 2 and closes[-1]["messages_down"] == 2
    assert closes[-1]["bytes_up"] == 1005


def test_passthrough_tunnel_reaches_a_server_the_sidecar_cannot_verify(
    v2: Sidecar, tls_echo: TlsEcho, tmp_path: Path
) -> None:
    ca = tmp_path / "echo-ca.pem"
    tls_echo.ca.cert_pem.write_to_path(str(ca))
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", v2.proxy_port), timeout=10) as raw:
        raw.sendall(
            f"CONNECT localhost:{tls_echo.port} HTTP/1.1\r\nHost: localhost:{tls_echo.port}\r\n\r\n".encode()
        )
        assert raw.recv(1000).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname="localhost") as tls:  # the server's own certificate
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while chunk := tls.recv(1000):
                answer += chunk
    assert answer.endswith(b"pinned!!")
    tunnels = [
        e["payload"] for e in _audit(v2) if e["type"] == "execution" and e["payload"].get("passthrough")
    ]
    assert tunnels and tunnels[-1]["bytes_up"] > 0 and tunnels[-1]["bytes_down"] > 0


def test_passthrough_with_a_disagreeing_server_name_is_not_relayed(v2: Sidecar, tls_echo: TlsEcho) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", v2.proxy_port), timeout=10) as raw:
        raw.sendall(
            f"CONNECT localhost:{tls_echo.port} HTTP/1.1\r\nHost: localhost:{tls_echo.port}\r\n\r\n".encode()
        )
        assert raw.recv(1000).startswith(b"HTTP/1.1 200")
        with (
            pytest.raises((ssl.SSLError, OSError)),
            context.wrap_socket(raw, server_hostname="elsewhere.example") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert tls.recv(1000) == b""
            raise OSError("closed without an answer")


class ConnectProxy(threading.Thread):
    """A small CONNECT-only forward proxy, standing in for a corporate one; records its targets."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.targets: list[str] = []

    def run(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                return
            head += data
        target = head.split(b" ")[1].decode()
        self.targets.append(target)
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host.strip("[]"), int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_everything_goes_through_an_upstream_proxy_to_the_checked_address(
    tmp_path: Path, streaming_upstream: StreamingUpstream
) -> None:
    proxy = ConnectProxy()
    proxy.start()
    policy = POLICY.replace("PASSPORT", "1")
    with running_sidecar(
        tmp_path, policy=policy, args=["--upstream-proxy", f"http://127.0.0.1:{proxy.port}"]
    ) as sidecar:
        response = sidecar.request("GET", f"http://localhost:{streaming_upstream.port}/through-proxy")
        assert (response.status_code, response.text) == (200, "ok /through-proxy")
    proxy.sock.close()
    assert proxy.targets == [f"127.0.0.1:{streaming_upstream.port}"]  # the name was resolved and checked here


def _eventually(probe: Any, seconds: float = 8.0) -> Any:
    """The first truthy answer of `probe` (audit events are written just after the exchange ends)."""
    deadline = time.monotonic() + seconds
    while True:
        answer = probe()
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_clients_connection_close_is_honoured_after_a_streamed_answer(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    with socket.create_connection(("127.0.0.1", v2.proxy_port), timeout=10) as sock:
        sock.sendall(
            f"GET http://127.0.0.1:{streaming_upstream.port}/big?bytes=100000 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{streaming_upstream.port}\r\nConnection: close\r\n\r\n".encode()
        )
        received = b""
        while chunk := sock.recv(65536):  # ends only when the sidecar closes, as the client asked
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == 100000


def test_keep_alive_requests_reuse_one_upstream_connection(
    v2: Sidecar, streaming_upstream: StreamingUpstream
) -> None:
    ports = {
        v2.request("GET", f"http://127.0.0.1:{streaming_upstream.port}/reuse-{i}").headers["X-Peer-Port"]
        for i in range(4)
    }
    assert len(ports) == 1, ports  # pinned to the checked address, and still pooled by name


def test_passthrough_that_does_not_start_with_tls_is_not_relayed(v2: Sidecar, tls_echo: TlsEcho) -> None:
    with socket.create_connection(("127.0.0.1", v2.proxy_port), timeout=10) as raw:
        raw.sendall(
            f"CONNECT localhost:{tls_echo.port} HTTP/1.1\r\nHost: localhost:{tls_echo.port}\r\n\r\n".encode()
        )
        assert raw.recv(1000).startswith(b"HTTP/1.1 200")
        raw.sendall(b"GET /anything HTTP/1.1\r\nHost: evil\r\n\r\n")
        raw.settimeout(5)
        try:
            answer = raw.recv(1000)
        except OSError:
            answer = b""
    assert b"pinned!!" not in answer


def test_a_listener_given_by_name_is_still_a_loop(
    tmp_path: Path, streaming_upstream: StreamingUpstream
) -> None:
    sidecar = Sidecar(tmp_path, policy=POLICY.replace("PASSPORT", "1"))
    sidecar.args = ["--api", f"localhost:{sidecar.api_port}"]
    sidecar.start()
    try:
        response = sidecar.request("GET", f"http://127.0.0.1:{sidecar.api_port}/healthz")
        assert (response.status_code, response.json()["reason_code"]) == (508, "request.loop")
    finally:
        sidecar.stop()
