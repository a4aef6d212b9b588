"""`vienna run --mode transparent` inside a network namespace this module creates.

Layout inside the namespace `vienna-test-<random>`:
- the upstream: an aiohttp server in this process whose sockets were created inside the namespace
  (10.203.0.1:80 and :8081 plain, :443 TLS with a trustme certificate for `api.vienna.test`);
- the sidecar: `vienna run --mode transparent` as uid 0, proxy on 0.0.0.0:15001, API on 127.0.0.1:15020;
- the redirect: nat OUTPUT tcp 80, 443 and 8081 → 15001 for every uid but 0 (iptables, else nft);
- the agent: a stdlib-only Python process run as uid/gid 65534 with no proxy variables at all.

Whatever the machine lacks (root, `ip netns`, iptables and nft, setpriv/runuser, an interpreter
uid 65534 may run) makes the whole module skip, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

pytestmark = pytest.mark.netns

VIENNA = Path(sys.executable).with_name("vienna")
UPSTREAM_IP = "10.203.0.1"  # RFC 1918: internal, so the policy must name it exactly
UPSTREAM_NAME = "api.vienna.test"  # resolved through the namespace's own /etc/hosts
PLAIN_PORTS = (80, 8081)
TLS_PORT = 443
PROXY_PORT = 15001
API_PORT = 15020
SIDECAR_UID = 0
AGENT_UID = 65534
AGENT_ID = "netns-agent"
READY_TIMEOUT = 20.0

POLICY = f"""\
version: 1
default_tier: T3
rules:
  - id: read
    match: {{hosts: ["{UPSTREAM_IP}", "{UPSTREAM_NAME}"], methods: [GET, HEAD]}}
    action: demo.read
    tier: T0
  - id: delete-repo
    match: {{hosts: ["{UPSTREAM_IP}", "{UPSTREAM_NAME}"], methods: [DELETE], paths: ["/repos/{{owner}}/{{repo}}"]}}
    action: demo.delete_repo
    target: "{{owner}}/{{repo}}"
    tier: T3
"""

# The agent: Python standard library only (it runs under an interpreter uid 65534 can execute, not
# necessarily this venv's). argv[1] is a JSON list of steps; it prints one JSON object.
AGENT = r"""
import http.client, json, os, socket, ssl, sys

def answer(status, headers, body):
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return {"status": status, "headers": {k.lower(): v for k, v in headers}, "text": text, "json": parsed}

def fetch_ca(api_port):
    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=10)
    conn.request("GET", "/v1/ca.pem")
    response = conn.getresponse()
    pem = response.read().decode()
    conn.close()
    if response.status != 200:
        raise RuntimeError("GET /v1/ca.pem answered %d" % response.status)
    return pem

def step(item, ca):
    if item.get("raw"):  # HTTP/1.0 without any Host header: only the dialled address names the server
        with socket.create_connection((item["host"], item["port"]), timeout=10) as sock:
            sock.sendall(item["raw"].encode())
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if ":" in line]
        return answer(status, headers, body)
    if item.get("tls"):
        context = ssl.create_default_context(cadata=ca)
        conn = http.client.HTTPSConnection(item["host"], item["port"], timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection(item["host"], item["port"], timeout=10)
    headers = item.get("headers", {})
    conn.putrequest(item["method"], item["path"], skip_host="host" in {k.lower() for k in headers},
                    skip_accept_encoding=True)
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    result = answer(response.status, response.getheaders(), response.read())
    conn.close()
    return result

steps = json.loads(sys.argv[1])
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
       "proxy_env": sorted(k for k in os.environ if k.lower().endswith("_proxy")), "results": []}
ca = fetch_ca(int(sys.argv[2])) if any(item.get("tls") for item in steps) else None
for item in steps:
    try:
        out["results"].append(step(item, ca))
    except Exception as exc:
        out["results"].append({"error": "%s: %s" % (type(exc).__name__, exc)})
