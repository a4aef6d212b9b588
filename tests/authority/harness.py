"""Real `vienna authority` processes for the fleet tests, and the files they read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.integration.harness import AGENT_ID, TOKENS, clean_env, free_port, new_session

VIENNA = Path(sys.executable).with_name("vienna")
SIDECAR_TOKENS = {f"sc{n}": f"sidecar-{n}-token-" + "s" * 24 for n in range(1, 6)}
OTHER_TOKEN = "other-sidecar-token-" + "o" * 24  # a sidecar listed for another agent only


def write_operators(path: Path, tokens: Mapping[str, str] = TOKENS) -> Path:
    path.write_text(
        "operators:\n"
        + "".join(
            f"  - name: {name}\n    token_sha256: {hashlib.sha256(token.encode()).hexdigest()}\n"
            for name, token in tokens.items()
        )
    )
    return path


def write_sidecars(path: Path) -> Path:
    entries = [(name, token, [AGENT_ID]) for name, token in SIDECAR_TOKENS.items()]
    entries.append(("other", OTHER_TOKEN, ["someone-else"]))
    path.write_text(
        "sidecars:\n"
        + "".join(
            f"  - name: {name}\n    token_sha256: {hashlib.sha256(token.encode()).hexdigest()}\n"
            f"    agents: {json.dumps(agents)}\n"
            for name, token, agents in entries
        )
    )
    return path


def write_signing_key(path: Path) -> Path:
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    return path


class Authority:
    """One `vienna authority` subprocess; several may share a store (and a signing key)."""

    def __init__(
        self,
        workdir: Path,
        *,
        store: str,
        signing_key: Path,
        operators: Path | None = None,
        sidecars: Path | None = None,
        extra: Iterable[str] = (),
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.signing_key = signing_key
        self.operators = operators or write_operators(workdir / "operators.yaml")
        self.sidecars = sidecars or write_sidecars(workdir / "sidecars.yaml")
        self.port = free_port()
        self.extra = list(extra)
        self.log_file = workdir / "authority.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = new_session()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            str(VIENNA), "authority",
            "--listen", f"127.0.0.1:{self.port}",
            "--store", self.store,
            "--operators", str(self.operators),
            "--sidecars", str(self.sidecars),
            "--signing-key-file", str(self.signing_key),
            *self.extra,
        ]  # fmt: skip
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, env=clean_env()
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"vienna authority exited with {self.process.returncode}:\n{self.log_text()[-3000:]}"
                )
            with contextlib.suppress(requests.RequestException):
                if self.http.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"vienna authority was not ready within 30 s:\n{self.log_text()[-3000:]}")

    def stop(self) -> int | None:
        self.http.close()
        self.http = new_session()
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None
        self.http.close()
        self.http = new_session()

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def api(
        self, method: str, path: str, *, token: str | None = None, body: Mapping[str, Any] | None = None
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.http.request(method, self.url + path, headers=headers, json=body, timeout=30)

    def approve(
        self, request_id: str, who: str, justification: str = "approved in the test"
    ) -> requests.Response:
        return self.api(
            "POST",
            f"/v1/warrant-requests/{request_id}/approve",
            token=TOKENS[who],
            body={"justification": justification},
        )

    def chains(self) -> dict[str, dict[str, Any]]:
        answer = self.api("GET", "/v1/audit/chains", token=TOKENS["alice"])
        assert answer.status_code == 200, answer.text
        return {chain["chain"]: chain for chain in answer.json()["chains"]}

    def events(self, chain: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.api(
                "GET", f"/v1/audit?sidecar={chain}&after={after}&limit=10000", token=TOKENS["alice"]
            )
            assert page.status_code == 200, page.text
            events = page.json()["events"]
            if not events:
                return found
            found += events
            after = events[-1]["seq"]


def sidecar_args(authority: Authority, token_file: Path, name: str = "sc1") -> list[str]:
    token_file.write_text(SIDECAR_TOKENS[name] + "\n")
    return ["--authority", authority.url, "--authority-token-file", str(token_file)]


def open_body(*, agent: str = AGENT_ID, tier: str = "T2", method: str = "PUT", path: str = "/items/1",
              action: str = "demo.write", target: str = "") -> dict[str, Any]:  # fmt: skip
    """What a sidecar sends to open a warrant request: the exact request and the rule's terms."""
    return {
        "agent": agent,
        "tier": tier,
        "intent": {"action": action, "target": target},
        "request": {
            "method": method,
            "scheme": "https",
            "host": "api.example.com",
            "port": 443,
            "path": path,
            "query": "",
            "body_sha256": hashlib.sha256(b"").hexdigest(),
            "content_type": None,
            "url": f"https://api.example.com{path}",
            "body_preview": "",
        },
        "terms": {"ttl_seconds": 300, "max_uses": 1, "bind": "exact"},
    }
