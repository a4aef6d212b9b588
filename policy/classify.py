"""Request → intent and tier: host-indexed candidate rules, first match in document order wins."""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl

from policy.mcp import McpAmbiguous, McpBody, McpMessage, parse_mcp, template_values, tool_matches
from policy.model import Intent, Request, Tier, highest_tier
from policy.rules import CEL_REQUEST_FIELDS, DEFAULT_TARGET, Rule, RuleSet
from policy.templates import render_target

_INTEGER = re.compile(r"^-?[0-9]{1,18}$")
_MAX_PARSED_BODY = 1 << 20
_WHEN_FAILURE_FLOOR = Tier.T2
_SORT_CANDIDATES_UP_TO = 64
# Document order of the `request` fields, as cel_context has always listed them.
_REQUEST_FIELDS = ("method", "scheme", "host", "port", "path", "query", "headers", "json", "form", "mcp")
_ALL_INPUTS = frozenset({*CEL_REQUEST_FIELDS, "agent"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Classification:
    intent: Intent
    tier: Tier
    rule: Rule | None
    reason_code: str
    reason: str


def candidate_rules(rules: RuleSet, host: str) -> Iterable[int]:
    """Positions of the rules that can match `host`, in document order, without scanning the rest."""
    lists: list[tuple[int, ...]] = []
    exact = rules.by_exact_host.get(host)
    if exact:
        lists.append(exact)
    if rules.by_wildcard_suffix:
        suffix = host
        while (dot := suffix.find(".")) >= 0:
            suffix = suffix[dot + 1 :]
            wild = rules.by_wildcard_suffix.get(suffix)
            if wild:
                lists.append(wild)
    if rules.any_host:
        lists.append(rules.any_host)
    if len(lists) <= 1:
        return lists[0] if lists else ()
    if sum(len(positions) for positions in lists) <= _SORT_CANDIDATES_UP_TO:
        # A few positions sort faster than a lazy merge starts; the merge wins for long lists,
        # where the first match usually comes long before their end.
        return sorted(set().union(*lists))
    return _merged(lists)


def _merged(lists: list[tuple[int, ...]]) -> Iterator[int]:
    last = -1
    for position in heapq.merge(*lists):
        if position != last:
            yield position
            last = position


def _host_matches(rule: Rule, request: Request) -> bool:
    if rule.hosts is None:
        return True
    for pattern in rule.hosts:
        if pattern.port is not None and pattern.port != request.port:
            continue
        if pattern.wildcard:
            if request.host.endswith("." + pattern.host):
                return True
        elif request.host == pattern.host:
            return True
    return False


def _path_captures(rule: Rule, request: Request) -> dict[str, str] | None:
    if rule.paths is None:
        return {}
    for template in rule.paths:
        captured = template.match(request.path)
        if captured is not None:
            return captured
    return None


def _coerce(value: str) -> str | int:
    # Form and query values arrive as text; policies compare amounts with numbers
    # (`request.form.amount > 100000`), and CEL never coerces, so integer-looking values become ints.
    return int(value) if _INTEGER.fullmatch(value) else value


def _pairs_to_map(text: str) -> dict[str, str | int]:
    values: dict[str, str | int] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        values.setdefault(key, _coerce(value))
    return values


AMBIGUOUS_PARAMETER = "request.ambiguous_parameter"
AMBIGUOUS_JSONRPC = "request.ambiguous_jsonrpc"
_MCP_TEMPLATE = re.compile(r"\{(tool|arguments\.[A-Za-z_][A-Za-z0-9_-]*)\}")
_ANY_TEMPLATE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)?)\}")
_ALL_KEYS = "*"


