"""Request smuggling: framing that two parsers could read differently, so one request hides another.

The sidecar parses (mitmproxy), classifies, and writes a fresh request upstream with its own framing
(Content-Length only). Each case is refused, or handled so that the upstream gets exactly the one
request that was classified. The upstream sits behind a byte tap: assertions cover the exact bytes
that crossed the wire, not only what a (strict) server parsed.
"""

from __future__ import annotations

import pytest

from tests.security.support import (
    RawResponse,
    Sidecar,
    Upstream,
    assert_refused,
    exchange_until_closed,
    one,
    unique,
)

SMUGGLED = "SMUGGLED"  # replaced per case: the path of the request hidden in a body


def _head(
    upstream: Upstream, path: str, *lines: str, method: str = "POST", version: str = "HTTP/1.1"
) -> bytes:
    head = [f"{method} http://{upstream.authority}{path} {version}", f"Host: {upstream.authority}", *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def _hidden(upstream: Upstream, marker: str) -> bytes:
    return f"GET /admin/{marker} HTTP/1.1\r\nHost: {upstream.authority}\r\n\r\n".encode()


def _nothing_reached(upstream: Upstream, mark: int, *markers: str) -> None:
    wire = upstream.wire_since(mark)
    for marker in markers:
        assert marker.encode() not in wire, wire[:2000]
        assert not upstream.seen_containing(marker)


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        pytest.param(
            ("Content-Length: 4", "Transfer-Encoding: chunked"), "request.bad_framing", id="CL-then-TE"
        ),
        pytest.param(
            ("Transfer-Encoding: chunked", "Content-Length: 4"), "request.bad_framing", id="TE-then-CL"
        ),
        pytest.param(
            ("Content-Length: 4", "Content-Length: 60"), "request.bad_framing", id="duplicate-CL-differing"
        ),
        pytest.param(
            ("Content-Length: 60", "Content-Length: 60"), "request.bad_framing", id="duplicate-CL-equal"
        ),
        pytest.param(("Content-Length: 4, 60",), "request.bad_framing", id="CL-list"),
        pytest.param(("Content-Length: -1",), "request.bad_framing", id="negative-CL"),
        pytest.param(("Content-Length: +4",), "request.bad_framing", id="plus-sign-CL"),
        pytest.param(("Content-Length: 0x3c",), "request.bad_framing", id="hex-CL"),
        pytest.param(("Content-Length: 4 4",), "request.bad_framing", id="CL-with-space"),
        pytest.param(("Content-Length : 4",), "request.bad_framing", id="space-before-colon-CL"),
        pytest.param(
            ("Transfer-Encoding : chunked", "Content-Length: 4"),
            "request.bad_framing",
            id="space-before-colon-TE",
        ),
        pytest.param(("Transfer-Encoding\t: chunked",), "request.bad_framing", id="tab-before-colon-TE"),
        pytest.param(("Transfer-Encoding: xchunked",), "request.bad_framing", id="TE-unknown"),
        pytest.param(
            ("Transfer-Encoding: chunked, identity",), "request.bad_framing", id="TE-chunked-not-last"
        ),
        pytest.param(
            ("Transfer-Encoding: chunked", "Transfer-Encoding: identity"),
            "request.bad_framing",
            id="TE-twice",
        ),
        pytest.param(("Transfer-Encoding: gzip, chunked",), "request.bad_framing", id="TE-gzip-chunked"),
        pytest.param(("Transfer-Encoding: identity",), "request.bad_framing", id="TE-identity"),
        pytest.param(("X-Pad: x", " Transfer-Encoding: chunked"), "request.bad_header", id="obs-fold"),
        pytest.param(("X-Pad: x\rTransfer-Encoding: chunked",), "request.bad_header", id="bare-CR-in-value"),
        pytest.param(("X-Pad: x\x00Transfer-Encoding: chunked",), "request.bad_header", id="NUL-in-value"),
        pytest.param(("X-Pad: x\x0bTransfer-Encoding: chunked",), "request.bad_header", id="VT-in-value"),
    ],
)
def test_ambiguous_framing_is_refused_and_nothing_reaches_the_upstream(
    main: Sidecar, upstream: Upstream, lines: tuple[str, ...], code: str
) -> None:
    marker, hidden = unique("front"), unique("hidden")
    mark = upstream.wire_mark()
    body = b"0\r\n\r\n" + _hidden(upstream, hidden)
    answer = one(main.exchange(_head(upstream, f"/notes/{marker}", *lines) + body, timeout=5))
    assert_refused(answer, 400, code, "bad_request")
    _nothing_reached(upstream, mark, marker, hidden)


