"""Real parts for the enforcement loop: a recording loopback upstream, `vienna run` subprocesses, operator calls."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from tests.background_server import BackgroundServer, Seen, read_seen
from tests.vienna_process import run_command

AGENT_ID = "test-agent"
# Operator tokens. The agent's own id is an operator name too, to show it still cannot approve itself.
TOKENS: dict[str, str] = {
    "alice": "alice-token-" + "a" * 24,
    "bob": "bob-token-" + "b" * 24,
    "carol": "carol-token-" + "c" * 24,
    AGENT_ID: "agent-token-" + "d" * 24,
}
LOOPBACK_HOSTS = '["127.0.0.1", "localhost"]'
READY_TIMEOUT = 30.0

# The policy most tests run against: every tier, a rate limit, a `when` that cannot be evaluated,
# and a rule whose warrants are bound to the path and good for two uses.
STANDARD_POLICY = f"""\
version: 1
default_tier: T3
rules:
  - id: forbidden
    match: {{hosts: {LOOPBACK_HOSTS}, paths: ["/forbidden/**"]}}
    action: demo.forbidden
    tier: deny
  - id: guarded-read
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [GET], paths: ["/guarded/**"]}}
    when: 'request.json.amount > 100'   # a GET has no JSON body: evaluating this fails
    action: demo.guarded_read
    tier: T0
  - id: read
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [GET, HEAD]}}
    action: demo.read
    tier: T0
  - id: notes
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [POST], paths: ["/notes/**"]}}
    action: demo.note
    tier: T1
  - id: limited
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [POST], paths: ["/limited/**"]}}
    action: demo.limited
    tier: T1
    limits: {{rate: 2/m}}
  - id: items-write
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [PUT, POST], paths: ["/items/**"]}}
    action: demo.write_item
    tier: T2
  - id: batch-write
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [POST], paths: ["/batch/{{batch}}/**"]}}
    action: demo.batch_write
    tier: T2
    warrant: {{max_uses: 2, bind: path, ttl: 10m}}
  - id: delete-repo
    match: {{hosts: {LOOPBACK_HOSTS}, methods: [DELETE], paths: ["/repos/{{owner}}/{{repo}}"]}}
    action: demo.delete_repo
    target: "{{owner}}/{{repo}}"
    tier: T3
