"""§14 with the real `mcp` package: a FastMCP server with read, destructive and forbidden tools, the
MCP Python client through the sidecar — tool calls classified by name, refusals as JSON-RPC errors
naming the warrant request, a retry with a new JSON-RPC id passing once after approval, `tools/list`
without the denied tools — and credentials injected on the wire that appear nowhere else."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.harness import Sidecar, Upstream, free_port, new_session, running_sidecar

pytestmark = pytest.mark.slow
SECRET = "s3cr3t-" + os.urandom(8).hex()
CALLS: dict[str, int] = {}


def data_of(error: Any) -> dict[str, Any]:
    """The §5 body a JSON-RPC refusal carries in error.data."""
    data = error.error.data
    assert isinstance(data, dict), data
    return data


def policy(mcp_port: int, upstream_port: int) -> str:
    return f"""\
version: 1
default_tier: T3
rules:
  - id: mcp-read
    match: {{hosts: ["127.0.0.1"], paths: ["/mcp"], mcp_tools: ["search_*"]}}
    action: mcp.{{tool}}
    target: "{{arguments.query}}"
    tier: T0
  - id: mcp-delete
    match: {{hosts: ["127.0.0.1"], paths: ["/mcp"], mcp_tools: [delete_repo]}}
    action: mcp.delete_repo
    target: "{{arguments.owner}}/{{arguments.repo}}"
    tier: T3
  - id: mcp-never
    match: {{hosts: ["127.0.0.1"], paths: ["/mcp"], mcp_tools: [read_secret]}}
    action: mcp.forbidden
    tier: deny
  - id: mcp-session
    match: {{hosts: ["127.0.0.1:{mcp_port}"], paths: ["/mcp"]}}
    action: mcp.session
    tier: T0
  - id: creds
    match: {{hosts: ["127.0.0.1:{upstream_port}"], paths: ["/creds/**"]}}
    action: api.with_token
    tier: T0
    inject: {{headers: {{Authorization: "Bearer {{secret:api-token}}"}}}}
