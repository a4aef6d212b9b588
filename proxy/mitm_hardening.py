"""Patches to mitmproxy's HTTP/1 server side: JSON refusals before any hook, a bounded request head."""

from __future__ import annotations

import re

from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import _http1

from proxy.answers import plain_error

# mitmproxy answers some requests itself before any hook runs: smuggling-prone framing (CL+TE, duplicate
# or bad Content-Length, unknown Transfer-Encoding), a malformed request line, a body over the limit.
# Those answers keep the contract of every other refusal: JSON with a reason_code, Vienna-Decision: deny.
# And it buffers a request head without bound (its own "FIXME: protect against header size DoS"), so
# the head is capped here.

MAX_REQUEST_HEAD = 64 * 1024
_END_OF_HEAD = re.compile(rb"\n\r?\n")  # what mitmproxy's reader (h11's buffer) ends a head at


def protocol_reason_code(status: int, message: str) -> str:
    """The dotted reason code for a refusal mitmproxy made itself, from its status and message."""
    text = message.lower()
    if status == 413 or "body_size_limit" in text:
        return "request.body_too_large"
    if status == 431:
        return "request.headers_too_large"
    if any(word in text for word in ("content-length", "transfer-encoding", "chunk", "smuggling")):
        return "request.bad_framing"
    if "request line" in text:
        return "request.bad_target"
    if "header" in text:
        return "request.bad_header"
    return "request.malformed" if 400 <= status < 500 else "internal.error"


def _protocol_error_response(status_code: int, message: str = "") -> bytes:
    """Replaces mitmproxy's HTML error page for requests it refuses before any hook runs."""
    reason = message.split(" Disable the ", 1)[0][:300]  # mitmproxy advises turning its checks off; drop that
    if status_code == 413:
        reason = "request body over the --max-body-bytes limit"
    response = plain_error(
        status_code,
        "bad_request" if 400 <= status_code < 500 else "denied",
        protocol_reason_code(status_code, message),
        reason or "malformed request",
    )
    response.headers["Connection"] = "close"
    raw: bytes = assemble_response(response)  # type: ignore[no-untyped-call]
    return raw


_original_read_headers = _http1.Http1Server.read_headers


def _read_headers_bounded(
    self: _http1.Http1Server, event: events.ConnectionEvent
) -> layer.CommandGenerator[None]:
    if isinstance(event, events.DataReceived):
        raw = bytes(self.buf)
        head = raw.lstrip(b"\r\n")
        if len(head) < len(raw):
            # Blank lines before a request line are skipped (RFC 9112 §2.2). h11 skips one per read and
            # then waits for more data, so a request already buffered behind two of them would hang.
            self.buf.maybe_extract_at_most(len(raw) - len(head))
        if len(head) > MAX_REQUEST_HEAD and _END_OF_HEAD.search(head[:MAX_REQUEST_HEAD]) is None:
            yield commands.SendData(
                self.conn, _protocol_error_response(431, f"request head over {MAX_REQUEST_HEAD} bytes")
            )
            yield commands.CloseConnection(self.conn)
            self.state = self.done
            return
    yield from _original_read_headers(self, event)


def install() -> None:
    """Patch mitmproxy (pinned to 12.3: these are private functions; re-check on any upgrade)."""
    _http1.make_error_response = _protocol_error_response
    _http1.Http1Server.read_headers = _read_headers_bounded  # type: ignore[method-assign]
