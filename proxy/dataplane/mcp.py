"""§14 on the wire: refused tool calls answered as JSON-RPC errors, and `tools/list` answers (JSON or
SSE) with the tools whose calls would be denied taken out."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from mitmproxy import http

from policy.classify import classify
from policy.mcp import McpAmbiguous, McpBody, filter_tools, parse_mcp, refusal
from policy.model import Request, Tier
from policy.rules import RuleSet

log = logging.getLogger("vienna.mcp")
MAX_LIST_BYTES = 8 << 20  # a tools/list answer held to be filtered; a longer one is relayed as is


def mcp_body(request: Request) -> McpBody | None:
    if request.method != "POST":
        return None
    try:
        return parse_mcp(request.body, request.header("content-type"))
    except McpAmbiguous:
        return None


def jsonrpc_refusal(
    body: McpBody, status: int, deny: Mapping[str, Any], headers: Mapping[str, str]
) -> http.Response | None:
    """The refusal of a request holding tool calls, as JSON-RPC (HTTP 200): one error per message
    that expects an answer, so the MCP client hands the reason to the model as a tool error."""
    if not body.calls:
        return None
    message = str(deny.get("reason") or "refused by policy")
    data = {**deny, "http_status": status}
    answers = [refusal(m.id, message, data) for m in body.messages if m.has_id]
    if not answers:
        return http.Response.make(202, b"", {**headers})
    payload: Any = answers if body.batch else answers[0]
    content = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return http.Response.make(
        200, content, {**headers, "Content-Type": "application/json", "Cache-Control": "no-store"}
    )


def deny_tool(rules: RuleSet, endpoint: Request, agent: str) -> Callable[[str], bool]:
    """keep(name): False for a tool whose call (with no arguments) this policy denies."""

    def keep(name: str) -> bool:
        call = json.dumps(
            {"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": {"name": name, "arguments": {}}}
        ).encode()
        probe = replace(
            endpoint,
            method="POST",
            body=call,
            body_sha256="",
            headers=(("content-type", "application/json"),),
            wire_method=None,
        )
        return classify(probe, rules, agent=agent).tier is not Tier.DENY

    return keep


def _rewrite_message(message: Any, list_ids: set[Any], keep: Callable[[str], bool]) -> tuple[Any, int]:
    if isinstance(message, list):
        total = 0
        out = []
        for item in message:
            rewritten, removed = _rewrite_message(item, list_ids, keep)
            out.append(rewritten)
            total += removed
        return out, total
    if (
        isinstance(message, dict)
        and "result" in message
        and isinstance(message.get("id"), (str, int))
        and message.get("id") in list_ids
    ):
        result, removed = filter_tools(message["result"], keep)
        return ({**message, "result": result} if removed else message), removed
    return message, 0


MAX_EVENT_BYTES = 1 << 20  # an SSE event held to be rewritten; a longer one ends the filtering


class ToolsListFilter:
    """A response stream function: JSON answers are held (bounded) and rewritten at their end; SSE
    answers are rewritten event by event (each bounded). What cannot be parsed is relayed untouched —
    the tool calls themselves are still decided one by one, so filtering is a view, not the enforcement."""

    def __init__(
        self, inner: Callable[[bytes], bytes], *, sse: bool, list_ids: set[Any], keep: Callable[[str], bool]
    ) -> None:
        self.inner = inner
        self.sse = sse
        self.list_ids = list_ids
        self.keep = keep
        self.held = bytearray()
        self.carriage = False  # the last byte seen was a CR (a CRLF may straddle two chunks)
        self.given_up = False
        self.removed = 0

    def __call__(self, chunk: bytes) -> bytes:
        try:
            return self._step(chunk)
        except Exception:  # the view must never break the stream: relay what is held, stop filtering
            log.exception("tools/list filtering failed; relaying the rest untouched")
            self.given_up = True
            held, self.held = bytes(self.held), bytearray()
            return held

    def _step(self, chunk: bytes) -> bytes:
        data = self.inner(chunk)
        if self.given_up:
            return data
        if not self.sse:
            self.held += data
            if len(self.held) > MAX_LIST_BYTES:
                self.given_up = True
                held, self.held = bytes(self.held), bytearray()
                return held
            if chunk != b"":
                return b""
            held, self.held = bytes(self.held), bytearray()
            try:
                document = json.loads(held)
            except (ValueError, RecursionError):
                return held
            rewritten, removed = _rewrite_message(document, self.list_ids, self.keep)
            self.removed += removed
            return json.dumps(rewritten, separators=(",", ":")).encode() if removed else held
        # SSE: normalise line ends on the new bytes only, then cut complete events off the front.
        text = data.replace(b"\r\n", b"\n")
        if self.carriage and text.startswith(b"\n"):
            text = text[1:]
        self.carriage = text.endswith(b"\r")
        start = len(self.held)
        self.held += text.replace(b"\r", b"\n")
        out = bytearray()
        search_from = max(0, start - 1)
        while (end := self.held.find(b"\n\n", search_from)) >= 0:
            event = bytes(self.held[:end])
            del self.held[: end + 2]
            out += self._event(event) + b"\n\n"
            search_from = 0
        if len(self.held) > MAX_EVENT_BYTES:
            self.given_up = True
            out += self.held
            self.held = bytearray()
        if chunk == b"" and self.held:
            out += self.held
            self.held = bytearray()
        return bytes(out)

    def _event(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        data = [line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:")]
        if not data:
            return event
        try:
            message = json.loads(b"\n".join(data))
        except (ValueError, RecursionError):
            return event
        rewritten, removed = _rewrite_message(message, self.list_ids, self.keep)
        if not removed:
            return event
        self.removed += removed
        others = [line for line in lines if not line.startswith(b"data:")]
        return b"\n".join([*others, b"data: " + json.dumps(rewritten, separators=(",", ":")).encode()])
