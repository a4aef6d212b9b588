"""Attack family "MCP smuggling" (§14): bodies that try to get a destructive tool call classified as
something milder — by content type, size, duplicate keys, a missing `jsonrpc`, batching, or a warrant
for other arguments. The policy core decides exactly what the server would run, or refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest

from policy import engine
from policy.model import Request, Tier, Verdict
from policy.normalize import build_request
from policy.rules import load_rules
from policy.warrants import Bind, WarrantKeys, constraints_for, verify

POLICY = load_rules(
    """\
version: 1
default_tier: T3
rules:
  - id: read
    match: {hosts: [mcp.example], paths: [/mcp], mcp_tools: ["search_*"]}
    action: mcp.{tool}
    tier: T0
  - id: destroy
    match: {hosts: [mcp.example], paths: [/mcp], mcp_tools: [delete_repo]}
    action: mcp.delete_repo
    target: "{arguments.owner}/{arguments.repo}"
    tier: T3
  - id: session
    match: {hosts: [mcp.example], paths: [/mcp]}
    action: mcp.session
    tier: T0
"""
)


def call(name: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments or {}},
        **extra,
    }


def request(body: bytes | str, content_type: str = "application/json") -> Request:
    raw = body.encode() if isinstance(body, str) else body
    return build_request(method="POST", scheme="https", host="mcp.example", port=None, target="/mcp",
                         headers=[("content-type", content_type)], body=raw)  # fmt: skip


def decide(req: Request, warrant: str | None = None, keys: WarrantKeys | None = None) -> Any:
    return engine.decide(req, rules=POLICY, warrant=warrant, agent="a", keys=keys, now=1.0)


def test_a_plain_destructive_call_needs_a_warrant() -> None:
    decision = decide(request(json.dumps(call("delete_repo", {"owner": "o", "repo": "r"}))))
    assert decision.verdict is Verdict.WARRANT_REQUIRED and decision.intent.target == "o/r"


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "", "application/octet-stream"]
)
def test_the_content_type_does_not_hide_a_call(content_type: str) -> None:
    decision = decide(request(json.dumps(call("delete_repo")), content_type))
    assert decision.tier is Tier.T3, content_type


@pytest.mark.parametrize(
    "body",
    [
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_x","name":"delete_repo","arguments":{}}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"initialize","params":{"name":"delete_repo"}}',
        '{"id":1,"method":"tools/call","params":{"name":"delete_repo","arguments":{}}}',
        '{"jsonrpc":"1.0","id":1,"method":"tools/call","params":{"name":"delete_repo","arguments":{}}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["delete_repo"]}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo","arguments":[1]}}',
        '[{"jsonrpc":"2.0","id":1,"method":"initialize"}, 7]',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo","arguments":{"x":NaN}}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"}} trailing',
    ],
    ids=[
        "duplicate name",
        "duplicate method",
        "no jsonrpc",
        "jsonrpc 1.0",
        "positional params",
        "array arguments",
        "non-message in batch",
        "NaN",
        "trailing garbage",
    ],
)
def test_bodies_a_server_could_read_differently_are_refused(body: str) -> None:
    decision = decide(request(body))
    assert decision.verdict in (Verdict.BAD_REQUEST, Verdict.WARRANT_REQUIRED), decision
    assert decision.tier is not Tier.T0


def test_padding_past_the_parse_limit_does_not_downgrade() -> None:
    padded = json.dumps(call("delete_repo")) + " " * (1 << 20)
    assert decide(request(padded)).verdict is Verdict.BAD_REQUEST


def test_a_batch_takes_the_highest_tier_and_hiding_a_call_among_reads_fails() -> None:
    batch = [
        call("search_a"),
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        call("delete_repo", {"owner": "o", "repo": "r"}),
    ]
    decision = decide(request(json.dumps(batch)))
    assert decision.tier is Tier.T3 and decision.intent.action == "mcp.delete_repo"


def test_a_warrant_binds_the_tool_and_arguments_not_the_id() -> None:
    from policy.model import Intent
    from policy.warrants import Approval, WarrantClaims, mint

    keys = WarrantKeys({"k": b"k" * 32}, "k")
    approved = request(json.dumps(call("delete_repo", {"owner": "o", "repo": "r"})))
    con = constraints_for(approved, bind=Bind.MCP)
    claims = WarrantClaims(iss="vienna", sub="a", jti="w1", iat=0, nbf=0, exp=100, tier=Tier.T3,
                           intent=Intent(action="mcp.delete_repo", target="o/r", rule="destroy"),
                           approvals=(Approval(who="x", at=0, justification="j"),), con=con)  # fmt: skip
    token = mint(claims, keys)

    def check(body: Any) -> str:
        outcome = verify(
            token, request(json.dumps(body)), agent="a", keys=keys, now=1.0, required_tier=Tier.T3
        )
        return "valid" if not hasattr(outcome, "code") else str(outcome.code)

    assert (
        check({**call("delete_repo", {"owner": "o", "repo": "r"}), "id": 99}) == "valid"
    )  # a retry's new id
    assert check(call("delete_repo", {"owner": "o", "repo": "other"})) == "warrant.mismatch.mcp"
    assert check(call("delete_repo", {"owner": "o", "repo": "r", "force": True})) == "warrant.mismatch.mcp"
    assert (
        check(
            [
                call("delete_repo", {"owner": "o", "repo": "r"}),
                call("delete_repo", {"owner": "o", "repo": "x"}),
            ]
        )
        == "warrant.mismatch.mcp"
    )
    assert check(call("search_x", {"owner": "o", "repo": "r"})) == "warrant.mismatch.mcp"


DESTROY = json.dumps(call("delete_repo", {"owner": "o", "repo": "r"}))


@pytest.mark.parametrize(
    ("body", "content_type", "encoding"),
    [
        (DESTROY.encode("utf-16"), "application/json", None),
        (DESTROY.encode("utf-16-be"), "application/json", None),
        (DESTROY.encode("utf-32"), "application/json", None),
        (b"\xef\xbb\xbf" + DESTROY.encode(), "application/json", None),
        (DESTROY.encode(), "application/json; charset=utf-16be", None),
        (DESTROY.encode(), "application/json", "gzip"),
        (DESTROY.replace('"o"', '"\xff"').encode("latin-1"), "application/json", None),
        (
            (DESTROY[:-1] + ',"pad":"' + "x" * (1 << 20) + '"}')
            .replace('"method"', '"m\\u0065thod"')
            .encode(),
            "application/json",
            None,
        ),
    ],
    ids=["utf-16", "utf-16-be", "utf-32", "bom", "charset", "gzip", "not utf-8", "oversize, escaped key"],
)
def test_a_body_the_sidecar_cannot_read_plainly_is_refused_at_an_mcp_endpoint(
    body: bytes, content_type: str, encoding: str | None
) -> None:
    headers = [("content-type", content_type)] + ([("content-encoding", encoding)] if encoding else [])
    req = build_request(
        method="POST",
        scheme="https",
        host="mcp.example",
        port=None,
        target="/mcp",
        headers=headers,
        body=body,
    )
    assert decide(req).verdict is Verdict.BAD_REQUEST


@pytest.mark.parametrize(
    "body",
    [
        '{"jsonrpc":"2.0","id":1,"method":"tools/list","METHOD":"tools/call","params":{"name":"delete_repo","arguments":{}}}',
        '{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"delete_repo","arguments":{}}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_x","Name":"delete_repo","arguments":{}}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_x","arguments":{},"Arguments":{"owner":"o"}}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_x","arguments":{"owner":"a","Owner":"b"}}}',
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_x","arguments":{}},"param\u017f":{"name":"delete_repo"}}',
    ],
    ids=["METHOD", "Method only", "Name", "Arguments", "argument case twins", "long s"],
)
def test_keys_a_case_folding_server_would_read_otherwise_are_refused(body: str) -> None:
    assert decide(request(body)).verdict is Verdict.BAD_REQUEST


def test_an_unlisted_tool_is_never_decided_by_the_endpoints_session_rule() -> None:
    decision = decide(request(json.dumps(call("push_files", {"owner": "o"}))))
    assert decision.tier is Tier.T3 and decision.intent.rule is None  # default_tier, not mcp.session's T0


def test_a_credential_goes_only_to_hosts_named_exactly() -> None:
    from policy.rules import PolicyError

    for match in ("{}", "{hosts: ['*.example.com']}"):
        with pytest.raises(PolicyError, match="hosts named exactly"):
            load_rules(
                f"version: 1\nrules:\n  - {{id: r, match: {match}, action: a, tier: T0, inject: {{headers: {{Authorization: 'Bearer {{secret:t}}'}}}}}}\n"
            )


def test_a_batch_costs_one_rate_limit_token_per_call() -> None:
    from policy.rules import parse_rate
    from proxy.ratelimit import RateLimiter

    limiter, limit = RateLimiter(), parse_rate("3/m")
    assert limiter.take(("a", "r"), limit, 0.0, cost=2) == 0.0
    assert limiter.take(("a", "r"), limit, 0.0, cost=2) > 0  # only one token left
    assert limiter.take(("a", "r"), limit, 0.0, cost=100) > 0  # never, at once


def test_the_tools_list_filter_survives_split_events_bare_cr_and_odd_ids() -> None:
    from proxy.dataplane.mcp import ToolsListFilter

    answer = {"jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": "search_x"}, {"name": "read_secret"}]}}
    stream = (
        b"event: message\r\ndata: " + json.dumps(answer).encode() + b"\r\n\r\n" + b"event: ping\rdata: {}\r\r"
    )
    keep = ToolsListFilter(
        lambda chunk: chunk, sse=True, list_ids={7}, keep=lambda name: name != "read_secret"
    )
    out = b"".join(keep(stream[i : i + 3]) for i in range(0, len(stream), 3)) + keep(b"")
    events = [e for e in out.split(b"\n\n") if e]
    shown = json.loads(events[0].split(b"data: ", 1)[1])
    assert [t["name"] for t in shown["result"]["tools"]] == ["search_x"] and keep.removed == 1
    assert events[1] == b"event: ping\ndata: {}"
    odd = ToolsListFilter(lambda chunk: chunk, sse=False, list_ids={7}, keep=lambda name: False)
    raw = json.dumps({"jsonrpc": "2.0", "id": [7], "result": {"tools": [{"name": "x"}]}}).encode()
    assert odd(raw) + odd(b"") == raw  # an unhashable id is not a tools/list answer: untouched
