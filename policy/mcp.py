"""MCP tool calls as intents (DESIGN.md §14): a JSON-RPC 2.0 body read exactly once, strictly.

A POST whose JSON body is a `tools/call` (or a batch holding one) is classified by its tool name; a
warrant binds the endpoint, the tool and the SHA-256 of the canonical JSON of the arguments, never
the JSON-RPC id (a client's retry carries a new one). A body that could be read two ways (a key
given twice, a non-object message) is not guessed: it is ambiguous.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_MCP_BODY = 1 << 20
TOOLS_CALL = "tools/call"
TOOLS_LIST = "tools/list"
REFUSAL_CODE = -32001  # a JSON-RPC server error, in the implementation-defined range


class McpAmbiguous(ValueError):
    """A JSON-RPC body the sidecar will not guess about (duplicate keys, a bad message shape)."""


@dataclass(frozen=True, slots=True)
class McpMessage:
    method: str
    id: Any  # the JSON-RPC id as sent (None for a notification)
    has_id: bool
    tool: str | None = None  # for tools/call
    arguments: Mapping[str, Any] | None = None  # for tools/call

    @property
    def arguments_sha256(self) -> str:
        return arguments_digest(self.arguments or {})


@dataclass(frozen=True, slots=True)
class McpBody:
    messages: tuple[McpMessage, ...]
    batch: bool

    @property
    def calls(self) -> tuple[McpMessage, ...]:
        return tuple(m for m in self.messages if m.method == TOOLS_CALL)

    @property
    def lists_tools(self) -> bool:
        return any(m.method == TOOLS_LIST for m in self.messages)


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    text = json.dumps(
        dict(arguments), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


_FIELDS = frozenset({"jsonrpc", "method", "params", "id", "name", "arguments", "result", "error", "_meta"})


def _strict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise McpAmbiguous("a key is given twice in the JSON-RPC body")
    # Some servers (Go's encoding/json) match keys case-insensitively, folding U+017F to s and U+212A to k:
    # keys that one of them would read as the same key are refused, whatever their spelling here.
    if len({key.casefold() for key in result}) != len(result):
        raise McpAmbiguous("two keys of one object differ only in case")
    for key in result:
        if key not in _FIELDS and key.casefold() in _FIELDS:
            raise McpAmbiguous(f"a key spelled {key[:20]!r}: a server could read it as {key.casefold()!r}")
    return result


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise McpAmbiguous(f"{text[:40]} is not a finite number")
    return value


def _constant(name: str) -> Any:
    raise McpAmbiguous(f"{name} is not JSON")


def parse_mcp(
    body: bytes, content_type: str | None, *, content_encoding: str | None = None, strict: bool = False
) -> McpBody | None:
    """The JSON-RPC messages of a body, None when it is not JSON-RPC at all; raises McpAmbiguous for
    a body that could be read more than one way. The Content-Type is not trusted (servers parse the
    JSON whatever it says). `strict` (an endpoint with MCP rules): a body that is not plainly
    readable — compressed, another charset, not UTF-8, a BOM, over the limit, not JSON — is
    refused, never taken for "not a call", since the server may read a call in it."""
    if not body:
        return None
    if strict:
        if content_encoding and content_encoding.strip().lower() not in ("identity", ""):
            raise McpAmbiguous(f"a {content_encoding[:20]}-encoded body at an MCP endpoint is not read")
        charset = _charset(content_type)
        if charset not in (None, "utf-8", "utf8"):
            raise McpAmbiguous(f"a {charset[:20]} body at an MCP endpoint is not read")
        if len(body) > MAX_MCP_BODY:
            raise McpAmbiguous(f"a body over {MAX_MCP_BODY} bytes at an MCP endpoint is not read")
        if body.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")) or b"\x00" in body:
            raise McpAmbiguous("a body with a byte order mark or NUL at an MCP endpoint is not read")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise McpAmbiguous("a body that is not UTF-8 at an MCP endpoint is not read") from None
    stripped = body.lstrip(b" \t\r\n")
    if stripped[:1] not in (b"{", b"["):
        if strict and stripped:
            raise McpAmbiguous("a body that is not JSON at an MCP endpoint is not read")
        return None
    if len(body) > MAX_MCP_BODY:
        return None
    try:
        document = json.loads(body, object_pairs_hook=_strict, parse_constant=_constant, parse_float=_finite)
    except McpAmbiguous:
        raise
    except (ValueError, RecursionError):
        if strict or b"method" in body:
            raise McpAmbiguous("a body that looks like JSON-RPC but is not JSON") from None
        return None
    batch = isinstance(document, list)
    items = document if batch else [document]
    if not any(isinstance(item, dict) and "method" in item for item in items):
        return None  # JSON, but no message calls anything
    if not items or not all(isinstance(item, dict) for item in items):
        raise McpAmbiguous("a JSON-RPC batch holds something that is not a message")
    messages: list[McpMessage] = []
    for item in items:
        method = item.get("method")
        if "method" not in item and ("result" in item or "error" in item):
            # a response the client sends back to the server (to a server-initiated request): no call
            messages.append(McpMessage(method="(response)", id=item.get("id"), has_id="id" in item))
            continue
        if item.get("jsonrpc") != "2.0" or not isinstance(method, str):
            raise McpAmbiguous("a JSON-RPC message needs jsonrpc 2.0 and a string method")
        tool: str | None = None
        arguments: Mapping[str, Any] | None = None
        if method == TOOLS_CALL:
            params = item.get("params")
            if not isinstance(params, dict) or not isinstance(params.get("name"), str):
                raise McpAmbiguous("a tools/call without params.name")
            tool = params["name"]
            raw_arguments = params.get("arguments", {})
            if raw_arguments is None:
                raw_arguments = {}
            if not isinstance(raw_arguments, dict):
                raise McpAmbiguous("tools/call arguments must be an object")
            arguments = raw_arguments
        messages.append(
            McpMessage(method=method, id=item.get("id"), has_id="id" in item, tool=tool, arguments=arguments)
        )
    return McpBody(messages=tuple(messages), batch=batch)


def _charset(content_type: str | None) -> str | None:
    for param in (content_type or "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def tool_matches(patterns: tuple[str, ...], tool: str) -> bool:
    """Globs (`*`, `?`, `[…]`) over the whole tool name, case-sensitively (tool names are)."""
    return any(fnmatch.fnmatchcase(tool, pattern) for pattern in patterns)


_ARGUMENT = re.compile(r"\{arguments\.([A-Za-z_][A-Za-z0-9_-]*)\}")


def template_values(message: McpMessage) -> dict[str, str]:
    """What `{tool}` and `{arguments.NAME}` render to (a non-string argument as its JSON)."""
    values = {"tool": message.tool or ""}
    for name, value in (message.arguments or {}).items():
        values[f"arguments.{name}"] = (
            value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
        )
    return values


def refusal(message_id: Any, message: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A refused tools/call as the JSON-RPC error an MCP client hands to the model as a tool error."""
    return {
        "jsonrpc": "2.0",
        "id": message_id,
        "error": {"code": REFUSAL_CODE, "message": message, "data": dict(data)},
    }


def filter_tools(result: Any, keep: Any) -> tuple[Any, int]:
    """A tools/list result without the tools `keep(name)` refuses; (result, tools removed)."""
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return result, 0
    kept = [
        tool
        for tool in result["tools"]
        if not (isinstance(tool, dict) and isinstance(tool.get("name"), str) and not keep(tool["name"]))
    ]
    removed = len(result["tools"]) - len(kept)
    return ({**result, "tools": kept} if removed else result), removed
