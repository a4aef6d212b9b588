"""Resource abuse: oversized heads and bodies, slow clients, idle connections, and T1 rate limits.

An agent can only exhaust its own sidecar, but a sidecar that runs out of memory or descriptors stops
enforcing; these checks show it refuses early (before buffering) and keeps serving other requests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.security.support import (
    MAX_BODY,
    Sidecar,
    Upstream,
    assert_refused,
    exchange_until_closed,
    one,
    parse_responses,
    raw_request,
    read_responses,
    unique,
)

HEAD_LIMIT = 64 * 1024


def _ok(main: Sidecar, upstream: Upstream, marker: str, timeout: float = 5.0) -> int:
    answer = one(main.exchange(raw_request("GET", upstream.authority, f"/ok/{marker}"), timeout=timeout))
    return answer.status


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([("X-Big", "a" * 200_000)], id="one-200KB-header"),
        pytest.param([(f"X-H{i}", "b" * 90) for i in range(2200)], id="2200-headers-200KB"),
        pytest.param([(f"X{i}", "") for i in range(30_000)], id="30000-empty-headers"),
    ],
)
def test_oversized_request_head_is_refused_with_431(
    main: Sidecar, upstream: Upstream, headers: list[tuple[str, str]]
) -> None:
    marker = unique("head")
    answer = one(main.exchange(raw_request("GET", upstream.authority, f"/ok/{marker}", headers=headers)))
    assert_refused(answer, 431, "request.headers_too_large", "bad_request")
    assert not upstream.seen_containing(marker)


def test_oversized_request_line_is_refused_with_431(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("line")
    answer = one(main.exchange(raw_request("GET", upstream.authority, f"/ok/{marker}/{'a' * 100_000}")))
    assert_refused(answer, 431, "request.headers_too_large", "bad_request")
    assert not upstream.seen_containing(marker)


def test_endless_request_head_is_cut_off_without_being_buffered(main: Sidecar, upstream: Upstream) -> None:
    """Header bytes that never end: refused once past the limit, connection closed (40 MB never sent)."""
    marker = unique("endless")
    with socket.create_connection(("127.0.0.1", main.proxy_port), timeout=5) as sock:
        sock.sendall(
            raw_request("GET", upstream.authority, f"/ok/{marker}", close=False)[:-2] + b"X-Endless: "
        )
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 40_000_000:
                sock.sendall(b"a" * 65536)
                sent += 65536
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    assert sent < 40_000_000, "the sidecar kept reading an endless head"
    responses, _ = parse_responses(received)
    assert_refused(one(responses), 431, "request.headers_too_large", "bad_request")


def test_flood_of_blank_lines_before_a_request_is_not_buffered(main: Sidecar, upstream: Upstream) -> None:
    """Blank lines before a request line are skipped as they come: 32 MB of them do not pile up."""
    marker = unique("flood")
    before = _rss_kib(main.pid)
    with socket.create_connection(("127.0.0.1", main.proxy_port), timeout=10) as sock:
        for _ in range(512):
            sock.sendall(b"\r\n" * 32768)
        sock.sendall(raw_request("GET", upstream.authority, f"/ok/{marker}"))
        answer = one(read_responses(sock, expect=1, timeout=10))
    assert answer.status == 200, answer
    assert len(upstream.seen_containing(marker)) == 1
    assert _rss_kib(main.pid) - before < 16 * 1024, "the blank lines were buffered"


def test_a_few_blank_lines_before_a_request_are_tolerated(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("blank")
    answer = one(main.exchange(b"\r\n\r\n" + raw_request("GET", upstream.authority, f"/ok/{marker}")))
    assert answer.status == 200, answer
    assert len(upstream.seen_containing(marker)) == 1


def test_head_under_the_limit_is_relayed(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("head")
    headers = [(f"X-Fill-{i}", "c" * 4000) for i in range(12)]  # 48 KB, under the 64 KiB head limit
    answer = one(main.exchange(raw_request("GET", upstream.authority, f"/ok/{marker}", headers=headers)))
    assert answer.status == 200, answer
    [seen] = upstream.seen_containing(marker)
    assert seen.header("x-fill-11") == "c" * 4000


def test_body_over_the_limit_is_refused_with_413(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("body")
    request = raw_request("POST", upstream.authority, f"/notes/{marker}", body=b"x" * (MAX_BODY + 1))
    assert_refused(one(main.exchange(request)), 413, "request.body_too_large", "bad_request")
    assert not upstream.seen_containing(marker)


def test_body_at_the_limit_is_forwarded(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("body")
    body = b"y" * MAX_BODY
    answer = one(main.exchange(raw_request("POST", upstream.authority, f"/notes/{marker}", body=body)))
    assert answer.status == 200, answer
    assert [s.body for s in upstream.seen_containing(marker)] == [body]


def test_chunked_body_over_the_limit_is_refused_with_413(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("chunked")  # /items is T2: the body is buffered for the decision, so it is limited
    chunk = b"z" * 1024
    chunks = b"".join(b"400\r\n" + chunk + b"\r\n" for _ in range(MAX_BODY // 1024 + 1)) + b"0\r\n\r\n"
    head = (
        f"POST http://{upstream.authority}/items/{marker} HTTP/1.1\r\nHost: {upstream.authority}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    assert_refused(one(main.exchange(head + chunks)), 413, "request.body_too_large", "bad_request")
    assert not upstream.seen_containing(marker)


def test_announced_oversized_body_is_refused_before_it_is_sent(main: Sidecar, upstream: Upstream) -> None:
    """Only the head is sent: the 413 comes at once and the connection closes; nothing waits for 1 GB."""
    marker = unique("announced")
    head = (
        f"POST http://{upstream.authority}/notes/{marker} HTTP/1.1\r\nHost: {upstream.authority}\r\n"
        "Content-Length: 1000000000\r\n\r\n"
    ).encode()
    received, closed = exchange_until_closed(main.proxy_port, head, timeout=5)
    assert closed
    responses, _ = parse_responses(received)
    assert_refused(one(responses), 413, "request.body_too_large", "bad_request")
    assert not upstream.seen_containing(marker)


def test_slow_headers_do_not_block_other_clients(main: Sidecar, upstream: Upstream) -> None:
    """Slowloris: one client dribbles its head a byte at a time; others are served meanwhile."""
    slow_marker = unique("slow")
    request = raw_request("GET", upstream.authority, f"/ok/{slow_marker}")
    answers: list[bytes] = []

    def dribble() -> None:
        with socket.create_connection(("127.0.0.1", main.proxy_port), timeout=10) as sock:
            for index in range(len(request) - 1):
                sock.sendall(request[index : index + 1])
                if index % 8 == 0:
                    time.sleep(0.02)
            time.sleep(0.5)
            sock.sendall(request[-1:])
            answers.extend(r.body for r in read_responses(sock, expect=1, timeout=5))

    slow = threading.Thread(target=dribble)
    slow.start()
    served: list[int] = []
    while slow.is_alive() and len(served) < 50:
        served.append(_ok(main, upstream, unique("fast"), timeout=5))
    slow.join(15)
    assert served and set(served) == {200}, served
    assert len(answers) == 1 and len(upstream.seen_containing(slow_marker)) == 1


def test_slow_body_does_not_block_other_clients(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("slowbody")
    body = b"s" * 64
    request = raw_request("POST", upstream.authority, f"/notes/{marker}", body=body)
    with socket.create_connection(("127.0.0.1", main.proxy_port), timeout=10) as sock:
        sock.sendall(request[: -len(body)])
        for index in range(len(body)):
            sock.sendall(body[index : index + 1])
            if index % 16 == 0:
                assert _ok(main, upstream, unique("fast")) == 200
        answer = one(read_responses(sock, expect=1, timeout=5))
    assert answer.status == 200
    assert [s.body for s in upstream.seen_containing(marker)] == [body]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _open_fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def test_a_thousand_idle_connections_then_a_normal_request_still_works(
    main: Sidecar, upstream: Upstream
) -> None:
    before = _open_fds(main.pid)
    idle: list[socket.socket] = []
    try:
        for index in range(1000):
            sock = socket.create_connection(("127.0.0.1", main.proxy_port), timeout=5)
            if index % 2:
                sock.sendall(
                    b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                )  # a head that never ends
            idle.append(sock)
        marker = unique("after-idle")
        assert _ok(main, upstream, marker, timeout=10) == 200
        assert len(upstream.seen_containing(marker)) == 1
        assert _open_fds(main.pid) >= before + 900  # they really were all held open
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while _open_fds(main.pid) > before + 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _open_fds(main.pid) <= before + 50, "closed client connections were not released"
    assert _ok(main, upstream, unique("after-close")) == 200


def test_t1_rate_limit_answers_429_with_retry_after(main: Sidecar, upstream: Upstream) -> None:
    """`limited` is T1 with `limits: {rate: 3/m}`: three pass, the fourth waits."""
    marker = unique("limited")
    statuses = []
    for index in range(3):
        request = raw_request("POST", upstream.authority, f"/limited/{marker}/{index}", body=b"n=1")
        statuses.append(one(main.exchange(request)).status)
    assert statuses == [200, 200, 200]
    fourth = one(main.exchange(raw_request("POST", upstream.authority, f"/limited/{marker}/3", body=b"n=1")))
    body = assert_refused(fourth, 429, "policy.rate_limited", "denied")
    assert body["intent"]["rule"] == "limited"
    retry_after = fourth.header("retry-after")
    assert retry_after is not None and retry_after.isdigit() and 1 <= int(retry_after) <= 60
    assert len(upstream.seen_containing(marker)) == 3
