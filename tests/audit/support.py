"""Real parts for the audit tests: a recording loopback upstream and `vienna run` subprocesses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from policy.audit import AuditEvent
from proxy.store import read_events
from tests.background_server import BackgroundServer
from tests.vienna_process import VIENNA, clean_environment, run_command

AGENT_ID = "test-agent"
TOKENS: dict[str, str] = {
    "alice": "alice-operator-secret-" + "a" * 20,
    "bob": "bob-operator-secret-" + "b" * 20,
}
READY_TIMEOUT = 30.0

# `tier: T3` of delete-repo and `tier: T0` have the same length: a reload test can change the tier
# without changing the file's size.
POLICY = """\
version: 1
default_tier: T3
rules:
  - id: forbidden
    match: {hosts: ["127.0.0.1"], paths: ["/forbidden/**"]}
    action: demo.forbidden
    tier: deny
  - id: read
    match: {hosts: ["127.0.0.1"], methods: [GET]}
    action: demo.read
    tier: T0
  - id: delete-repo
    match: {hosts: ["127.0.0.1"], methods: [DELETE], paths: ["/repos/{owner}/{repo}"]}
    action: demo.delete_repo
    target: "{owner}/{repo}"
    tier: T3
"""
DELETE_IS_T0 = POLICY.replace("    tier: T3\n", "    tier: T0\n")
assert len(DELETE_IS_T0) == len(POLICY) and DELETE_IS_T0 != POLICY


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def session(proxy: str | None = None) -> requests.Session:
    http = requests.Session()
    http.trust_env = False  # *_PROXY and NO_PROXY of the test environment must not matter
    if proxy is not None:
        http.proxies = {"http": proxy, "https": proxy}
    return http


class Upstream(BackgroundServer):
    """An aiohttp server on 127.0.0.1 (own thread and loop) that answers 200 and records each path."""

    def __init__(self) -> None:
        super().__init__("audit-upstream")
        self.port = 0
        self._paths: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def seen(self) -> list[tuple[str, str]]:
        """(method, raw path) of every request received, in arrival order."""
        with self._lock:
            return list(self._paths)

    def start(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        super().start()

    async def _open_sites(self, runner: web.AppRunner) -> None:
        assert self._socket is not None
        await web.SockSite(runner, self._socket).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        with self._lock:
            self._paths.append((request.method, request.raw_path))
        return web.json_response({"ok": True})


class Sidecar:
    """One `vienna run` subprocess; stdout and stderr go to separate files."""

    def __init__(
        self,
        workdir: Path,
        *,
        args: Sequence[str] = (),
        policy: str = POLICY,
        policy_file: Path | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        if policy_file is None:
            policy_file = workdir / "policy.yaml"
            policy_file.write_text(policy)
        self.policy_file = policy_file
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
        self.stdout_file = workdir / "stdout.log"
        self.stderr_file = workdir / "stderr.log"
        self.proxy_port = free_port()
        self.api_port = free_port()
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.http = session()
        self.proxied = session(self.proxy_url)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def db(self) -> Path:
        return self.data_dir / "audit.db"

    @property
    def checkpoints(self) -> Path:
        return self.data_dir / "checkpoints.jsonl"

    @property
    def audit_key(self) -> Path:
        return self.data_dir / "audit.key"

    def start(self) -> Sidecar:
        env = clean_environment()
        command = run_command(
            policy=self.policy_file,
            proxy_port=self.proxy_port,
            api_port=self.api_port,
            data_dir=self.data_dir,
            agent_id=AGENT_ID,
            warrant_key=self.key_file,
            operators=self.operators_file,
            extra=self.args,
        )
        with self.stdout_file.open("ab") as out, self.stderr_file.open("ab") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, cwd=self.workdir, env=env)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"vienna run exited with {self.process.returncode} before it was ready")
            with contextlib.suppress(requests.RequestException):
                if self.http.get(self.api_url + "/readyz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        self._fail(f"vienna run was not ready within {READY_TIMEOUT:.0f}s")
        return self  # not reached: _fail raises

    def _fail(self, what: str) -> None:
        self.kill()
        pytest.fail(f"{what}; stderr:\n{self.stderr_text()[-4000:]}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for a clean exit (which writes the closing checkpoint)."""
        process, self.process = self.process, None
        self.http.close()
        self.proxied.close()
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return -9

    def kill(self) -> None:
        """SIGKILL: no drain, no closing checkpoint, no WAL checkpoint."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stdout_text(self) -> str:
        return self.stdout_file.read_text(errors="replace") if self.stdout_file.exists() else ""

    def stderr_text(self) -> str:
        return self.stderr_file.read_text(errors="replace") if self.stderr_file.exists() else ""

    # --- as the agent and as operators -------------------------------------------------------------

    def request(
        self, method: str, url: str, *, headers: Mapping[str, str] | None = None, warrant: str | None = None
    ) -> requests.Response:
        sent = dict(headers or {})
        if warrant is not None:
            sent["Vienna-Warrant"] = warrant
        return self.proxied.request(method, url, headers=sent, timeout=20, allow_redirects=False)

    def api(
        self, method: str, path: str, *, token: str | None = None, body: Mapping[str, Any] | None = None
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.http.request(method, self.api_url + path, headers=headers, json=body, timeout=15)

    def approve(self, request_id: str, who: str) -> requests.Response:
        return self.api(
            "POST",
            f"/v1/warrant-requests/{request_id}/approve",
            token=TOKENS[who],
            body={"justification": "audit test"},
        )

    def readyz(self) -> dict[str, Any]:
        body = self.http.get(self.api_url + "/readyz", timeout=5).json()
        assert isinstance(body, dict)
        return body

    def metrics(self) -> Metrics:
        response = self.http.get(self.api_url + "/metrics", timeout=5)
        assert response.status_code == 200
        return Metrics(response.text)


class Metrics:
    """Parsed /metrics: sample values by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0.0 when the labelled child was never created."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def by_labels(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}

    def label_values(self) -> set[str]:
        return {value for _, labels in self.samples for _, value in labels}


def run_vienna(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VIENNA), *args], capture_output=True, text=True, timeout=60, check=False)


def events(db: Path) -> list[AuditEvent]:
    return list(read_events(db))


def dump(db: Path) -> str:
    """Every table of the database as SQL text (what `sqlite3 db .dump` prints)."""
    connection = sqlite3.connect(db)
    try:
        return "\n".join(connection.iterdump())
    finally:
        connection.close()


def stdout_records(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        if line.strip():
            record = json.loads(line)
            assert isinstance(record, dict)
            yield record


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
