"""Request → intent and tier: host-indexed candidate rules, first match in document order wins."""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from policy.model import Intent, Request, Tier, highest_tier
from policy.rules import Rule, RuleSet
from policy.templates import render_target

_INTEGER = re.compile(r"^-?[0-9]{1,18}$")
_MAX_PARSED_BODY = 1 << 20
_WHEN_FAILURE_FLOOR = Tier.T2


@dataclass(frozen=True, slots=True, kw_only=True)
class Classification:
    intent: Intent
    tier: Tier
    rule: Rule | None
    reason_code: str
    reason: str


def candidate_rules(rules: RuleSet, host: str) -> Iterator[int]:
    """Positions of the rules that can match `host`, in document order, without scanning the rest."""
    lists: list[tuple[int, ...]] = []
    exact = rules.by_exact_host.get(host)
    if exact:
        lists.append(exact)
    suffix = host
    while (dot := suffix.find(".")) >= 0:
        suffix = suffix[dot + 1 :]
        wild = rules.by_wildcard_suffix.get(suffix)
        if wild:
            lists.append(wild)
    if rules.any_host:
        lists.append(rules.any_host)
    if len(lists) == 1:
        yield from lists[0]
        return
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


def cel_context(request: Request, agent: str) -> dict[str, Any]:
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    body_json: Any = None
    form: dict[str, str | int] = {}
    if request.body and len(request.body) <= _MAX_PARSED_BODY:
        if content_type == "application/json" or content_type.endswith("+json"):
            try:
                body_json = json.loads(request.body)
            except ValueError:
                body_json = None
        elif content_type == "application/x-www-form-urlencoded":
            form = _pairs_to_map(request.body.decode("utf-8", "replace"))
    headers: dict[str, str] = {}
    for key, value in request.headers:
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return {
        "request": {
            "method": request.method,
            "scheme": request.scheme,
            "host": request.host,
            "port": request.port,
            "path": request.path,
            "query": _pairs_to_map(request.query),
            "headers": headers,
            "json": body_json,
            "form": form,
        },
        "agent": {"id": agent},
    }


def classify(request: Request, rules: RuleSet, *, agent: str) -> Classification:
    context: dict[str, Any] | None = None
    positions = candidate_rules(rules, request.host)
    for position in positions:
        rule = rules.rules[position]
        if rule.methods is not None and request.method not in rule.methods:
            continue
        if not _host_matches(rule, request):
            continue
        captured = _path_captures(rule, request)
        if captured is None:
            continue
        if rule.when_program is not None:
            if context is None:
                context = cel_context(request, agent)
            try:
                outcome = rule.when_program.execute(context)
            except Exception as exc:  # any evaluation failure must fail closed, whatever its type
                return _when_failed(rule, request, captured, rules, agent, positions, str(exc))
            if outcome is not True:
                if outcome is not False:
                    return _when_failed(rule, request, captured, rules, agent, positions, "not a boolean")
                continue
        return Classification(
            intent=_intent(rule, request, captured),
            tier=rule.tier,
            rule=rule,
            reason_code="policy.rule",
            reason=f"matched rule {rule.id!r}",
        )
    return Classification(
        intent=Intent(action="unmatched", target=f"{request.host}{request.path}", rule=None),
        tier=rules.default_tier,
        rule=None,
        reason_code="policy.default_tier",
        reason="no rule matched; default_tier applies",
    )


def _when_failed(
    rule: Rule,
    request: Request,
    captured: dict[str, str],
    rules: RuleSet,
    agent: str,
    remaining: Iterator[int],
    why: str,
) -> Classification:
    # Fail closed: the rule counts as matching, at the highest of its own tier, whatever the
    # remaining rules would give, and T2 — an evaluation error never allows.
    rest = _classify_from(remaining, request, rules, agent)
    tier = highest_tier((rule.tier, rest, _WHEN_FAILURE_FLOOR))
    return Classification(
        intent=_intent(rule, request, captured),
        tier=tier,
        rule=rule,
        reason_code="policy.when_error",
        reason=f"rule {rule.id!r}: when could not be evaluated ({why[:200]}); failing closed at {tier}",
    )


def _classify_from(positions: Iterator[int], request: Request, rules: RuleSet, agent: str) -> Tier:
    remaining = list(positions)
    if not remaining:
        return rules.default_tier
    subset = RuleSet(
        version=rules.version,
        default_tier=rules.default_tier,
        rules=tuple(rules.rules[p] for p in remaining),
        revision=rules.revision,
        source=rules.source,
        by_exact_host={},
        by_wildcard_suffix={},
        any_host=tuple(range(len(remaining))),
        named_hosts=rules.named_hosts,
    )
    return classify(request, subset, agent=agent).tier


def _intent(rule: Rule, request: Request, captured: dict[str, str]) -> Intent:
    values = {
        "host": request.host,
        "port": str(request.port),
        "method": request.method,
        "path": request.path,
        "scheme": request.scheme,
        "query": request.query,
        **captured,
    }
    return Intent(action=rule.action, target=render_target(rule.target, values), rule=rule.id)