def test_chunked_with_odd_case_is_decoded_and_forwarded_as_plain_chunked(
    main: Sidecar, upstream: Upstream
) -> None:
    """`chunKed` is chunked (codings are case-insensitive); the body streams up re-framed, spelled `chunked`."""
    marker, hidden = unique("front"), unique("hidden")
    inner = _hidden(upstream, hidden)
    chunked = f"{len(inner):x}\r\n".encode() + inner + b"\r\n0\r\n\r\n"
    mark = upstream.wire_mark()
    request = _head(upstream, f"/notes/{marker}", "Transfer-Encoding: chunKed", "Connection: close") + chunked
    answer = one(main.exchange(request))
    assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
    seen = upstream.seen_containing(marker)
    assert [(s.path, s.body) for s in seen] == [(f"/notes/{marker}", inner)]
    assert seen[0].header("transfer-encoding") == "chunked"  # one spelling every parser agrees on
    assert seen[0].header("content-length") is None
    wire = upstream.wire_since(mark)
    assert wire.count(b" HTTP/1.1\r\n") == 2  # the forwarded request line, and the hidden one inside its body
    assert not [s for s in upstream.seen() if hidden in s.path]


def test_chunked_with_tab_before_the_value_is_read_as_chunked(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("front")
    request = _head(upstream, f"/notes/{marker}", "Transfer-Encoding:\tchunked", "Connection: close")
    answer = one(main.exchange(request + b"4\r\nabcd\r\n0\r\n\r\n"))
    assert answer.status == 200, answer
    assert [s.body for s in upstream.seen_containing(marker)] == [b"abcd"]


def test_transfer_encoding_on_http_1_0_is_refused(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("front")
    mark = upstream.wire_mark()
    request = _head(upstream, f"/notes/{marker}", "Transfer-Encoding: chunked", version="HTTP/1.0")
    assert_refused(one(main.exchange(request + b"4\r\nabcd\r\n0\r\n\r\n")), 400, "request.bad_framing")
    _nothing_reached(upstream, mark, marker)


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(b"-4\r\nabcd\r\n0\r\n\r\n", id="negative-chunk-size"),
        pytest.param(b"4 4\r\nabcd\r\n0\r\n\r\n", id="chunk-size-with-space"),
        pytest.param(b"0x4\r\nabcd\r\n0\r\n\r\n", id="chunk-size-0x"),
        pytest.param(b"4\r\nabcdEXTRA\r\n0\r\n\r\n", id="chunk-longer-than-size"),
    ],
)
def test_malformed_chunks_close_the_connection_and_nothing_is_forwarded(
    main: Sidecar, upstream: Upstream, chunks: bytes
) -> None:
    """mitmproxy's chunk reader drops the connection on a framing error (it has no response to answer
    with yet); the request never reaches the policy, let alone the upstream."""
    marker = unique("front")
    mark = upstream.wire_mark()
    request = _head(upstream, f"/notes/{marker}", "Transfer-Encoding: chunked") + chunks
    received, closed = exchange_until_closed(main.proxy_port, request)
    assert (received, closed) == (b"", True)
    _nothing_reached(upstream, mark, marker)


