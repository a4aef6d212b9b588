"""§12 webhooks with real parts: a receiving HTTP server on loopback that checks signatures and
records order, a real `vienna run` (and a real `vienna authority`), real outages and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.notify import verify_signature
from tests.background_server import BackgroundServer
from tests.integration.harness import Sidecar, Upstream, clean_env, free_port, new_session

pytestmark = pytest.mark.slow
VIENNA = Path(__import__("sys").executable).with_name("vienna")


@dataclass
class Delivery:
    body: bytes
    signature: str
    valid: bool

    @property
    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


@dataclass
class Receiver(BackgroundServer):
    """A webhook receiver: checks each signature, answers 500 `fail` times, or hangs while `hang` is set."""

    secret: bytes = b""
    port: int = 0
    fail: int = 0
    hang: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    deliveries: list[Delivery] = field(default_factory=list)
    attempts: int = 0

    def __post_init__(self) -> None:
        super().__init__("webhook-receiver")
        self.port = self.port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _open_sites(self, runner: web.AppRunner) -> None:
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.attempts += 1
        if self.hang.is_set():
            self.entered.set()
            while self.hang.is_set():
                await asyncio.sleep(0.05)
        if self.fail > 0:
            self.fail -= 1
            return web.Response(status=500, text="not now")
        signature = request.headers.get("Vienna-Signature", "")
        self.deliveries.append(
            Delivery(body, signature, verify_signature(self.secret, signature, body, now=time.time()))
        )
        return web.Response(status=204)


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@contextlib.contextmanager
def notifying_sidecar(workdir: Path, receiver: Receiver, *extra: str) -> Iterator[Sidecar]:
    secret_file = workdir.parent / f"{workdir.name}-notify.key"
    secret_file.write_bytes(receiver.secret)
    sidecar = Sidecar(
        workdir, args=["--notify-webhook", receiver.url, "--notify-secret-file", str(secret_file), *extra]
    )
    sidecar.start()
    try:
        yield sidecar
    finally:
        sidecar.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(secret=secrets.token_hex(32).encode())
    server.start()
    yield server
    server.hang.clear()
    server.stop()


def types(receiver: Receiver) -> list[str]:
    return [d.json["type"] for d in receiver.deliveries]


def test_created_then_approved_signed_and_in_order(
    tmp_path: Path, receiver: Receiver, upstream: Upstream
) -> None:
    with notifying_sidecar(tmp_path / "sc", receiver) as sidecar:
        refused = sidecar.request("DELETE", upstream.url("/repos/acme/notify"))
        request_id = refused.json()["warrant_request"]["id"]
        wait_for(lambda: types(receiver) == ["warrant_request.created"], "the created event")
        sidecar.approve(request_id, "alice")
        sidecar.approve(request_id, "bob")
        wait_for(lambda: len(receiver.deliveries) == 2, "the approved event")
        assert types(receiver) == ["warrant_request.created", "warrant_request.approved"]
        assert all(d.valid for d in receiver.deliveries)
        created, approved = (d.json for d in receiver.deliveries)
        assert created["warrant_request"]["id"] == request_id and created["id"] != approved["id"]
        view = approved["warrant_request"]
        assert view["status"] == "approved" and view["tier"] == "T3" and view["agent"] == "test-agent"
        assert view["request"]["method"] == "DELETE" and view["request"]["url"].endswith("/repos/acme/notify")
        assert "warrant" not in view and all("ey" not in str(v)[:2] for v in view.values())
        assert created["console_url"] == f"{sidecar.api_url}/console#{request_id}"
        # The receiver's side: `vienna notify verify` says yes for the body as sent, no for another.
        secret_file = tmp_path / "sc-notify.key"
        for body, expected in ((receiver.deliveries[0].body, 0), (receiver.deliveries[0].body + b" ", 1)):
            done = subprocess.run(
                [str(VIENNA), "notify", "verify", "--secret-file", str(secret_file), "--signature", receiver.deliveries[0].signature],
                input=body, capture_output=True, env=clean_env(), timeout=30, check=False,
            )  # fmt: skip
            assert done.returncode == expected, done.stdout
        metrics = sidecar.http.get(sidecar.api_url + "/metrics", timeout=10).text
        assert 'vienna_notifications_total{result="delivered"} 2.0' in metrics


def test_retried_after_500s_and_after_the_receiver_was_down_and_the_sidecar_killed(
    tmp_path: Path, upstream: Upstream
) -> None:
    secret = secrets.token_hex(32).encode()
    port = free_port()
    flaky = Receiver(secret=secret, port=port, fail=2)
    flaky.start()
    with notifying_sidecar(tmp_path / "sc", flaky) as sidecar:
        first = sidecar.request("PUT", upstream.url("/items/notify-1"), data=b"a").json()["warrant_request"][
            "id"
        ]
        wait_for(lambda: len(flaky.deliveries) == 1, "delivery after two 500s")
        assert flaky.attempts == 3 and flaky.deliveries[0].valid
        flaky.stop()  # the receiver goes away for a while
        second = sidecar.request("PUT", upstream.url("/items/notify-2"), data=b"b").json()["warrant_request"][
            "id"
        ]
        sidecar.deny(first, "alice")
        time.sleep(1.5)  # some attempts fail on a closed port
        sidecar.kill()  # and the sidecar dies before it could deliver them
        back = Receiver(secret=secret, port=port)
        back.start()
        try:
            sidecar.start()  # same data dir: the outbox is still there
            wait_for(lambda: len(back.deliveries) == 2, "the queued events after the restart", timeout=90)
            got = [(d.json["type"], d.json["warrant_request"]["id"]) for d in back.deliveries]
            assert got == [("warrant_request.created", second), ("warrant_request.denied", first)]
            assert all(d.valid for d in back.deliveries)
            metrics = sidecar.http.get(sidecar.api_url + "/metrics", timeout=10).text
            assert 'vienna_notifications_total{result="delivered"} 2.0' in metrics
        finally:
            back.stop()


def test_a_hanging_receiver_never_slows_the_data_plane(
    tmp_path: Path, receiver: Receiver, upstream: Upstream
) -> None:
    receiver.hang.set()
    with notifying_sidecar(tmp_path / "sc", receiver) as sidecar:
        sidecar.request("PUT", upstream.url("/items/notify-hang"), data=b"x")
        wait_for(receiver.entered.is_set, "the receiver to be holding a delivery")
        session = new_session(sidecar.proxy_url)
        answers = [session.get(upstream.url("/notify-t0"), timeout=10).status_code for _ in range(50)]
        assert answers == [200] * 50
        assert receiver.hang.is_set() and receiver.deliveries == []  # all that while, the delivery hung
        receiver.hang.clear()
        wait_for(lambda: types(receiver) == ["warrant_request.created"], "the delivery once released")


def test_expired_and_slack_format(tmp_path: Path, receiver: Receiver, upstream: Upstream) -> None:
    with notifying_sidecar(
        tmp_path / "sc", receiver, "--pending-ttl", "1", "--notify-format", "slack"
    ) as sidecar:
        request_id = sidecar.request("PUT", upstream.url("/items/notify-slack"), data=b"x").json()[
            "warrant_request"
        ]["id"]
        wait_for(lambda: len(receiver.deliveries) == 2, "created and expired", timeout=30)
        created, expired = (d.json for d in receiver.deliveries)
        assert request_id in created["text"] and "waiting for approval" in created["text"]
        assert "expired" in expired["text"]
        button = created["blocks"][-1]["elements"][0]
        assert button["url"] == f"{sidecar.api_url}/console#{request_id}"
        assert any("PUT " in json.dumps(block) for block in created["blocks"])
        assert all(d.valid for d in receiver.deliveries)
        assert sidecar.get_request(request_id)["status"] == "expired"


def test_the_authority_notifies_too(tmp_path: Path, receiver: Receiver) -> None:
    from tests.authority.harness import SIDECAR_TOKENS, Authority, open_body, write_signing_key

    secret_file = tmp_path / "notify.key"
    secret_file.write_bytes(receiver.secret)
    authority = Authority(
        tmp_path / "authority",
        store=f"sqlite:///{tmp_path}/authority/store/authority.db",
        signing_key=write_signing_key(tmp_path / "signing.pem"),
        extra=["--notify-webhook", receiver.url, "--notify-secret-file", str(secret_file)],
    )
    authority.start()
    try:
        opened = authority.api(
            "POST", "/v1/sidecar/warrant-requests", token=SIDECAR_TOKENS["sc1"], body=open_body()
        )
        assert opened.status_code == 201, opened.text
        request_id = opened.json()["id"]
        assert authority.approve(request_id, "alice").status_code == 200
        wait_for(lambda: len(receiver.deliveries) == 2, "both events from the authority")
        assert types(receiver) == ["warrant_request.created", "warrant_request.approved"]
        assert receiver.deliveries[0].json["warrant_request"]["sidecar"] == "sc1"
        assert all(d.valid for d in receiver.deliveries)
        assert (
            'vienna_notifications_total{result="delivered"} 2.0'
            in authority.http.get(authority.url + "/metrics").text
        )
    finally:
        authority.stop()
