"""`kill -9` under load: every request that was forwarded, or answered, is in the audit log."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from tests.audit.support import Sidecar, Upstream, events, run_vienna, session, stdout_records

CLIENTS = 4


def _path(payload: Mapping[str, object]) -> str:
    request = payload.get("request")
    assert isinstance(request, dict)
    return str(request.get("path"))


def test_kill_9_under_load_loses_no_forwarded_request(tmp_path: Path, upstream: Upstream) -> None:
    sidecar = Sidecar(tmp_path / "run", args=["--checkpoint-every", "25", "--audit-stdout", "false"]).start()
    prefix = f"/load-{secrets.token_hex(4)}"
    received: list[tuple[str, str]] = []  # (path, Vienna-Decision-Id) of every answer a client read
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def client(number: int) -> None:
        http = session(sidecar.proxy_url)
        sent = 0
        try:
            while not stop.is_set():
                path = f"{prefix}/{number}/{sent}"
                sent += 1
                try:
                    response = http.get(f"http://127.0.0.1:{upstream.port}{path}", timeout=5)
                except requests.RequestException:
                    return  # the proxy is gone
                if response.status_code != 200:
                    errors.append(AssertionError(f"{path}: {response.status_code} {response.text[:200]}"))
                    return
                with lock:
                    received.append((path, response.headers["Vienna-Decision-Id"]))
        finally:
            http.close()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with lock:
            if len(received) >= 150:
                break
        time.sleep(0.02)
    time.sleep(0.3)
    sidecar.kill()  # SIGKILL while the clients are mid-stream
    stop.set()
    for thread in threads:
        thread.join(10)
    assert not errors, errors
    assert len(received) >= 50, "the load did not get going"

    forwarded = {path for method, path in upstream.seen() if path.startswith(prefix)}
    stored = events(sidecar.db)
    decisions = {
        event.payload["decision_id"]: event.payload
        for event in stored
        if event.type == "decision" and _path(event.payload).startswith(prefix)
    }
    recorded_paths = {_path(payload) for payload in decisions.values()}

    # every answer the clients read names a durable decision for that very request (execution events
    # are written behind, group-committed within FLUSH_DELAY: the newest may be lost, by design)
    for path, decision_id in received:
        assert decision_id in decisions, f"{path}: answered with {decision_id}, which is not in the audit log"
        assert _path(decisions[decision_id]) == path
        assert decisions[decision_id]["forwarded"] is True
    # every request the upstream saw was decided, and recorded as forwarded, before it was sent
    assert forwarded >= {path for path, _ in received}
    assert forwarded <= recorded_paths, sorted(forwarded - recorded_paths)[:5]
    assert all(payload["forwarded"] is True for payload in decisions.values())

    # the crashed log verifies, signed checkpoints included (none is ahead of what was committed)
    assert sidecar.checkpoints.exists()
    result = run_vienna("audit", "verify", str(sidecar.db))
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"ok: {len(stored)} events, chain intact")

    # a restart on the same data dir continues the same chain
    again = Sidecar(tmp_path / "run", args=["--audit-stdout", "false"]).start()
    assert again.data_dir == sidecar.data_dir
    try:
        assert again.request("GET", upstream.url(prefix + "/after-restart")).status_code == 200
    finally:
        assert again.stop() == 0
    after = events(sidecar.db)
    assert after[: len(stored)] == stored
    assert [event.type for event in after[len(stored) :]] == ["intent", "decision", "execution"]
    result = run_vienna("audit", "verify", str(sidecar.db))
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"ok: {len(stored) + 3} events, chain intact")


def test_stdout_never_shows_an_event_that_a_kill_9_takes_back(tmp_path: Path, upstream: Upstream) -> None:
    """A log pipeline holding an event the database lost would, after a restart, hold two different
    events with the same seq: a crash would look like tampering."""
    sidecar = Sidecar(tmp_path, args=["--audit-stdout", "true"]).start()
    decision_ids = []
    for n in range(3):
        response = sidecar.request("GET", upstream.url(f"/stdout-vs-db/{n}"))
        assert response.status_code == 200
        decision_ids.append(response.headers["Vienna-Decision-Id"])
    sidecar.kill()  # at once: the last execution event is still in the write-behind queue
    stored = {(event.seq, event.hash) for event in events(sidecar.db)}
    lines = [record for record in stdout_records(sidecar.stdout_text()) if record["log"] == "vienna.audit"]
    assert {(line["seq"], line["hash"]) for line in lines} <= stored
    # decisions are durable before forwarding, so their lines are out at once
    assert [line["payload"]["decision_id"] for line in lines if line["type"] == "decision"] == decision_ids