"""


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without proxy or VIENNA_* settings that would change what runs."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy") and not key.startswith("VIENNA_")
    }
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def new_session(proxy: str | None = None) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # NO_PROXY or a netrc must not change where a request goes
    if proxy is not None:
        session.proxies = {"http": proxy, "https": proxy}
    return session


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


# --- upstream -------------------------------------------------------------------------------------


class Upstream(BackgroundServer):
    """An aiohttp server on its own thread and loop that records every request it receives.

    `/slow?seconds=N` answers after N seconds, `/redirect` answers 302 to `/landing`, `/big?bytes=N`
    answers N bytes, `/chunked` answers in chunked encoding, anything else answers 200 with a small
    JSON body. It listens on 127.0.0.1 and, when the host has it, ::1 on
    the same port, so `localhost` reaches it whichever address the name resolves to.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__("upstream")
        self._ssl = ssl_context
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.port = 0

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    def url(self, path: str, *, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def seen(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [item for item in self._seen if path is None or item.path == path]

    def start(self) -> None:
        first = socket.create_server(("127.0.0.1", 0))
        self.port = first.getsockname()[1]
        self._sockets = [first]
        with contextlib.suppress(OSError):
            self._sockets.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        super().start()

    async def _open_sites(self, runner: web.AppRunner) -> None:
        for sock in self._sockets:
            await web.SockSite(runner, sock, ssl_context=self._ssl).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = await read_seen(request)
        path = seen.path
        with self._lock:
            self._seen.append(seen)
        if path == "/slow":
            await asyncio.sleep(float(request.query.get("seconds", "2")))
        if path == "/redirect":
            return web.Response(status=302, headers={"Location": "/landing"})
        if path == "/big":
            return web.Response(body=b"z" * int(request.query["bytes"]))
        if path == "/chunked":
            streamed = web.StreamResponse(headers={"Content-Type": "text/plain"})
            streamed.enable_chunked_encoding()
            await streamed.prepare(request)
            for number in range(5):
                await streamed.write(b"chunk-%d;" % number)
            await streamed.write_eof()
            return streamed
        return web.json_response({"ok": True, "method": request.method, "path": path})


# --- the sidecar ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyAnswer:
    """What a client read from the proxy: status, lower-case headers, body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


class Sidecar:
    """One `vienna run` subprocess with its own policy, operators file, warrant key and data dir."""

    def __init__(
        self,
        workdir: Path,
        *,
        policy: str = STANDARD_POLICY,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        audit_stdout: bool = True,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.policy_file = workdir / "policy.yaml"
        self.policy_file.write_text(policy)
        self.operators_file = workdir / "operators.yaml"
        self.operators_file.write_text(
            "operators:\n"
            + "".join(
                f"  - name: {name}\n    token_sha256: {hashlib.sha256(token.encode()).hexdigest()}\n"
                for name, token in TOKENS.items()
            )
        )
        self.key_file = workdir / "warrant.key"
        self.key_file.write_text(secrets.token_hex(48))
        self.data_dir = workdir / "data"
        self.log_file = workdir / "vienna.log"
        self.args = list(args)
        self.env = dict(env or {})
        self.audit_stdout = audit_stdout
        self.proxy_port = free_port()
        self.api_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._log: Any = None
        self.http = new_session()
        self.proxied = new_session(self.proxy_url)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def warrant_secret(self) -> bytes:
        """The HMAC secret exactly as the sidecar reads it (file bytes, whitespace stripped)."""
        return self.key_file.read_bytes().strip()

    def command(self) -> list[str]:
        return run_command(
            policy=self.policy_file,
            proxy_port=self.proxy_port,
            api_port=self.api_port,
            data_dir=self.data_dir,
            agent_id=AGENT_ID,
            warrant_key=self.key_file,
            operators=self.operators_file,
            extra=["--audit-stdout", "true" if self.audit_stdout else "false", *self.args],
        )

    def start(self) -> None:
        assert self.process is None, "already running"
        self._log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=clean_env(self.env),
        )
        self.returncode = None
        self.http = new_session()
        self.proxied = new_session(self.proxy_url)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail_start(f"vienna run exited with {self.process.returncode} before it was ready")
            with contextlib.suppress(requests.RequestException):
                if self.http.get(self.api_url + "/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self._fail_start(f"vienna run was not ready within {READY_TIMEOUT:.0f}s")

    def _fail_start(self, what: str) -> None:
        self.stop()
        pytest.fail(f"{what}; its log:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; returns the exit status (killing it only if it hangs)."""
        self.http.close()  # the sidecar's shutdown need not cut our idle keep-alive connections
        self.proxied.close()
        if self.process is not None:
            process, self.process = self.process, None
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                self.returncode = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                self.returncode = -9
        if self._log is not None:
            self._log.close()
            self._log = None
        assert self.returncode is not None, "never started"
        return self.returncode

    def kill(self) -> None:
        """kill -9: no shutdown code runs (what the data dir holds is all that survives)."""
        assert self.process is not None, "not running"
        process, self.process = self.process, None
        process.kill()
        process.wait()
        self.returncode = -9
        self.http.close()
        self.proxied.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Stop and start again on the same ports, key and data dir."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    # --- as the agent -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        warrant: str | None = None,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        verify: str | bool = True,
    ) -> requests.Response:
        """One request through the proxy with `requests`; redirects are not followed."""
        sent = dict(headers or {})
        if warrant is not None:
            sent["Vienna-Warrant"] = warrant
        return self.proxied.request(
            method, url, headers=sent, data=data, timeout=30, allow_redirects=False, verify=verify
        )

    # --- as an operator ---------------------------------------------------------------------------

    def api(
        self, method: str, path: str, *, token: str | None = None, body: Mapping[str, Any] | None = None
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.http.request(method, self.api_url + path, headers=headers, json=body, timeout=15)

    def approve(
        self, request_id: str, who: str, justification: str = "needed for the test"
    ) -> requests.Response:
        return self.api(
            "POST",
            f"/v1/warrant-requests/{request_id}/approve",
            token=TOKENS[who],
            body={"justification": justification},
        )

    def deny(self, request_id: str, who: str, justification: str = "not today") -> requests.Response:
        return self.api(
            "POST",
            f"/v1/warrant-requests/{request_id}/deny",
            token=TOKENS[who],
            body={"justification": justification},
        )

    def get_request(self, request_id: str) -> dict[str, Any]:
        response = self.api("GET", f"/v1/warrant-requests/{request_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def obtain_warrant(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        approvers: Sequence[str] = ("alice",),
        verify: str | bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """The passback a request gets, approved by `approvers`: the warrant for exactly that request."""
        refused = self.request(method, url, data=data, verify=verify, headers=headers)
        assert refused.status_code == 403, refused.text
        request_id = refused.json()["warrant_request"]["id"]
        for who in approvers:
            approved = self.approve(request_id, who)
            assert approved.status_code == 200, approved.text
        warrant = self.get_request(request_id).get("warrant")
        assert isinstance(warrant, str), "no warrant after the approvals"
        return warrant


def raw_connect(proxy_port: int, authority: str) -> ProxyAnswer:
    """Send a bare CONNECT and read the proxy's own answer (clients hide a refused CONNECT's body)."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
        return ProxyAnswer(status=int(lines[0].split()[1]), headers=headers, body=body[:length])


@contextlib.contextmanager
def running_sidecar(workdir: Path, **options: Any) -> Iterator[Sidecar]:
    sidecar = Sidecar(workdir, **options)
    sidecar.start()
    try:
        yield sidecar
    finally:
        sidecar.stop()


def assert_refused(
    answer: requests.Response | ProxyAnswer, status: int, error: str, reason_code: str
) -> dict[str, Any]:
    """A refusal the proxy made itself: status, `Vienna-Decision: deny`, JSON error and reason_code."""
    headers: Mapping[str, str]
    if isinstance(answer, requests.Response):
        got_status, headers, raw = answer.status_code, answer.headers, answer.content
    else:
        got_status, headers, raw = answer.status, answer.headers, answer.body
    assert got_status == status, raw[:2000]
    decision = {key.lower(): value for key, value in headers.items()}.get("vienna-decision")
    assert decision == "deny", (decision, raw[:2000])
    body = json.loads(raw)
    assert isinstance(body, dict)
    assert body["error"] == error, body
    assert body["reason_code"] == reason_code, body
    return body
