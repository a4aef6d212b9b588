"""The clients agents really use, through the sidecar, against real loopback servers: curl over HTTP/2 to an
h2-only server, the openai SDK streaming a chat completion, an MCP streamable-HTTP client and server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trustme
import uvicorn
from aiohttp import web
from mcp.server.fastmcp import Context, FastMCP

from tests.background_server import BackgroundServer
from tests.integration.harness import Sidecar, free_port, running_sidecar

POLICY = """\
version: 1
default_tier: T3
rules:
  - id: read
    match: {hosts: ["127.0.0.1", "localhost"], methods: [GET, HEAD]}
    action: demo.read
    tier: T0
  - id: llm
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/v1/chat/completions"]}
    action: llm.chat
    tier: T0
  - id: mcp
    match: {hosts: ["127.0.0.1"], methods: [POST, DELETE], paths: ["/mcp", "/mcp/"]}
    action: mcp.call
    tier: T1
"""


class H2OnlyServer(threading.Thread):
    """hypercorn serving an ASGI app over TLS whose ALPN offers only h2 (no HTTP/1.1 fallback)."""

    def __init__(self, ca: trustme.CA) -> None:
        super().__init__(daemon=True)
        self.port = free_port()
        self.versions: list[str] = []
        self._ca = ca
        self._shutdown: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.versions.append(scope["http_version"])
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": f"h2 says hi ({scope['http_version']})".encode()})

    def run(self) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        cert = self._ca.issue_cert("localhost", "127.0.0.1")
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.alpn_protocols = ["h2"]
        config.accesslog = None
        config.errorlog = None
        import tempfile

        self._files = tempfile.TemporaryDirectory()
        certfile, keyfile = Path(self._files.name) / "cert.pem", Path(self._files.name) / "key.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
        cert.private_key_pem.write_to_path(str(keyfile))
        config.certfile, config.keyfile = str(certfile), str(keyfile)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._shutdown = asyncio.Event()
        loop.call_soon(self.ready.set)
        loop.run_until_complete(serve(self.app, config, shutdown_trigger=self._shutdown.wait))  # type: ignore[arg-type]
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._shutdown is not None:
            self._loop.call_soon_threadsafe(self._shutdown.set)
            self.join(10)
            self._files.cleanup()


class FakeOpenAI(BackgroundServer):
    """An OpenAI-compatible chat endpoint that streams its chunks 0.4 s apart."""

    def __init__(self) -> None:
        super().__init__("fake-openai")
        self.port = free_port()

    async def _open_sites(self, runner: web.AppRunner) -> None:
        await web.TCPSite(runner, "127.0.0.1", self.port).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, word in enumerate(["Hello", " from", " the", " stream"]):
            chunk = {
                "id": f"chatcmpl-{time.time()}",  # the upstream's clock when it wrote this chunk
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": "fake",
                "choices": [
                    {"index": 0, "delta": {"content": word}, "finish_reason": None if index < 3 else "stop"}
                ],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.4)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def h2_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def h2_server(h2_ca: trustme.CA) -> Iterator[H2OnlyServer]:
    server = H2OnlyServer(h2_ca)
    server.start()
    assert server.ready.wait(10)
    time.sleep(0.5)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clients_sidecar(tmp_path_factory: pytest.TempPathFactory, h2_ca: trustme.CA) -> Iterator[Sidecar]:
    workdir = tmp_path_factory.mktemp("clients")
    ca_file = workdir / "upstream-ca.pem"
    h2_ca.cert_pem.write_to_path(str(ca_file))
    with running_sidecar(workdir, policy=POLICY, args=["--upstream-ca-file", str(ca_file)]) as running:
        yield running


def test_curl_http2_reaches_an_h2_only_server_through_the_sidecar(
    clients_sidecar: Sidecar, h2_server: H2OnlyServer, tmp_path: Path
) -> None:
    ca = tmp_path / "sidecar-ca.pem"
    ca.write_bytes(clients_sidecar.http.get(clients_sidecar.api_url + "/v1/ca.pem", timeout=10).content)
    result = subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", str(ca), "-x", clients_sidecar.proxy_url, "--noproxy", "",
         "-w", "\\n%{http_version} %{http_code}", f"https://localhost:{h2_server.port}/hello"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body, _, status = result.stdout.rpartition("\n")
    assert status == "2 200", result.stdout  # the agent spoke h2 to the sidecar
    assert body == "h2 says hi (2)"  # and the sidecar spoke h2 to the h2-only upstream
    assert h2_server.versions[-1] == "2"


def test_openai_sdk_streaming_gets_its_first_chunk_before_the_stream_ends(
    clients_sidecar: Sidecar, fake_openai: FakeOpenAI
) -> None:
    from openai import OpenAI

    client = OpenAI(
        api_key="sk-test",
        base_url=f"http://127.0.0.1:{fake_openai.port}/v1",
        http_client=cast(Any, httpx.Client(proxy=clients_sidecar.proxy_url, trust_env=False)),
        max_retries=0,
    )
    received: list[float] = []
    sent: list[float] = []
    words: list[str] = []
    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    for chunk in stream:
        received.append(time.time())
        sent.append(float(chunk.id.removeprefix("chatcmpl-")))
        words.append(chunk.choices[0].delta.content or "")
    assert "".join(words) == "Hello from the stream"
    # relayed as written: the first chunk reached the SDK before the upstream wrote the last one
    assert received[0] < sent[-1], (received, sent)


def _run_mcp_server(port: int, ready: threading.Event, stop: threading.Event) -> None:
    server = FastMCP("demo", host="127.0.0.1", port=port)

    @server.tool()
    def search_issues(query: str) -> str:
        """Find issues."""
        return f"found: {query}"

    @server.tool()
    async def long_job(steps: int, ctx: Context) -> str:  # type: ignore[type-arg]
        """Report progress while working."""
        for step in range(steps):
            await ctx.report_progress(step + 1, steps, message=str(time.time()))  # the server's clock
            await asyncio.sleep(0.3)
        return "done"

    config = uvicorn.Config(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="error")
    runner = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(runner.serve())
        while not runner.started:
            await asyncio.sleep(0.05)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        runner.should_exit = True
        await task

    asyncio.run(serve())


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[int]:
    port = free_port()
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=_run_mcp_server, args=(port, ready, stop), daemon=True)
    thread.start()
    assert ready.wait(15)
    yield port
    stop.set()
    thread.join(10)


async def test_mcp_streamable_http_tool_calls_and_progress_stream_through(
    clients_sidecar: Sidecar, mcp_server: int
) -> None:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    progress: list[tuple[float, float]] = []  # (received, sent) per notification

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((time.time(), float(message or "nan")))

    url = f"http://127.0.0.1:{mcp_server}/mcp"
    through_sidecar = httpx.AsyncClient(
        proxy=clients_sidecar.proxy_url, trust_env=False, timeout=httpx.Timeout(30, read=300)
    )
    async with (
        through_sidecar,
        streamable_http_client(url, http_client=through_sidecar) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"search_issues", "long_job"} <= tools
        found = await session.call_tool("search_issues", {"query": "bug"})
        assert found.content[0].text == "found: bug"  # type: ignore[union-attr]
        done = await session.call_tool("long_job", {"steps": 4}, progress_callback=on_progress)  # type: ignore[arg-type]
        assert done.content[0].text == "done"  # type: ignore[union-attr]
    assert len(progress) == 4
    # as they happen, not in one burst: the first arrived before the server sent the last
    assert progress[0][0] < progress[-1][1], progress