class _WhenInputs:
    """What `when` expressions read about one request, each value built at most once."""

    __slots__ = ("_agent", "_duplicates", "_request", "_values")

    def __init__(self, request: Request, agent: str) -> None:
        self._request = request
        self._agent = agent
        self._values: dict[str, Any] = {}
        self._duplicates: dict[str, frozenset[str]] = {}

    def ambiguous_read(self, rule: Rule) -> tuple[str, str] | None:
        """(field, key) when `rule`'s `when` reads a key the request gives twice; upstream parsers
        disagree on which value counts, so no value is picked."""
        if rule.when_inputs is None:
            wanted: dict[str, frozenset[str] | None] = dict.fromkeys(_KEYED, None)
        else:
            wanted = {name: keys for name, keys in rule.when_keys.items() if name in rule.when_inputs}
            for name in _KEYED:  # a field read without a visible key (e.g. handed whole) reads all keys
                if name in rule.when_inputs and name not in wanted:
                    wanted[name] = None
        for name, keys in wanted.items():
            duplicated = self._duplicated(name)
            if not duplicated:
                continue
            if _ALL_KEYS in duplicated:
                return name, next(iter(keys)) if keys else _ALL_KEYS
            hit = duplicated if keys is None else duplicated & keys
            if hit:
                return name, min(hit)
        return None

    def _duplicated(self, name: str) -> frozenset[str]:
        if name not in self._duplicates:
            self._duplicates[name] = _duplicate_keys(self._request, name)
        return self._duplicates[name]

    def context(self, wanted: frozenset[str] | None) -> dict[str, Any]:
        """The CEL variables for a `when` that reads `wanted` (None: everything)."""
        names = wanted if wanted is not None else _ALL_INPUTS
        context: dict[str, Any] = {}
        fields = {name: self._value(name) for name in _REQUEST_FIELDS if name in names}
        if fields or wanted is None:
            context["request"] = fields
        if "agent" in names:
            context["agent"] = {"id": self._agent}
        return context

    def _value(self, name: str) -> Any:
        if name not in self._values:
            self._values[name] = _request_field(self._request, name)
        return self._values[name]


_KEYED = ("query", "form", "headers", "json")


def _duplicate_keys(request: Request, name: str) -> frozenset[str]:
    """Keys of a keyed field given more than once ("*" for a JSON body with a duplicate anywhere)."""
    if name == "headers":
        return _twice(key for key, _ in request.headers)
    if name == "query":
        return _twice(key for key, _ in parse_qsl(request.query, keep_blank_values=True))
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if not request.body or len(request.body) > _MAX_PARSED_BODY:
        return frozenset()
    if name == "form":
        if content_type != "application/x-www-form-urlencoded":
            return frozenset()
        pairs = parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True)
        return _twice(key for key, _ in pairs)
    if not (content_type == "application/json" or content_type.endswith("+json")):
        return frozenset()
    seen_twice: list[bool] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({key for key, _ in pairs}) != len(pairs):
            seen_twice.append(True)
        return dict(pairs)

    try:
        json.loads(request.body, object_pairs_hook=pairs_hook)
    except (ValueError, RecursionError):
        return frozenset()
    return frozenset({_ALL_KEYS}) if seen_twice else frozenset()


def _twice(keys: Iterable[str]) -> frozenset[str]:
    seen: set[str] = set()
    twice: set[str] = set()
    for key in keys:
        (twice if key in seen else seen).add(key)
    return frozenset(twice)


def _request_field(request: Request, name: str) -> Any:
    if name == "query":
        return _pairs_to_map(request.query)
    if name == "headers":
        headers: dict[str, str] = {}
        for key, value in request.headers:
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return headers
    if name in ("json", "form"):
        return _body(request, name)
    if name == "mcp":
        message = _single_message(request)
        if message is None:
            return {"method": "", "tool": "", "arguments": {}}
        return {
            "method": message.method,
            "tool": message.tool or "",
            "arguments": dict(message.arguments or {}),
        }
    return getattr(request, name)


def _mcp_body(request: Request) -> McpBody | None:
    if request.method != "POST":
        return None
    try:
        return parse_mcp(request.body, request.header("content-type"))
    except McpAmbiguous:
        return None


def _single_message(request: Request) -> McpMessage | None:
    body = _mcp_body(request)
    if body is None or body.batch or len(body.messages) != 1:
        return None
    return body.messages[0]


def _body(request: Request, kind: str) -> Any:
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    is_json = content_type == "application/json" or content_type.endswith("+json")
    too_large = len(request.body) > _MAX_PARSED_BODY
    if too_large and (is_json or content_type == "application/x-www-form-urlencoded"):
        # Read as empty, a guard like `has(request.form.amount)` would be false while the upstream
        # parses the whole body: the `when` fails instead (and so the request fails closed).
        raise ValueError(f"the body is over {_MAX_PARSED_BODY} bytes; a when cannot read it")
    if kind == "form" and content_type.startswith("multipart/"):
        raise ValueError("multipart bodies are not parsed; a when cannot read request.form from one")
    parsed = request.body and not too_large
    if kind == "json":
        if not (parsed and is_json):
            return None
        try:
            return json.loads(request.body)
        except (ValueError, RecursionError):  # deep nesting must not turn a parse into an error
            return None
    if parsed and content_type == "application/x-www-form-urlencoded":
        return _pairs_to_map(request.body.decode("utf-8", "replace"))
    return {}


