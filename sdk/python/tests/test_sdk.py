"""vienna-sdk against a real `vienna run`: the five lines, Vienna Direct, agent passback with a
report, and WarrantTransport (sync and async) turning a proxied passback into one approved retry."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.harness import LOOPBACK_HOSTS, TOKENS, Sidecar, Upstream, new_session, running_sidecar
from vienna_sdk import AsyncVienna, AsyncWarrantTransport, Denied, Vienna, WaitTimeout, WarrantTransport

pytestmark = pytest.mark.slow

POLICY = f"""\
version: 1
default_tier: T3
rules:
  - id: reads
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [GET]}}
    action: demo.read
    tier: T0
  - id: writes
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [PUT, POST]}}
    action: demo.write
    tier: T2
  - id: echo
    match: {{hosts: [echo.intents.invalid]}}
    action: demo.echo
    tier: T0
  - id: restart
    match: {{hosts: [restart.intents.invalid]}}
    action: service.restart
    tier: T2
  - id: deploy
    match: {{hosts: [deploy.intents.invalid]}}
    action: app.deploy
    tier: T2
handlers:
  - id: echo
    action: demo.echo
    params: {{word: {{pattern: "^[a-z ]{{1,20}}$"}}}}
    exec: {{argv: ["/bin/echo", "{{word}}"], timeout: 5s}}
  - id: restart
    action: service.restart
    params: {{target: {{pattern: "^[a-z0-9-]{{1,40}}$"}}}}
    exec: {{argv: ["/bin/echo", "restarted", "{{target}}"], timeout: 5s}}
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with running_sidecar(tmp_path_factory.mktemp("sdk"), policy=POLICY) as running:
        yield running


def approve_when_pending(sidecar: Sidecar, *, deny: bool = False, who: str = "alice") -> threading.Thread:
    """An operator in another thread: decides the first pending request it sees."""

    def decide() -> None:
        session = new_session()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pending = session.get(
                sidecar.api_url + "/v1/warrant-requests?status=pending",
                headers={"Authorization": f"Bearer {TOKENS[who]}"},
                timeout=10,
            ).json()
            if pending:
                path = "deny" if deny else "approve"
                session.post(
                    f"{sidecar.api_url}/v1/warrant-requests/{pending[0]['id']}/{path}",
                    headers={"Authorization": f"Bearer {TOKENS[who]}"},
                    json={"justification": "from the sdk test"},
                    timeout=10,
                )
                return
            time.sleep(0.1)

    thread = threading.Thread(target=decide, daemon=True)
    thread.start()
    return thread


def test_the_five_lines(sidecar: Sidecar) -> None:
    operator = approve_when_pending(sidecar)
    vienna = Vienna(sidecar.api_url, agent_id="test-agent")
    answer = vienna.submit("service.restart", "api")
    if answer.mode == "passback":
        answer = vienna.execute(vienna.wait(answer, timeout=30, interval=0.1))
    operator.join(10)
    assert answer.status == "succeeded" and answer.result is not None
    assert answer.result["stdout"] == "restarted api\n" and answer.execution_id is not None
    vienna.close()


def test_direct_answers_and_errors(sidecar: Sidecar) -> None:
    with Vienna(sidecar.api_url) as vienna:
        ran = vienna.submit("demo.echo", params={"word": "hello"})
        assert (
            ran.mode == "direct"
            and ran.status == "succeeded"
            and ran.result == {**(ran.result or {}), "stdout": "hello\n"}
        )
        allowed = vienna.submit("demo.read")
        assert allowed.status == "allowed" and allowed.execution_id is None
        with pytest.raises(Exception) as bad:
            vienna.submit("demo.echo", params={"word": "rm -rf /"})
        assert getattr(bad.value, "reason_code", "") == "params.pattern"


def test_agent_passback_wait_then_report(sidecar: Sidecar) -> None:
    operator = approve_when_pending(sidecar)
    with Vienna(sidecar.api_url) as vienna:
        answer = vienna.wait(
            vienna.submit("app.deploy", "prod", {"version": "1.2.3"}), timeout=30, interval=0.1
        )
        operator.join(10)
        assert answer.approved and answer.warrant_id
        assert vienna.verify(
            answer.warrant or "", action="app.deploy", target="prod", params={"version": "1.2.3"}
        )["valid"]
        recorded = vienna.report(answer, "succeeded", {"deployed": "1.2.3"})
        assert recorded["recorded"] and recorded["valid"] and recorded["warrant_id"] == answer.warrant_id


def test_wait_is_bounded_and_a_deny_is_raised(sidecar: Sidecar) -> None:
    with Vienna(sidecar.api_url) as vienna:
        pending = vienna.submit("app.deploy", "staging", {"version": "9"})
        with pytest.raises(WaitTimeout):
            vienna.wait(pending, timeout=0.3, interval=0.1)
        operator = approve_when_pending(sidecar, deny=True)
        with pytest.raises(Denied):
            vienna.wait(pending, timeout=30, interval=0.1)
        operator.join(10)