def test_huge_content_length_is_refused_at_once(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("front")
    mark = upstream.wire_mark()
    request = _head(upstream, f"/notes/{marker}", "Content-Length: 99999999999999999999999999") + b"abcd"
    assert_refused(one(main.exchange(request, timeout=5)), 413, "request.body_too_large", "bad_request")
    _nothing_reached(upstream, mark, marker)


def test_huge_chunk_size_is_refused_once_the_limit_is_passed(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("front")
    mark = upstream.wire_mark()
    # a T2 path: its body is buffered for the decision, so the limit applies
    request = _head(upstream, f"/items/{marker}", "Transfer-Encoding: chunked") + b"FFFFFFFFFFFFFFFFFF\r\n"
    answer = one(main.exchange(request + b"a" * 8192, timeout=5))
    assert_refused(answer, 413, "request.body_too_large", "bad_request")
    _nothing_reached(upstream, mark, marker)


# --- pipelining: every request on a connection is classified on its own ------------------------------


def _get(upstream: Upstream, path: str, absolute: bool = True) -> bytes:
    target = f"http://{upstream.authority}{path}" if absolute else path
    return f"GET {target} HTTP/1.1\r\nHost: {upstream.authority}\r\n\r\n".encode()


def _statuses(responses: list[RawResponse]) -> list[tuple[int, str | None]]:
    return [(r.status, r.header("vienna-decision")) for r in responses]


def test_pipelined_requests_behind_an_allowed_one_are_each_classified(
    main: Sidecar, upstream: Upstream
) -> None:
    first, denied, origin, last = (unique(name) for name in ("first", "denied", "origin", "last"))
    stream = (
        _get(upstream, f"/ok/{first}")
        + _get(upstream, f"/admin/{denied}")
        + _get(upstream, f"/admin/{origin}", absolute=False)
        + _get(upstream, f"/ok/{last}")
    )
    mark = upstream.wire_mark()
    responses = main.exchange(stream, expect=4)
    assert _statuses(responses) == [(200, "allow"), (403, "deny"), (403, "deny"), (200, "allow")]
    assert responses[1].json()["reason_code"] == responses[2].json()["reason_code"] == "policy.deny"
    _nothing_reached(upstream, mark, denied, origin)
    assert len(upstream.seen_containing(first)) == len(upstream.seen_containing(last)) == 1


def test_bytes_after_a_content_length_body_are_a_new_request_and_classified(
    main: Sidecar, upstream: Upstream
) -> None:
    """A body shorter than what was sent: the rest is the next request, and it meets the deny rule."""
    front, hidden = unique("front"), unique("hidden")
    stream = _head(upstream, f"/notes/{front}", "Content-Length: 4") + b"abcd" + _hidden(upstream, hidden)
    mark = upstream.wire_mark()
    responses = main.exchange(stream, expect=2)
    assert _statuses(responses) == [(200, "allow"), (403, "deny")]
    assert responses[1].json()["reason_code"] == "policy.deny"
    assert [s.body for s in upstream.seen_containing(front)] == [b"abcd"]
    _nothing_reached(upstream, mark, hidden)


def test_a_request_hidden_in_a_content_length_body_stays_a_body(main: Sidecar, upstream: Upstream) -> None:
    front, hidden = unique("front"), unique("hidden")
    inner = _hidden(upstream, hidden)
    stream = _head(upstream, f"/notes/{front}", f"Content-Length: {len(inner)}", "Connection: close") + inner
    answer = one(main.exchange(stream))
    assert answer.status == 200, answer
    assert [s.body for s in upstream.seen_containing(front)] == [inner]
    assert not [s for s in upstream.seen() if hidden in s.path]


def test_bare_lf_request_is_forwarded_with_crlf_framing(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("lf")
    request = f"POST http://{upstream.authority}/notes/{marker} HTTP/1.1\nHost: {upstream.authority}\n"
    request += "Content-Length: 4\nConnection: close\n\nabcd"
    mark = upstream.wire_mark()
    answer = one(main.exchange(request.encode()))
    assert answer.status == 200, answer
    wire = upstream.wire_since(mark)
    start = wire.index(f"POST /notes/{marker}".encode())
    head = wire[start : wire.index(b"\r\n\r\n", start)]
    assert b"\n" not in head.replace(b"\r\n", b"")  # every line ends in CRLF upstream
    assert [s.body for s in upstream.seen_containing(marker)] == [b"abcd"]


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param(
            ("Upgrade: h2c", "Connection: Upgrade, HTTP2-Settings", "HTTP2-Settings: AAMAAABkAAQAAP__"),
            id="h2c",
        ),
        pytest.param(
            (
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            ),
            id="websocket",
        ),
    ],
)
def test_protocol_upgrades_are_refused(main: Sidecar, upstream: Upstream, lines: tuple[str, ...]) -> None:
    """Upgrades other than h2c (dropped) and WebSocket on a `websocket: true` rule are refused."""
    marker = unique("up")
    mark = upstream.wire_mark()
    request = _head(upstream, f"/ok/{marker}", *lines, "Connection: close", method="GET")
    answer = one(main.exchange(request))
    if "Upgrade: h2c" in lines:
        assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
        [seen] = upstream.seen_containing(marker)
        assert seen.header("upgrade") is None
        return
    assert_refused(answer, 403, "request.upgrade", "denied")
    _nothing_reached(upstream, mark, marker)


def test_hop_by_hop_and_warrant_headers_never_reach_the_upstream(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("hop")
    request = _head(
        upstream,
        f"/ok/{marker}",
        "Connection: close, X-Named-Hop",
        "X-Named-Hop: secret",
        "Proxy-Authorization: Basic c2VjcmV0",
        "Keep-Alive: timeout=5",
        "TE: trailers",
        "Vienna-Warrant: not-a-warrant",
        method="GET",
    )
    answer = one(main.exchange(request))
    assert answer.status == 200, answer
    [seen] = upstream.seen_containing(marker)
    names = {key for key, _ in seen.headers}
    assert not names & {"x-named-hop", "proxy-authorization", "keep-alive", "te", "vienna-warrant"}
