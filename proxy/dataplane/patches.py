"""Patches to mitmproxy: JSON refusals before any hook, a bounded request head, exchanges ended from outside."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mitmproxy import flow as mitm_flow
from mitmproxy import http
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import DropStream, HttpLayer, HttpStream, SendHttp, _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook

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
    if status >= 500:
        if any(word in text for word in ("tls", "certificate", "ssl", "handshake")):
            return "upstream.tls"
        if any(word in text for word in ("connect", "refused", "unreachable", "errno", "no route", "name")):
            return "upstream.unreachable"
        return "upstream.timeout" if status == 504 else "upstream.error"
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
        "bad_request"
        if 400 <= status_code < 500
        else "upstream_error"
        if status_code in (502, 503)
        else "denied",
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


# --- aborting an exchange from outside its hooks ------------------------------------------------
# Timeouts that measure silence, and --max-response-bytes, end an exchange that is already flowing.
# mitmproxy's layers are sans-IO state machines that only react to events, so the addon injects one
# (ExchangeAbort) for the flow; the HTTP layer routes it to the flow's stream, which answers the client
# (a JSON refusal when no response has started, else a reset/close) and drops the upstream side.


@dataclass
class ExchangeAbort(events.MessageInjected[Any]):
    """End `flow` now: answer `response` if the client has not had response headers yet, else cut."""

    flow: Any
    message: Any = None
    response: http.Response | None = None
    reason: str = ""


def _stream_abort(stream: HttpStream, event: ExchangeAbort) -> layer.CommandGenerator[None]:
    flow = stream.flow
    if stream.client_state == stream.state_errored and stream.server_state == stream.state_errored:
        return
    started = stream.server_state in (stream.state_stream_response_body, stream.state_done)
    server = stream.context.server
    if server.connected and stream.server_state not in (stream.state_done, stream.state_errored):
        yield SendHttp(RequestProtocolError(stream.stream_id, event.reason, ErrorCode.KILL), server)
    if event.response is not None and not started and stream.client_state == stream.state_done:
        flow.response = event.response
        yield SendHttp(ResponseHeaders(stream.stream_id, event.response, False), stream.context.client)
        yield SendHttp(
            ResponseData(stream.stream_id, event.response.raw_content or b""), stream.context.client
        )
        yield SendHttp(ResponseEndOfMessage(stream.stream_id), stream.context.client)
    else:
        yield SendHttp(
            ResponseProtocolError(stream.stream_id, event.reason, ErrorCode.KILL), stream.context.client
        )
    flow.live = False
    stream.client_state = stream.server_state = stream.state_errored
    yield DropStream(stream.stream_id)


UPSTREAM_ERROR_ANSWER = "vienna.upstream_error_answer"


def _handle_protocol_error(
    self: HttpStream, event: RequestProtocolError | ResponseProtocolError
) -> layer.CommandGenerator[None]:
    """An upstream that fails before its response headers gets the refusal body of the exchange's
    decision (its tier, intent, decision id) instead of mitmproxy's context-free error page."""
    flow = getattr(self, "flow", None)
    answer = flow.metadata.get(UPSTREAM_ERROR_ANSWER) if flow is not None else None
    if (
        isinstance(event, ResponseProtocolError)
        and answer is not None
        and flow is not None
        and self.client_state == self.state_done
        and self.server_state == self.state_wait_for_response_headers
    ):
        flow.error = mitm_flow.Error(event.message)
        yield HttpErrorHook(flow)
        response: http.Response = answer(event.code.http_status_code() or 502, event.message)
        flow.response = response
        yield SendHttp(ResponseHeaders(self.stream_id, response, False), self.context.client)
        yield SendHttp(ResponseData(self.stream_id, response.raw_content or b""), self.context.client)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        flow.live = False
        self.client_state = self.server_state = self.state_errored
        yield DropStream(self.stream_id)
        return
    yield from _original_protocol_error(self, event)


_original_read_body = _http1.Http1Connection.read_body


def _read_body_dropping_trailers(
    self: _http1.Http1Connection, event: events.Event
) -> layer.CommandGenerator[None]:
    """HTTP/1 trailer fields end a chunked body in mitmproxy with NotImplementedError (the connection
    dropped, no answer). The message ends where its trailers begin: they are dropped, never relayed
    (a trailer the policy never saw must not reach the upstream either)."""
    try:
        yield from _original_read_body(self, event)
    except NotImplementedError:
        assert self.request is not None and self.stream_id is not None
        if self.request.data.method.upper() != b"CONNECT":
            yield ReceiveHttp(self.ReceiveEndOfMessage(self.stream_id))
        is_request = isinstance(self, _http1.Http1Server)
        yield from self.mark_done(request=is_request, response=not is_request)


_original_protocol_error = HttpStream.handle_protocol_error
_original_check_body_size = HttpStream.check_body_size


def _check_request_body_size(self: HttpStream, request: bool) -> layer.CommandGenerator[bool]:
    """body_size_limit (= --max-body-bytes) limits the request bodies mitmproxy buffers, never responses:
    those stream, and --max-response-bytes is counted by the exchange as they do."""
    if not request:
        return False
    return (yield from _original_check_body_size(self, request))


_original_stream_handle = HttpStream._handle_event
_original_layer_handle = HttpLayer._handle_event


def _stream_handle_event(self: HttpStream, event: events.Event) -> layer.CommandGenerator[None]:
    if isinstance(event, ExchangeAbort):
        if event.flow is self.flow:
            yield from _stream_abort(self, event)
        elif self.child_layer is not None:  # a CONNECT stream: the flow lives in the tunnel
            yield from self.child_layer.handle_event(event)
        return
    yield from _original_stream_handle(self, event)


def _layer_handle_event(self: HttpLayer, event: events.Event) -> layer.CommandGenerator[None]:
    if isinstance(event, ExchangeAbort):
        for stream in list(self.streams.values()):
            if stream.flow is event.flow:
                yield from self.event_to_child(stream, event)
                return
        for stream in list(self.streams.values()):  # CONNECT tunnels: the flow is further down
            if stream.child_layer is not None:
                yield from self.event_to_child(stream, event)
        return
    yield from _original_layer_handle(self, event)


def install() -> None:
    """Patch mitmproxy (pinned to 12.3: these are private functions; re-check on any upgrade)."""
    _http1.make_error_response = _protocol_error_response
    _http1.Http1Server.read_headers = _read_headers_bounded  # type: ignore[method-assign]
    HttpStream._handle_event = _stream_handle_event  # type: ignore[method-assign]
    HttpLayer._handle_event = _layer_handle_event  # type: ignore[method-assign]
    HttpStream.handle_protocol_error = _handle_protocol_error  # type: ignore[method-assign]
    HttpStream.check_body_size = _check_request_body_size  # type: ignore[method-assign]
    _http1.Http1Connection.read_body = _read_body_dropping_trailers  # type: ignore[method-assign]
