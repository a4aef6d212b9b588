"""§12: a refusal that opened a warrant request says so where ordinary tools look — headers, the
HTTP/1 status line, and the `reason` text that SDKs print — with real clients (requests, curl,
the openai SDK) through the shared sidecar."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any, cast

import pytest
import requests

from tests.integration.harness import Sidecar, Upstream, clean_env, new_session


def test_headers_and_reason_name_the_warrant_request(sidecar: Sidecar, upstream: Upstream) -> None:
    answer = sidecar.request("PUT", upstream.url("/items/visible-1"), data=b"x")
    assert answer.status_code == 403
    body = answer.json()
    request_id, url = body["warrant_request"]["id"], body["warrant_request"]["url"]
    assert answer.headers["Vienna-Warrant-Request"] == request_id
    assert answer.headers["Vienna-Warrant-Request-Url"] == url
    assert request_id in body["reason"] and url in body["reason"]
    assert answer.reason == f"Warrant Required ({request_id})"
    # requests' own error message carries the status line's reason.
    with pytest.raises(requests.HTTPError, match=re.escape(request_id)):
        answer.raise_for_status()
    # A refusal that opened nothing carries no such header.
    denied = sidecar.request("GET", upstream.url("/forbidden/x"))
    assert denied.status_code == 403 and "Vienna-Warrant-Request" not in denied.headers


def test_curl_shows_the_warrant_request_in_its_headers(sidecar: Sidecar, upstream: Upstream) -> None:
    done = subprocess.run(
        ["curl", "-s", "-i", "-x", sidecar.proxy_url, "-X", "DELETE", upstream.url("/repos/acme/visible")],
        capture_output=True, text=True, env=clean_env(), timeout=30, check=False,
    )  # fmt: skip
    head, _, raw = done.stdout.partition("\n\n")  # (text mode turned CRLF into LF)
    assert raw, done.stdout + done.stderr
    request_id = json.loads(raw)["warrant_request"]["id"]
    assert f"HTTP/1.1 403 Warrant Required ({request_id})" in head
    assert f"Vienna-Warrant-Request: {request_id}" in head.splitlines()


def test_the_openai_sdk_error_names_the_warrant_request(sidecar: Sidecar, upstream: Upstream) -> None:
    import httpx
    from openai import OpenAI, PermissionDeniedError

    with httpx.Client(proxy=sidecar.proxy_url, trust_env=False) as http_client:
        client = OpenAI(
            api_key="sk-test",
            base_url=upstream.url("/items/openai"),  # a POST the policy gives T2
            http_client=cast(Any, http_client),
            max_retries=0,
        )
        with pytest.raises(PermissionDeniedError) as refused:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    # The SDK prints only `error.message` of an object-shaped error, and §5's `error` is a string, so
    # its message stays "Error code: 403"; what it hands the caller carries the warrant request.
    response = refused.value.response
    request_id = response.headers["Vienna-Warrant-Request"]
    assert (
        request_id in response.json()["reason"]
        and response.headers["Vienna-Warrant-Request-Url"] in response.json()["reason"]
    )
    assert "403" in str(refused.value)


def test_intent_passbacks_carry_the_headers_too(sidecar: Sidecar) -> None:
    answer = new_session().post(
        sidecar.api_url + "/v1/intents", json={"action": "demo.delete_repo", "target": "acme/x"}, timeout=15
    )
    assert answer.status_code == 200 and answer.json()["mode"] == "passback"
    assert answer.headers["Vienna-Warrant-Request"] == answer.json()["warrant_request"]["id"]


def test_an_upstreams_passback_headers_are_not_relayed(sidecar: Sidecar) -> None:
    """Only the sidecar names warrant requests: a site answering 403 with these headers must not be
    able to send an SDK off to wait on (and fetch) a URL of its choosing."""
    import asyncio
    import socket

    from aiohttp import web

    from tests.background_server import BackgroundServer

    class Spoofer(BackgroundServer):
        def __init__(self) -> None:
            super().__init__("spoofer")
            self.sock = socket.create_server(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]

        async def _open_sites(self, runner: web.AppRunner) -> None:
            await web.SockSite(runner, self.sock).start()

        async def _handle(self, request: web.Request) -> web.StreamResponse:
            await asyncio.sleep(0)
            return web.json_response(
                {"error": "nope"},
                status=403,
                headers={
                    "Vienna-Warrant-Request": "wr_spoofed",
                    "Vienna-Warrant-Request-Url": "http://evil.example/x",
                },
            )

    spoofer = Spoofer()
    spoofer.start()
    try:
        answer = sidecar.request("GET", f"http://127.0.0.1:{spoofer.port}/anything")
        assert answer.status_code == 403 and answer.headers["Vienna-Decision"] == "allow"
        assert (
            "Vienna-Warrant-Request" not in answer.headers
            and "Vienna-Warrant-Request-Url" not in answer.headers
        )
    finally:
        spoofer.stop()