def test_warrant_transport_retries_a_proxied_passback_once_with_the_warrant(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    operator = approve_when_pending(sidecar)
    vienna = Vienna(sidecar.api_url)
    with httpx.Client(transport=WarrantTransport(vienna, wait_timeout=30, proxy=sidecar.proxy_url)) as client:
        answer = client.put(upstream.url("/items/sdk-transport"), content=b"payload")
    operator.join(10)
    assert answer.status_code == 200 and answer.headers["Vienna-Decision"] == "allow"
    seen = upstream.seen("/items/sdk-transport")
    assert len(seen) == 1 and seen[0].body == b"payload"
    vienna.close()


def test_warrant_transport_hands_back_the_refusal_when_denied(sidecar: Sidecar, upstream: Upstream) -> None:
    operator = approve_when_pending(sidecar, deny=True)
    vienna = Vienna(sidecar.api_url)
    with httpx.Client(transport=WarrantTransport(vienna, wait_timeout=30, proxy=sidecar.proxy_url)) as client:
        answer = client.put(upstream.url("/items/sdk-denied"), content=b"x")
    operator.join(10)
    assert answer.status_code == 403 and "Vienna-Warrant-Request" in answer.headers
    assert upstream.seen("/items/sdk-denied") == []
    vienna.close()


def test_async_client_and_transport(sidecar: Sidecar, upstream: Upstream) -> None:
    async def scenario() -> tuple[str, int]:
        async with AsyncVienna(sidecar.api_url) as vienna:
            operator = approve_when_pending(sidecar)
            answer = await vienna.submit("service.restart", "web")
            answer = await vienna.execute(await vienna.wait(answer, timeout=30, interval=0.1))
            operator.join(10)
            operator = approve_when_pending(sidecar)
            transport = AsyncWarrantTransport(vienna, wait_timeout=30, proxy=sidecar.proxy_url)
            async with httpx.AsyncClient(transport=transport) as client:
                proxied = await client.post(upstream.url("/items/sdk-async"), content=b"a")
            operator.join(10)
            return answer.status, proxied.status_code

    status, code = asyncio.run(scenario())
    assert status == "succeeded" and code == 200
    assert len(upstream.seen("/items/sdk-async")) == 1


def test_the_sdk_depends_on_httpx_only() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'dependencies = ["httpx>=0.27,<1"]' in text
    import vienna_sdk.client
    import vienna_sdk.transport

    for module in (vienna_sdk.client, vienna_sdk.transport):
        assert "mitmproxy" not in Path(module.__file__ or "").read_text()


def test_the_transport_waits_only_on_the_sidecars_own_refusals() -> None:
    calls: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(
            403,
            headers={
                "Vienna-Decision": "allow",
                "Vienna-Warrant-Request": "wr_x",
                "Vienna-Warrant-Request-Url": "http://127.0.0.1:9/v1/warrant-requests/wr_x",
            },
        )

    vienna = Vienna("http://127.0.0.1:9")  # nothing listens there: a wait would fail loudly
    with httpx.Client(
        transport=WarrantTransport(vienna, wait_timeout=5, transport=httpx.MockTransport(upstream))
    ) as client:
        assert client.get("http://example.test/").status_code == 403  # an upstream's 403, handed back at once

    def elsewhere(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            403,
            headers={
                "Vienna-Decision": "deny",
                "Vienna-Warrant-Request": "wr_x",
                "Vienna-Warrant-Request-Url": "http://evil.test/v1/warrant-requests/wr_x",
            },
        )

    with httpx.Client(
        transport=WarrantTransport(vienna, wait_timeout=5, transport=httpx.MockTransport(elsewhere))
    ) as client:
        assert (
            client.get("http://example.test/").status_code == 403
        )  # a URL off the sidecar's API is never polled
    assert calls == ["http://example.test/"]
    vienna.close()


def test_the_transport_uses_the_agents_proxy_environment(
    sidecar: Sidecar, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx ignores HTTP(S)_PROXY once a transport is given: the transport reads them itself, so an
    agent configured by its environment still goes through the sidecar."""
    monkeypatch.setenv("HTTP_PROXY", sidecar.proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    operator = approve_when_pending(sidecar)
    vienna = Vienna(sidecar.api_url)
    with httpx.Client(transport=WarrantTransport(vienna, wait_timeout=30)) as client:
        answer = client.put(upstream.url("/items/sdk-env"), content=b"e")
    operator.join(10)
    assert answer.status_code == 200 and answer.headers["Vienna-Decision"] == "allow"
    assert len(upstream.seen("/items/sdk-env")) == 1
    vienna.close()
