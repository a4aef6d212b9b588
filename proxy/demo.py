"""`vienna run --demo`: a throwaway upstream on loopback, a policy naming it, and every tier tried once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from proxy.keys import Operators

DEMO_OPERATORS = ("alice", "bob")


def demo_policy(port: int) -> str:
    """The built-in policy's tiers, plus rules naming the demo upstream (a loopback address and port)."""
    host = f'"127.0.0.1:{port}"'
    return f"""\
version: 1
default_tier: T2
rules:
  - id: cloud-metadata
    match: {{hosts: ["169.254.169.254", "metadata.google.internal", "fd00:ec2::254"]}}
    action: cloud.metadata
    tier: deny
  - id: demo-read
    match: {{hosts: [{host}], methods: [GET, HEAD, OPTIONS]}}
    action: demo.read
    tier: T0
  - id: demo-note
    match: {{hosts: [{host}], methods: [POST], paths: ["/notes/**"]}}
    action: demo.note
    tier: T1
    limits: {{rate: 30/m}}
  - id: demo-delete-repo
    match: {{hosts: [{host}], methods: [DELETE], paths: ["/repos/{{owner}}/{{repo}}"]}}
    action: demo.delete_repo
    target: "{{owner}}/{{repo}}"
    tier: T3
  - id: demo-write
    match: {{hosts: [{host}]}}
    action: demo.write
    tier: T2
  - id: read
    match: {{methods: [GET, HEAD, OPTIONS]}}
    action: http.read
    tier: T0
"""


@dataclass(frozen=True, slots=True)
class Demo:
    port: int
    runner: web.AppRunner
    tokens: dict[str, str]

    @property
    def policy(self) -> str:
        return demo_policy(self.port)

    @property
    def operators(self) -> Operators:
        return Operators(
            by_digest=tuple(
                (hashlib.sha256(token.encode()).digest(), name) for name, token in self.tokens.items()
            )
        )


async def start_demo_upstream() -> Demo:
    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"upstream": "vienna demo", "method": request.method, "path": request.path, "bytes": len(body)}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = cast(
        asyncio.Server | None, site._server
    )  # aiohttp keeps the bound socket here (port 0: a free one)
    port = int(server.sockets[0].getsockname()[1]) if server is not None and server.sockets else 0
    return Demo(
        port=port,
        runner=runner,
        tokens={name: f"{name}-demo-{secrets.token_hex(8)}" for name in DEMO_OPERATORS},
    )


def try_every_tier(proxy: str, api: str, demo: Demo) -> list[str]:
    """One request per tier through the running proxy; the lines say what each got (blocking I/O)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    base = f"http://127.0.0.1:{demo.port}"
    cases = [
        ("GET", f"{base}/hello", "T0: forwarded at once"),
        ("POST", f"{base}/notes/1", "T1: forwarded, rate-limited"),
        ("PUT", f"{base}/items/42", "T2: needs one operator's approval"),
        ("DELETE", f"{base}/repos/acme/widgets", "T3: needs two operators' approvals"),
        ("GET", "http://169.254.169.254/latest/meta-data/", "deny: never"),
    ]
    lines = ["", "vienna demo: one request per tier through the proxy"]
    opened: list[str] = []
    for method, url, what in cases:
        data = b"{}" if method in ("POST", "PUT") else None
        request = urllib.request.Request(url, method=method, data=data)  # noqa: S310 -- fixed http:// URLs
        try:
            with opener.open(request, timeout=10) as response:
                status, decision, body = (
                    response.status,
                    response.headers.get("Vienna-Decision"),
                    response.read(),
                )
        except urllib.error.HTTPError as refused:
            status, decision, body = refused.code, refused.headers.get("Vienna-Decision"), refused.read()
        except OSError as exc:
            lines.append(f"  {method:6} {url}\n         failed: {exc}")
            continue
        detail = ""
        try:
            parsed = json.loads(body or b"{}")
        except ValueError:
            parsed = {}
        if isinstance(parsed, dict) and parsed.get("warrant_request"):
            request_id = parsed["warrant_request"]["id"]
            opened.append(request_id)
            detail = f" {parsed.get('error')} — warrant request {request_id}"
        elif isinstance(parsed, dict) and parsed.get("reason_code"):
            detail = f" {parsed.get('error')} — {parsed['reason_code']}"
        lines.append(f"  {what:38} {method:6} {url}\n  {'':38} → {status} {decision}{detail}")
    wanted = opened[-1] if opened else "wr_…"
    lines += [
        "",
        "try it yourself (the demo upstream is " + base + "):",
        f"  curl -x {proxy} {base}/hello",
        f"  curl -x {proxy} -X DELETE {base}/repos/acme/widgets",
        f"  vienna approvals list --api {api} --token {demo.tokens['alice']}",
        f"  vienna approvals approve {wanted} --api {api} --token {demo.tokens['alice']} --justification 'why'",
        f"  vienna approvals approve {wanted} --api {api} --token {demo.tokens['bob']} --justification 'why'",
        f"  curl -s {api}/v1/warrant-requests/{wanted}   # its \"warrant\", then retry with -H 'Vienna-Warrant: …'",
        "",
    ]
    return lines
