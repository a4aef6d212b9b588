"""A store that cannot write (another process holds audit.db's write lock longer than the sidecar
waits): a T0 request and a passthrough CONNECT are both refused with 503 audit.unavailable and
nothing reaches the upstream; once the lock is gone both pass again."""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path

from tests.audit.support import Sidecar, Upstream, events

POLICY = """\
version: 1
default_tier: T3
rules:
  - id: tunnel
    match: {hosts: ["localhost:TUNNELPORT"]}
    action: demo.tunnel
    tier: T0
    passthrough: true
  - id: read
    match: {hosts: ["127.0.0.1"], methods: [GET]}
    action: demo.read
    tier: T0
"""


def _connect(proxy_port: int, target: str) -> str:
    """The proxy's whole answer to a CONNECT (head and body)."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=30) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
        return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_locked_store_refuses_requests_and_tunnels_and_forwards_nothing(
    tmp_path: Path, upstream: Upstream
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: the tunnel is refused before any dial
        probe.bind(("127.0.0.1", 0))
        tunnel_port = probe.getsockname()[1]
    sidecar = Sidecar(
        tmp_path / "locked",
        policy=POLICY.replace("TUNNELPORT", str(tunnel_port)),
        args=["--audit-stdout", "false"],
    ).start()
    try:
        assert sidecar.request("GET", upstream.url("/locked/before")).status_code == 200
        seen_before = len(upstream.seen())
        holder = sqlite3.connect(sidecar.db, isolation_level=None, timeout=5)
        try:
            holder.execute("BEGIN IMMEDIATE")  # the write lock, held past the sidecar's 2 s wait
            started = time.monotonic()
            refused = sidecar.request("GET", upstream.url("/locked/during"))
            tunnel = _connect(sidecar.proxy_port, f"localhost:{tunnel_port}")
            assert time.monotonic() - started < 30
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert refused.status_code == 503, refused.text
        assert refused.json()["reason_code"] == "audit.unavailable"
        assert tunnel.startswith("HTTP/1.1 503"), tunnel
        assert "audit.unavailable" in tunnel
        assert len(upstream.seen()) == seen_before  # nothing went out unrecorded

        # For a second after a failed write requests are refused at once (no busy wait on the
        # event loop); the queued events are written meanwhile, and then requests pass again.
        deadline = time.monotonic() + 10
        while True:
            after = sidecar.request("GET", upstream.url("/locked/after"))
            if after.status_code == 200 or time.monotonic() > deadline:
                break
            assert after.json()["reason_code"] == "audit.unavailable"
            time.sleep(0.2)
        assert after.status_code == 200, after.text
    finally:
        assert sidecar.stop() == 0
    decided = {str(e.payload.get("decision_id")): e for e in events(sidecar.db) if e.type == "decision"}
    assert after.headers["Vienna-Decision-Id"] in decided
    # the refused request's decision may be on record too, but then with what became of it
    refused_id = refused.json().get("decision_id")
    if refused_id in decided:
        outcome = [
            e
            for e in events(sidecar.db)
            if e.type == "execution" and e.payload.get("decision_id") == refused_id
        ]
        assert outcome and outcome[0].payload["status"] == 503