print(json.dumps(out))
"""


# --- small helpers --------------------------------------------------------------------------------


def _run(
    argv: Sequence[str], *, stdin: str | None = None, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def _why(done: subprocess.CompletedProcess[str]) -> str:
    return (
        (done.stderr or done.stdout).strip().splitlines()[-1]
        if (done.stderr or done.stdout).strip()
        else f"exit {done.returncode}"
    )


def in_netns[T](namespace: str, call: Callable[[], T]) -> T:
    """Run `call` on a fresh thread that first joined the namespace; sockets it makes live there."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            with Path(f"/run/netns/{namespace}").open("rb") as handle:
                os.setns(handle.fileno(), os.CLONE_NEWNET)
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=body, name=f"in-{namespace}")
    thread.start()
    thread.join(30)
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the upstream received it, and on which of its ports."""

    method: str
    path: str
    port: int
    tls: bool
    host_header: str | None


class NetnsUpstream:
    """An aiohttp server on its own thread, listening on sockets created inside the namespace."""

    def __init__(self, sockets: list[tuple[socket.socket, ssl.SSLContext | None]]) -> None:
        self._sockets = sockets
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name="netns-upstream", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the upstream did not start")

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        for sock, _ in self._sockets:
            sock.close()

    def seen(self, path: str) -> list[Seen]:
        with self._lock:
            return [item for item in self._seen if item.path == path]

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        loop.run_until_complete(runner.setup())
        for sock, context in self._sockets:
            loop.run_until_complete(web.SockSite(runner, sock, ssl_context=context).start())
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def _handle(self, request: web.Request) -> web.Response:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = int(sockname[1]) if sockname else 0
        seen = Seen(
            method=request.method,
            path=request.path,
            port=port,
            tls=request.secure,
            host_header=request.headers.get("Host"),
        )
        with self._lock:
            self._seen.append(seen)
        return web.json_response({"ok": True, "path": request.path, "port": port})


@dataclass
class Netns:
    """Everything the module fixture set up; `agent` runs steps as uid 65534 inside the namespace."""

    name: str
    workdir: Path
    upstream: NetnsUpstream
    sidecar: subprocess.Popen[bytes]
    sidecar_log: Path
    redirect_tool: str
    agent_prefix: list[str]
    interpreter: str

    def agent(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        argv = [
            "ip", "netns", "exec", self.name, *self.agent_prefix,
            self.interpreter, "-I", "-S", "-c", AGENT, json.dumps(steps), str(API_PORT),
        ]  # fmt: skip
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd="/",
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},  # no proxy variables
        )
        assert done.returncode == 0, f"agent failed ({done.returncode}): {done.stderr[-2000:]}"
        out: dict[str, Any] = json.loads(done.stdout)
        return out

    def one(self, step: dict[str, Any]) -> dict[str, Any]:
        out = self.agent([step])
        assert out["uid"] == AGENT_UID and out["gid"] == AGENT_UID and set(out["groups"]) <= {AGENT_UID}
        assert out["proxy_env"] == []
        result: dict[str, Any] = out["results"][0]
        assert "error" not in result, result
        return result

    def audit_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.sidecar_log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"vienna.audit"' in line:
                events.append(json.loads(line))
        return events

    def decision(self, decision_id: str) -> dict[str, Any]:
        """The audit `decision` event with this id (from the sidecar's JSON lines on stdout)."""
        deadline = time.monotonic() + 5
        while True:
            for event in self.audit_events():
                if event["type"] == "decision" and event["payload"].get("decision_id") == decision_id:
                    payload: dict[str, Any] = event["payload"]
                    return payload
            if time.monotonic() > deadline:
                raise AssertionError(f"no decision event {decision_id}; log:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        return self.sidecar_log.read_text(errors="replace")[-4000:]


# --- setting up (each step either works or skips with its reason) -------------------------------


def _agent_prefix() -> list[str]:
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}", "--clear-groups", "--"]
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    pytest.skip("neither setpriv nor runuser is available to run the agent as uid 65534")


def _agent_interpreter(prefix: list[str]) -> str:
    """A Python that uid 65534 can execute (this venv's may sit under an unreadable home)."""
    candidates = [shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin"), sys.executable]
    for candidate in dict.fromkeys(c for c in candidates if c):
        done = _run([*prefix, candidate, "-I", "-S", "-c", "import http.client, ssl, json"])
        if done.returncode == 0:
            return candidate
    pytest.skip(f"no Python interpreter that uid {AGENT_UID} may run (tried {candidates})")


def _install_redirect(name: str) -> str:
    """nat OUTPUT REDIRECT of the upstream ports to the sidecar for every uid but the sidecar's."""
    ports = (*PLAIN_PORTS, TLS_PORT)
    failures = []
    if shutil.which("iptables"):
        for port in ports:
            done = _run([
                "ip", "netns", "exec", name, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
                "--dport", str(port), "-m", "owner", "!", "--uid-owner", str(SIDECAR_UID),
                "-j", "REDIRECT", "--to-ports", str(PROXY_PORT),
            ])  # fmt: skip
            if done.returncode != 0:
                failures.append(f"iptables: {_why(done)}")
                _run(["ip", "netns", "exec", name, "iptables", "-t", "nat", "-F", "OUTPUT"])
                break
        else:
            return "iptables"
    if shutil.which("nft"):
        ruleset = (
            "table ip vienna_test {\n  chain out {\n    type nat hook output priority -100; policy accept;\n"
            f"    meta skuid != {SIDECAR_UID} tcp dport {{ {', '.join(map(str, ports))} }} "
            f"redirect to :{PROXY_PORT}\n  }}\n}}\n"
        )
        done = _run(["ip", "netns", "exec", name, "nft", "-f", "-"], stdin=ruleset)
        if done.returncode == 0:
            return "nft"
        failures.append(f"nft: {_why(done)}")
    pytest.skip("cannot install a nat OUTPUT redirect: " + ("; ".join(failures) or "no iptables or nft"))


def _upstream_sockets(name: str, tls_ca: trustme.CA) -> list[tuple[socket.socket, ssl.SSLContext | None]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert(UPSTREAM_NAME, UPSTREAM_IP).configure_cert(context)

    def make() -> list[tuple[socket.socket, ssl.SSLContext | None]]:
        made: list[tuple[socket.socket, ssl.SSLContext | None]] = [
            (socket.create_server((UPSTREAM_IP, port)), None) for port in PLAIN_PORTS
        ]
        made.append((socket.create_server((UPSTREAM_IP, TLS_PORT)), context))
        return made

    return in_netns(name, make)


def _wait_ready(netns_name: str, process: subprocess.Popen[bytes], log: Path) -> None:
    def ready() -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", API_PORT), timeout=1) as sock,
        ):
            sock.sendall(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return sock.recv(64).split(b" ")[1:2] == [b"200"]
        return False

    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vienna run exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if in_netns(netns_name, ready):
            return
        time.sleep(0.1)
    raise RuntimeError(f"vienna run not ready within {READY_TIMEOUT:.0f}s:\n{log.read_text()[-4000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def netns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Netns]:
    if sys.platform != "linux":
        pytest.skip("network namespaces are Linux-only")
    if os.geteuid() != 0:
        pytest.skip("needs root (creating a network namespace and nat rules)")
    if not hasattr(os, "setns"):
        pytest.skip("os.setns is unavailable")
    if not shutil.which("ip"):
        pytest.skip("the ip command (iproute2) is not installed")
    prefix = _agent_prefix()
    interpreter = _agent_interpreter(prefix)

    name = f"vienna-test-{secrets.token_hex(4)}"
    cleanups: list[Callable[[], None]] = []

    def teardown() -> None:
        for undo in reversed(cleanups):
            with contextlib.suppress(Exception):
                undo()

    try:
        done = _run(["ip", "netns", "add", name])
        if done.returncode != 0:
            pytest.skip(f"ip netns add failed: {_why(done)}")

        def delete_namespace() -> None:
            _run(["ip", "netns", "del", name])

        cleanups.append(delete_namespace)
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{UPSTREAM_IP}/32", "dev", "lo"],
        ):
            done = _run(["ip", "netns", "exec", name, *argv])
            if done.returncode != 0:
                pytest.skip(f"{' '.join(argv)} in the namespace failed: {_why(done)}")
        # `ip netns exec` bind-mounts /etc/netns/<name>/hosts over /etc/hosts for what it starts
        etc_netns = Path("/etc/netns")
        created_etc_netns = not etc_netns.exists()
        etc = etc_netns / name
        etc.mkdir(parents=True)

        def remove_etc() -> None:
            shutil.rmtree(etc, ignore_errors=True)
            if created_etc_netns:
                with contextlib.suppress(OSError):
                    etc_netns.rmdir()  # only if empty: another user may have put a namespace there since

        cleanups.append(remove_etc)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{UPSTREAM_IP} {UPSTREAM_NAME}\n")
        redirect_tool = _install_redirect(name)

        tls_ca = trustme.CA()
        upstream = NetnsUpstream(_upstream_sockets(name, tls_ca))
        upstream.start()
        cleanups.append(upstream.stop)

        workdir = tmp_path_factory.mktemp("netns")
        (workdir / "policy.yaml").write_text(POLICY)
        (workdir / "warrant.key").write_text(secrets.token_hex(48))
        tls_ca.cert_pem.write_to_path(str(workdir / "upstream-ca.pem"))
        log = workdir / "vienna.log"
        with log.open("ab") as sink:
            sidecar = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    name,
                    str(VIENNA),
                    "run",
                    "--mode",
                    "transparent",
                    "--listen",
                    f"0.0.0.0:{PROXY_PORT}",
                    "--api",
                    f"127.0.0.1:{API_PORT}",
                    "--policy",
                    str(workdir / "policy.yaml"),
                    "--data-dir",
                    str(workdir / "data"),
                    "--agent-id",
                    AGENT_ID,
                    "--warrant-key-file",
                    str(workdir / "warrant.key"),
                    "--upstream-ca-file",
                    str(workdir / "upstream-ca.pem"),
                    "--audit-stdout",
                    "true",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env={
                    key: value
                    for key, value in os.environ.items()
                    if not key.lower().endswith("_proxy") and not key.startswith("VIENNA_")
                }
                | {"PYTHONUNBUFFERED": "1"},
            )
        cleanups.append(lambda: _stop(sidecar))
        _wait_ready(name, sidecar, log)
        yield Netns(
            name=name,
            workdir=workdir,
            upstream=upstream,
            sidecar=sidecar,
            sidecar_log=log,
            redirect_tool=redirect_tool,
            agent_prefix=prefix,
            interpreter=interpreter,
        )
    finally:
        teardown()


# --- the tests ------------------------------------------------------------------------------------


def test_agent_runs_unprivileged_without_proxy_variables(netns: Netns) -> None:
    out = netns.agent([])
    assert (out["uid"], out["gid"]) == (AGENT_UID, AGENT_UID)
    assert set(out["groups"]) <= {AGENT_UID}  # no root group, no supplementary groups
    assert out["proxy_env"] == []
    assert netns.redirect_tool in ("iptables", "nft")


def test_t0_get_is_forwarded_to_the_dialled_address(netns: Netns) -> None:
    result = netns.one({"method": "GET", "host": UPSTREAM_IP, "port": 80, "path": "/t0/read"})

    assert result["status"] == 200, result
    assert result["headers"]["vienna-decision"] == "allow"
    assert result["json"] == {"ok": True, "path": "/t0/read", "port": 80}
    seen = netns.upstream.seen("/t0/read")
    assert [(item.method, item.port, item.tls) for item in seen] == [("GET", 80, False)]
    decision = netns.decision(result["headers"]["vienna-decision-id"])
    assert decision["decision"] == "allow" and decision["forwarded"] is True and decision["tier"] == "T0"
    assert decision["request"]["host"] == UPSTREAM_IP
    assert decision["request"]["port"] == 80
    assert decision["request"]["address"] == UPSTREAM_IP
    assert decision["intent"]["rule"] == "read"


def test_the_dialled_port_is_recovered_when_the_host_header_has_none(netns: Netns) -> None:
    """Dialled :8081 with `Host: 10.203.0.1` (no port): only SO_ORIGINAL_DST knows it was 8081."""
    result = netns.one(
        {
            "method": "GET",
            "host": UPSTREAM_IP,
            "port": 8081,
            "path": "/t0/port",
            "headers": {"Host": UPSTREAM_IP},
        }
    )

    assert result["status"] == 200, result
    assert result["headers"]["vienna-decision"] == "allow"
    assert [item.port for item in netns.upstream.seen("/t0/port")] == [8081]
    decision = netns.decision(result["headers"]["vienna-decision-id"])
    assert (decision["request"]["host"], decision["request"]["port"]) == (UPSTREAM_IP, 8081)


def test_a_request_without_host_header_goes_to_the_original_destination(netns: Netns) -> None:
    """HTTP/1.0 with no Host header and no TLS: the address the agent dialled is the only name."""
    result = netns.one({"raw": "GET /t0/nohost HTTP/1.0\r\n\r\n", "host": UPSTREAM_IP, "port": 8081})

    assert result["status"] == 200, result
    assert result["headers"]["vienna-decision"] == "allow"
    seen = netns.upstream.seen("/t0/nohost")
    assert [(item.method, item.port) for item in seen] == [("GET", 8081)]
    assert seen[0].host_header == f"{UPSTREAM_IP}:8081"  # the sidecar names what it classified
    decision = netns.decision(result["headers"]["vienna-decision-id"])
    assert (decision["request"]["host"], decision["request"]["port"]) == (UPSTREAM_IP, 8081)
    assert decision["request"]["address"] == UPSTREAM_IP


def test_t3_delete_gets_the_passback_and_never_reaches_the_upstream(netns: Netns) -> None:
    result = netns.one({"method": "DELETE", "host": UPSTREAM_IP, "port": 80, "path": "/repos/acme/widgets"})

    assert result["status"] == 403, result
    assert result["headers"]["vienna-decision"] == "deny"
    body = result["json"]
    assert body["error"] == "warrant_required"
    assert body["tier"] == "T3"
    assert body["intent"] == {"action": "demo.delete_repo", "target": "acme/widgets", "rule": "delete-repo"}
    assert body["warrant_request"]["status"] == "pending"
    assert body["warrant_request"]["approvals_required"] == 2
    assert body["constraints"]["host"] == UPSTREAM_IP and body["constraints"]["port"] == 80
    assert netns.upstream.seen("/repos/acme/widgets") == []
    decision = netns.decision(result["headers"]["vienna-decision-id"])
    assert decision["decision"] == "warrant_required" and decision["forwarded"] is False
    assert (decision["request"]["host"], decision["request"]["port"]) == (UPSTREAM_IP, 80)
    assert decision["warrant_request_id"] == body["warrant_request"]["id"]


def test_https_t0_passes_over_transparent_tls(netns: Netns) -> None:
    """The agent trusts only the sidecar's CA (GET /v1/ca.pem); SNI and Host name api.vienna.test."""
    result = netns.one(
        {"method": "GET", "host": UPSTREAM_NAME, "port": TLS_PORT, "path": "/tls/read", "tls": True}
    )

    assert result["status"] == 200, result
    assert result["headers"]["vienna-decision"] == "allow"
    assert result["json"] == {"ok": True, "path": "/tls/read", "port": TLS_PORT}
    seen = netns.upstream.seen("/tls/read")
    assert [(item.method, item.port, item.tls, item.host_header) for item in seen] == [
        ("GET", TLS_PORT, True, UPSTREAM_NAME)
    ]
    decision = netns.decision(result["headers"]["vienna-decision-id"])
    request = decision["request"]
    assert (request["scheme"], request["host"], request["port"]) == ("https", UPSTREAM_NAME, TLS_PORT)
    assert request["address"] == UPSTREAM_IP


def test_https_t3_delete_gets_the_passback(netns: Netns) -> None:
    result = netns.one(
        {"method": "DELETE", "host": UPSTREAM_NAME, "port": TLS_PORT, "path": "/repos/acme/tls", "tls": True}
    )

    assert result["status"] == 403, result
    assert result["json"]["error"] == "warrant_required"
    assert result["json"]["constraints"]["scheme"] == "https"
    assert result["json"]["constraints"]["host"] == UPSTREAM_NAME
    assert netns.upstream.seen("/repos/acme/tls") == []


def test_sni_that_disagrees_with_the_host_header_is_refused(netns: Netns) -> None:
    """Both names come from the agent: when they disagree nothing is guessed and nothing is sent."""
    result = netns.one(
        {
            "method": "GET",
            "host": UPSTREAM_NAME,
            "port": TLS_PORT,
            "path": "/tls/mismatch",
            "tls": True,
            "headers": {"Host": UPSTREAM_IP},
        }
    )

    assert result["status"] == 400, result
    assert result["json"]["error"] == "bad_request"
    assert netns.upstream.seen("/tls/mismatch") == []


def test_https_to_an_address_without_sni_goes_to_the_dialled_address(netns: Netns) -> None:
    """No server name at all (an IP literal sends no SNI): the certificate and the request use the address."""
    result = netns.one(
        {"method": "GET", "host": UPSTREAM_IP, "port": TLS_PORT, "path": "/tls/by-address", "tls": True}
    )

    assert result["status"] == 200, result
    assert result["headers"]["vienna-decision"] == "allow"
    assert [(item.port, item.tls) for item in netns.upstream.seen("/tls/by-address")] == [(TLS_PORT, True)]
    request = netns.decision(result["headers"]["vienna-decision-id"])["request"]
    assert (request["scheme"], request["host"], request["port"]) == ("https", UPSTREAM_IP, TLS_PORT)