"""


def _run_server(port: int, ready: threading.Event, stop: threading.Event) -> None:
    import uvicorn
    from mcp.server.fastmcp import FastMCP

    server = FastMCP("repos", host="127.0.0.1", port=port)

    @server.tool()
    def search_issues(query: str) -> str:
        """Find issues."""
        CALLS["search_issues"] = CALLS.get("search_issues", 0) + 1
        return f"found: {query}"

    @server.tool()
    def delete_repo(owner: str, repo: str) -> str:
        """Delete a repository (destructive)."""
        CALLS["delete_repo"] = CALLS.get("delete_repo", 0) + 1
        return f"deleted {owner}/{repo}"

    @server.tool()
    def read_secret(name: str) -> str:
        """Never to be called."""
        CALLS["read_secret"] = CALLS.get("read_secret", 0) + 1
        return "secret"

    runner = uvicorn.Server(
        uvicorn.Config(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="error")
    )

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
def mcp_port() -> Iterator[int]:
    port = free_port()
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=_run_server, args=(port, ready, stop), daemon=True)
    thread.start()
    assert ready.wait(20)
    yield port
    stop.set()
    thread.join(10)


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("secrets")
    (directory / "api-token").write_text(SECRET + "\n")
    return directory


@pytest.fixture(scope="module")
def mcp_sidecar(
    tmp_path_factory: pytest.TempPathFactory, mcp_port: int, upstream: Upstream, secrets_dir: Path
) -> Iterator[Sidecar]:
    with running_sidecar(
        tmp_path_factory.mktemp("mcp"),
        policy=policy(mcp_port, upstream.port),
        args=["--secrets-dir", str(secrets_dir)],
    ) as sidecar:
        yield sidecar


@contextlib.asynccontextmanager
async def mcp_session(sidecar: Sidecar, port: int, warrant: str | None = None) -> AsyncIterator[Any]:
    """The MCP Python client, its HTTP through the sidecar (with a warrant header when given)."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    headers = {"Vienna-Warrant": warrant} if warrant else {}
    http = httpx.AsyncClient(
        proxy=sidecar.proxy_url, trust_env=False, headers=headers, timeout=httpx.Timeout(30, read=60)
    )
    async with (
        http,
        streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def test_reads_pass_and_tools_list_hides_denied_tools(mcp_sidecar: Sidecar, mcp_port: int) -> None:
    async with mcp_session(mcp_sidecar, mcp_port) as session:
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert tools == {"search_issues", "delete_repo"}  # read_secret's calls are denied: not offered
        found = await session.call_tool("search_issues", {"query": "bug"})
        assert found.content[0].text == "found: bug"


async def test_a_t3_tool_waits_for_two_approvals_then_the_retry_passes_once(
    mcp_sidecar: Sidecar, mcp_port: int
) -> None:
    from mcp.shared.exceptions import McpError

    before = CALLS.get("delete_repo", 0)
    async with mcp_session(mcp_sidecar, mcp_port) as session:
        with pytest.raises(McpError) as refused:
            await session.call_tool("delete_repo", {"owner": "acme", "repo": "app"})
    data = data_of(refused.value)
    request_id = data["warrant_request"]["id"]
    assert (
        request_id in refused.value.error.message
        and data["warrant_request"]["url"] in refused.value.error.message
    )
    assert (
        refused.value.error.code == -32001 and data["tier"] == "T3" and data["intent"]["target"] == "acme/app"
    )
    assert mcp_sidecar.approve(request_id, "alice").status_code == 200
    assert mcp_sidecar.approve(request_id, "bob").status_code == 200
    warrant = mcp_sidecar.get_request(request_id)["warrant"]
    constraints = json.loads(base64.urlsafe_b64decode(warrant.split(".")[1] + "=="))["con"]
    assert (
        constraints["mcp_tool"] == "delete_repo" and "body_sha256" not in constraints
    )  # not the JSON-RPC id

    async with mcp_session(mcp_sidecar, mcp_port, warrant) as approved:
        with pytest.raises(McpError) as changed:
            await approved.call_tool(
                "delete_repo", {"owner": "acme", "repo": "other"}
            )  # one argument changed
        assert data_of(changed.value)["reason_code"] == "warrant.mismatch.mcp"
        done = await approved.call_tool("delete_repo", {"owner": "acme", "repo": "app"})  # a new JSON-RPC id
        assert done.content[0].text == "deleted acme/app"
        with pytest.raises(McpError) as replay:
            await approved.call_tool("delete_repo", {"owner": "acme", "repo": "app"})
        assert data_of(replay.value)["reason_code"] == "warrant.replayed"
    assert CALLS.get("delete_repo", 0) == before + 1


async def test_a_denied_tool_is_a_jsonrpc_error_and_never_reaches_the_server(
    mcp_sidecar: Sidecar, mcp_port: int
) -> None:
    from mcp.shared.exceptions import McpError

    async with mcp_session(mcp_sidecar, mcp_port) as session:
        with pytest.raises(McpError) as denied:
            await session.call_tool("read_secret", {"name": "x"})
    assert data_of(denied.value)["error"] == "denied" and "read_secret" not in CALLS


def test_a_batch_mixing_a_t0_and_a_t3_call_is_refused_as_a_whole(mcp_sidecar: Sidecar, mcp_port: int) -> None:
    before = dict(CALLS)
    batch = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "search_issues", "arguments": {"query": "q"}},
        },
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "delete_repo", "arguments": {"owner": "a", "repo": "b"}},
        },
    ]
    answer = new_session(mcp_sidecar.proxy_url).post(
        f"http://127.0.0.1:{mcp_port}/mcp",
        json=batch,
        headers={"Accept": "application/json, text/event-stream"},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.headers["Vienna-Decision"] == "deny"
    errors = answer.json()
    assert [e["id"] for e in errors] == [1, 2] and {e["error"]["code"] for e in errors} == {-32001}
    assert errors[0]["error"]["data"]["reason_code"] == "mcp.batch_needs_warrant"
    assert dict(CALLS) == before


def test_credentials_are_injected_and_appear_nowhere_else(
    mcp_sidecar: Sidecar, upstream: Upstream, secrets_dir: Path
) -> None:
    answer = mcp_sidecar.request(
        "GET", upstream.url("/creds/one"), headers={"Authorization": "Bearer agent-own-token"}
    )
    assert answer.status_code == 200
    seen = upstream.seen("/creds/one")[-1]
    assert [value for key, value in seen.headers if key == "authorization"] == [f"Bearer {SECRET}"]
    # Rotated like a Kubernetes Secret volume: the new value is used from the next request on.
    replacement = secrets_dir / ".api-token.new"
    replacement.write_text("rotated-" + SECRET + "\n")
    replacement.replace(secrets_dir / "api-token")
    mcp_sidecar.request("GET", upstream.url("/creds/two"))
    assert upstream.seen("/creds/two")[-1].header("authorization") == f"Bearer rotated-{SECRET}"
    # Missing: nothing is forwarded without it.
    (secrets_dir / "api-token").rename(secrets_dir / "parked")
    try:
        missing = mcp_sidecar.request("GET", upstream.url("/creds/three"))
        assert missing.status_code == 503 and missing.json()["reason_code"] == "secret.unavailable"
        assert upstream.seen("/creds/three") == []
    finally:
        (secrets_dir / "parked").rename(secrets_dir / "api-token")
    metrics = new_session().get(mcp_sidecar.api_url + "/metrics", timeout=10).text
    audit = "\n".join(
        str(row) for row in sqlite3.connect(mcp_sidecar.data_dir / "audit.db").execute("SELECT * FROM audit")
    )
    state = "\n".join(
        str(row)
        for row in sqlite3.connect(mcp_sidecar.data_dir / "state.db").execute(
            "SELECT * FROM warrant_requests"
        )
    )
    for where, text in (
        ("audit.db", audit),
        ("state.db", state),
        ("stdout/stderr", mcp_sidecar.log_text()),
        ("/metrics", metrics),
        ("deny body", missing.text),
    ):
        assert SECRET not in text, f"the secret leaked into {where}"