def cel_context(request: Request, agent: str) -> dict[str, Any]:
    """Every variable a `when` can read: `request` (method … form) and `agent`."""
    return _WhenInputs(request, agent).context(None)


def _evaluate(rule: Rule, inputs: _WhenInputs) -> tuple[bool | None, str]:
    """(True/False, '') or (None, why) when `when` cannot be evaluated to a boolean."""
    try:
        outcome = rule.when_program.execute(inputs.context(rule.when_inputs))
    except Exception as exc:  # any evaluation failure must fail closed, whatever its type
        return None, str(exc)
    if outcome is True or outcome is False:
        return outcome, ""
    return None, "not a boolean"


def classify(request: Request, rules: RuleSet, *, agent: str) -> Classification:
    """The rule that decides `request`. A JSON-RPC body bound for an endpoint with MCP rules is read
    strictly; a batch (or several messages) is classified message by message and takes the highest
    tier of them all (§14: refused as a whole)."""
    if rules.has_mcp_rules and request.method == "POST" and _mcp_candidate(request, rules):
        try:
            body = parse_mcp(
                request.body,
                request.header("content-type"),
                content_encoding=request.header("content-encoding"),
                strict=True,
            )
        except McpAmbiguous as exc:
            return Classification(
                intent=Intent(action="mcp.ambiguous", target=f"{request.host}{request.path}", rule=None),
                tier=Tier.DENY,
                rule=None,
                reason_code=AMBIGUOUS_JSONRPC,
                reason=f"the JSON-RPC body can be read more than one way ({exc}); it is not guessed",
            )
        if body is not None and (body.batch or len(body.messages) > 1):
            parts = [
                _classify_one(
                    replace(request, body=_message_body(message), body_sha256=request.body_sha256),
                    rules,
                    agent=agent,
                )
                for message in body.messages
            ]
            worst = max(parts, key=lambda part: part.tier.rank)
            if len(parts) > 1:
                calls = sum(1 for m in body.messages if m.method == "tools/call")
                worst = replace(
                    worst,
                    reason=f"{worst.reason} (a batch of {len(parts)} messages, {calls} tool calls: the highest tier of them decides)",
                )
            return worst
    return _classify_one(request, rules, agent=agent)


def mcp_endpoint(request: Request, rules: RuleSet) -> bool:
    """Whether an MCP rule could match this request's host and path (its body is then read strictly)."""
    return rules.has_mcp_rules and _mcp_candidate(request, rules)


def _mcp_candidate(request: Request, rules: RuleSet) -> bool:
    for position in candidate_rules(rules, request.host):
        rule = rules.rules[position]
        if rule.mcp_tools is None or (rule.hosts is not None and not _host_matches(rule, request)):
            continue
        if _path_captures(rule, request) is not None:
            return True
    return False


def _message_body(message: McpMessage) -> bytes:
    """One message of a batch, as a body of its own (what its classification reads)."""
    item: dict[str, Any] = {"jsonrpc": "2.0", "method": message.method}
    if message.has_id:
        item["id"] = message.id
    if message.method == "tools/call":
        item["params"] = {"name": message.tool, "arguments": dict(message.arguments or {})}
    return json.dumps(item, separators=(",", ":")).encode()


def _classify_one(request: Request, rules: RuleSet, *, agent: str) -> Classification:
    inputs: _WhenInputs | None = None
    # §14: a tools/call is decided by an mcp_tools rule or by default_tier, never by a rule for the
    # endpoint's other traffic (a catch-all session rule must not run unlisted tools).
    call = _single_message(request) if rules.has_mcp_rules else None
    is_call = call is not None and call.method == "tools/call"
    # A `when` that cannot be evaluated counts as matching at the highest tier it could give:
    # its own, or whatever a later rule (or default_tier) gives, and never below T2.
    failed: tuple[Rule, dict[str, str], str] | None = None
    floor = _WHEN_FAILURE_FLOOR
    for position in candidate_rules(rules, request.host):
        rule = rules.rules[position]
        if rule.methods is not None and request.method not in rule.methods:
            continue
        if rule.hosts is not None and not _host_matches(rule, request):
            continue
        captured = _path_captures(rule, request)
        if captured is None:
            continue
        if rule.mcp_tools is not None:
            message = _single_message(request)
            if message is None or message.tool is None or not tool_matches(rule.mcp_tools, message.tool):
                continue
            captured = {**captured, **template_values(message)}
        elif is_call and rule.tier is not Tier.DENY:
            continue
        if rule.when_program is not None:
            if inputs is None:
                inputs = _WhenInputs(request, agent)
            ambiguous = inputs.ambiguous_read(rule)
            if ambiguous is not None:
                return _ambiguous(rule, request, captured, *ambiguous)
            outcome, why = _evaluate(rule, inputs)
            if outcome is False:
                continue
            if outcome is None:
                if failed is None:
                    failed = (rule, captured, why)
                floor = highest_tier((floor, rule.tier))
                continue
        if failed is not None:
            return _when_failed(failed, request, highest_tier((floor, rule.tier)))
        return Classification(
            intent=_intent(rule, request, captured),
            tier=rule.tier,
            rule=rule,
            reason_code="policy.rule",
            reason=f"matched rule {rule.id!r}",
        )
    if failed is not None:
        return _when_failed(failed, request, highest_tier((floor, rules.default_tier)))
    return Classification(
        intent=Intent(action="unmatched", target=f"{request.host}{request.path}", rule=None),
        tier=rules.default_tier,
        rule=None,
        reason_code="policy.default_tier",
        reason="no rule matched; default_tier applies",
    )


def _ambiguous(rule: Rule, request: Request, captured: dict[str, str], name: str, key: str) -> Classification:
    shown = "a key" if key == _ALL_KEYS else f"{key!r}"
    return Classification(
        intent=_intent(rule, request, captured),
        tier=Tier.DENY,
        rule=rule,
        reason_code=AMBIGUOUS_PARAMETER,
        reason=f"rule {rule.id!r} reads request.{name} {shown}, which the request gives more than once; "
        "upstreams disagree on which value counts, so none is picked",
    )


def _when_failed(failed: tuple[Rule, dict[str, str], str], request: Request, tier: Tier) -> Classification:
    rule, captured, why = failed
    return Classification(
        intent=_intent(rule, request, captured),
        tier=tier,
        rule=rule,
        reason_code="policy.when_error",
        reason=f"rule {rule.id!r}: when could not be evaluated ({why[:200]}); failing closed at {tier}",
    )


def _intent(rule: Rule, request: Request, captured: dict[str, str]) -> Intent:
    action = rule.action
    if rule.mcp_tools is not None and "{" in action:
        action = _MCP_TEMPLATE.sub(lambda m: captured.get(m.group(1), ""), action)
    if rule.target == DEFAULT_TARGET:
        target = f"{request.host}{request.path}"
    elif "{" not in rule.target:
        target = rule.target
    else:
        values = {
            "host": request.host,
            "port": str(request.port),
            "method": request.method,
            "path": request.path,
            "scheme": request.scheme,
            "query": request.query,
            **captured,
        }
        if rule.mcp_tools is not None:
            # one pass over every template: a tool name's or an argument's own text is never expanded
            target = _ANY_TEMPLATE.sub(lambda m: values.get(m.group(1), ""), rule.target)
        else:
            target = render_target(rule.target, values)
    return Intent(action=action, target=target, rule=rule.id)


def body_needed(request: Request, rules: RuleSet, *, agent: str, warrant: bool) -> bool:
    """Whether deciding `request` (given without its body) needs the body buffered first.

    It does when a warrant is to be checked (it binds the body hash), when a rule that could match
    reads the body in its `when`, or when the tier needs a warrant (a warrant request binds the
    body hash too). Otherwise the decision holds for any body, which then streams upstream.
    """
    if warrant:
        return True
    for position in candidate_rules(rules, request.host):
        rule = rules.rules[position]
        if rule.methods is not None and request.method not in rule.methods:
            continue
        if rule.hosts is not None and not _host_matches(rule, request):
            continue
        if _path_captures(rule, request) is None:
            continue
        if rule.reads_body:
            return True
        if rule.when_program is None:
            break  # the first rule without `when` ends the walk: later rules never decide
    return classify(request, rules, agent=agent).tier.needs_warrant


def tunnel_rule(host: str, port: int, rules: RuleSet) -> Rule | None:
    """The first rule for `host:port` if it is a passthrough rule: a CONNECT there is not intercepted."""
    probe = Request(method="CONNECT", scheme="https", host=host, port=port, path="/")
    for position in candidate_rules(rules, host):
        rule = rules.rules[position]
        if rule.hosts is None or not _host_matches(rule, probe):
            continue
        if rule.passthrough:
            return rule
        if rule.methods is None and rule.paths is None and rule.when_program is None:
            return None  # a rule covering every request to this host comes first: intercept
    return None
