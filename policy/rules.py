"""The version-1 policy document: YAML text → a validated, indexed RuleSet; errors name file and line."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import cel

from policy.addresses import parse_ip
from policy.handlers import Handler, parse_handlers
from policy.model import Tier
from policy.normalize import AmbiguousRequest, normalize_host, normalize_method
from policy.templates import PathTemplate, TemplateError, check_target, compile_path
from policy.yaml_lines import LineMap, LineSeq, YamlProblem, load_yaml

SUPPORTED_VERSIONS = (1,)
# The longest a warrant of each tier may live; a rule's `warrant.ttl` can shorten it, never lengthen it.
WARRANT_TTL_CAPS: Mapping[Tier, int] = {Tier.T2: 15 * 60, Tier.T3: 5 * 60}
DEFAULT_TARGET = "{host}{path}"
_RULE_KEYS = frozenset(
    {
        "id",
        "match",
        "when",
        "action",
        "target",
        "tier",
        "limits",
        "warrant",
        "description",
        "websocket",
        "passthrough",
        "inject",
    }
)
_MATCH_KEYS = frozenset({"hosts", "methods", "paths", "mcp_tools"})
_TOP_KEYS = frozenset({"version", "default_tier", "rules", "description", "handlers"})
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_ACTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
_DURATION = re.compile(r"^([1-9][0-9]{0,6})(s|m|h)$")
_RATE = re.compile(r"^([1-9][0-9]{0,6})/(s|m|h)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
_BINDS = ("exact", "path", "host", "mcp")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
_SECRET_REF = re.compile(r"\{secret:([A-Za-z0-9][A-Za-z0-9._-]{0,127})\}")
_MCP_TEMPLATE = re.compile(r"\{(tool|arguments\.[A-Za-z_][A-Za-z0-9_-]*)\}")
# Headers a rule may never inject: they frame or route the request, or are the sidecar's own.
_NOT_INJECTABLE = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "vienna-warrant", "via"}
)
# CEL macros bind an iteration variable (`request.headers.exists(h, ...)`) that the binding's
# variables() lists alongside the free ones; those names are not unknown.
_CEL_MACRO_VARIABLE = re.compile(
    r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,"
)
CEL_REQUEST_FIELDS = frozenset(
    {"method", "scheme", "host", "port", "path", "query", "headers", "json", "form", "mcp"}
)
_BODY_INPUTS = frozenset({"json", "form", "mcp"})
_CEL_ROOT = re.compile(r"(?<![\w.])(request|agent)(?!\w)")
_CEL_FIELD = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy document: `file:line: field: message`."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class PolicyError(ValueError):
    """A document that fails validation; carries every issue found, not just the first."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPattern:
    """`api.github.com`, `api.github.com:8443` or `*.example.com` (any depth below, not the apex)."""

    host: str
    port: int | None
    wildcard: bool

    def covers(self, other: HostPattern) -> bool:
        if self.port is not None and self.port != other.port:
            return False
        if not self.wildcard:
            return not other.wildcard and self.host == other.host
        return (other.wildcard and other.host == self.host) or other.host.endswith("." + self.host)


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimit:
    count: int
    per_seconds: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WarrantPolicy:
    ttl_seconds: int | None = None
    max_uses: int = 1
    bind: str = "exact"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    id: str
    index: int
    line: int
    hosts: tuple[HostPattern, ...] | None
    methods: frozenset[str] | None
    paths: tuple[PathTemplate, ...] | None
    when: str | None
    when_program: Any = field(default=None, compare=False, repr=False)
    when_inputs: frozenset[str] | None = field(default=None, compare=False, repr=False)
    # keyed field → the keys the `when` reads (None: all of them); a key given twice is never guessed
    when_keys: Mapping[str, frozenset[str] | None] = field(default_factory=dict, compare=False, repr=False)
    action: str
    target: str
    tier: Tier
    limits: RateLimit | None = None
    warrant: WarrantPolicy = field(default_factory=WarrantPolicy)
    websocket: bool = False  # a WebSocket upgrade matching this rule is relayed
    passthrough: bool = False  # a CONNECT to a matching host:port is a raw tunnel, not intercepted
    # §14: matches a JSON-RPC tools/call (or a batch holding one) whose tool name fits a glob
    mcp_tools: tuple[str, ...] | None = None
    # §14: headers set on the forwarded request only, after the decision; `{secret:NAME}` templates
    inject_headers: tuple[tuple[str, str], ...] = ()

    @property
    def secret_names(self) -> frozenset[str]:
        return frozenset(name for _, value in self.inject_headers for name in _SECRET_REF.findall(value))

    @property
    def reads_body(self) -> bool:
        """Whether this rule's `when` reads the body (json/form), so the body must be buffered to decide."""
        if self.mcp_tools is not None:
            return True  # the tool name is in the body
        if self.when_program is None:
            return False
        return self.when_inputs is None or bool(self.when_inputs & _BODY_INPUTS)


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleSet:
    """Rules in document order plus the host index classification walks."""

    version: int
    default_tier: Tier
    rules: tuple[Rule, ...]
    revision: str
    source: str
    by_exact_host: Mapping[str, tuple[int, ...]]
    by_wildcard_suffix: Mapping[str, tuple[int, ...]]
    any_host: tuple[int, ...]
    named_hosts: frozenset[str]
    by_id: Mapping[str, Rule] = field(default_factory=dict)
    warnings: tuple[PolicyIssue, ...] = ()
    handlers: Mapping[str, Handler] = field(default_factory=dict)  # by action (Vienna Direct)

    @property
    def secret_names(self) -> frozenset[str]:
        """Every `{secret:NAME}` an inject of any rule uses (`policy check --secrets-dir` checks them)."""
        return frozenset().union(*(rule.secret_names for rule in self.rules))

    @property
    def has_mcp_rules(self) -> bool:
        return any(rule.mcp_tools is not None for rule in self.rules)

    def handler(self, action: str) -> Handler | None:
        return self.handlers.get(action)

    def rule(self, rule_id: str | None) -> Rule | None:
        return self.by_id.get(rule_id) if rule_id else None

    def rules_for_action(self, action: str) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.action == action)


class _Collector:
    def __init__(self, file: str) -> None:
        self.file = file
        self.issues: list[PolicyIssue] = []

    def add(self, line: int, path: str, message: str) -> None:
        self.issues.append(PolicyIssue(self.file, line, path, message))


def _key_line(node: Any, key: Any, fallback: int) -> int:
    if isinstance(node, LineMap):
        try:
            return node.key_lines[key]
        except (KeyError, TypeError):
            return fallback
    return fallback


def _item_line(node: Any, index: int, fallback: int) -> int:
    if isinstance(node, LineSeq):
        try:
            return node.item_lines[index]
        except IndexError:
            return fallback
    return fallback


def _node_line(node: Any, fallback: int) -> int:
    if isinstance(node, LineMap | LineSeq):
        return node.line
    return fallback


def parse_host_pattern(text: str) -> HostPattern:
    raw = text.strip()
    if raw != text or not raw:
        raise ValueError(f"{text!r} is not a host name")
    if "://" in raw or "/" in raw:
        bare = raw.split("://", 1)[-1].split("/", 1)[0]
        raise ValueError(f"{text!r} is a URL, not a host: write {bare!r} (paths go in match.paths)")
    port: int | None = None
    host = raw
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise ValueError(f"{text!r}: unclosed '['")
        host, rest = raw[1:close], raw[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: junk after ']'")
            port = _parse_port(rest[1:], text)
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
        port = _parse_port(port_text, text)
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    if "*" in host:
        raise ValueError(f"{text!r}: '*' is allowed only as a leading '*.' label")
    try:
        canonical = normalize_host(host)
    except AmbiguousRequest as exc:
        raise ValueError(f"{text!r}: {exc.reason}") from None
    if wildcard and "." not in canonical:
        raise ValueError(f"{text!r}: a wildcard needs at least two labels after '*.'")
    if wildcard and parse_ip(canonical) is not None:
        # `*.0.0.1` would be read as the wildcard `*.0.0.0.1` and silently match nothing.
        raise ValueError(f"{text!r}: a wildcard cannot cover IP addresses")
    return HostPattern(host=canonical, port=port, wildcard=wildcard)


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: port must be 1-65535")
    return int(text)


def parse_duration(text: object) -> int:
    match = _DURATION.fullmatch(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m or 1h")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_rate(text: object) -> RateLimit:
    match = _RATE.fullmatch(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a rate like 10/m")
    return RateLimit(count=int(match.group(1)), per_seconds=_UNIT_SECONDS[match.group(2)])


def load_rules(text: str, *, file: str = "policy.yaml") -> RuleSet:
    """Parse and validate a whole document. Raises PolicyError naming every problem."""
    issues = _Collector(file)
    try:
        document = load_yaml(text)
    except YamlProblem as exc:
        raise PolicyError([PolicyIssue(file, exc.line, "", f"invalid YAML: {exc.message}")]) from None
    except RecursionError:
        raise PolicyError([PolicyIssue(file, 1, "", "invalid YAML: nested too deeply")]) from None
    if not isinstance(document, LineMap):
        raise PolicyError([PolicyIssue(file, 1, "", "the document must be a mapping with version and rules")])

    for key in document:
        if key not in _TOP_KEYS:
            issues.add(_key_line(document, key, 1), str(key), "unknown field")
    version = document.get("version")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        issues.add(
            _key_line(document, "version", 1), "version", f"{version!r} is not a supported version (1)"
        )
    default_tier = Tier.T3
    if "default_tier" in document:
        try:
            default_tier = Tier.parse(str(document["default_tier"]))
        except ValueError as exc:
            issues.add(_key_line(document, "default_tier", 1), "default_tier", str(exc))
    raw_rules = document.get("rules")
    rules: list[Rule] = []
    if not isinstance(raw_rules, LineSeq):
        issues.add(_key_line(document, "rules", 1), "rules", "must be a list of rules")
    else:
        for index, raw in enumerate(raw_rules):
            rule = _parse_rule(raw, index, _item_line(raw_rules, index, 1), issues)
            if rule is not None:
                rules.append(rule)
    first_by_id: dict[str, Rule] = {}
    for rule in rules:
        first = first_by_id.setdefault(rule.id, rule)
        if first is not rule:
            # An error, not a lint warning: warrant terms, rate limits and audit records find a
            # rule again by its id, so two rules with one id would borrow each other's settings.
            issues.add(
                rule.line, f"rules[{rule.index}].id", f"duplicate id {rule.id!r} (first on line {first.line})"
            )
    handlers = parse_handlers(
        document.get("handlers"), _key_line(document, "handlers", 1), issues.add, _key_line, _item_line
    )
    if issues.issues:
        raise PolicyError(issues.issues)
    built = _build(rules, default_tier, text, file)
    return replace(built, handlers={handler.action: handler for handler in handlers}) if handlers else built


def _parse_rule(raw: Any, index: int, line: int, issues: _Collector) -> Rule | None:
    where = f"rules[{index}]"
    if not isinstance(raw, LineMap):
        issues.add(line, where, "must be a mapping")
        return None
    line = _node_line(raw, line)
    before = len(issues.issues)

    def at(key: str) -> int:
        return _key_line(raw, key, line)

    for key in raw:
        if key not in _RULE_KEYS:
            issues.add(at(key), f"{where}.{key}", "unknown field")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not _ID.fullmatch(rule_id):
        issues.add(
            at("id"), f"{where}.id", f"{rule_id!r} must be a name of letters, digits, '-', '_', '.', ':'"
        )
    action = raw.get("action")
    mcp_match = isinstance(raw.get("match"), LineMap) and "mcp_tools" in raw["match"]
    shown_action = _MCP_TEMPLATE.sub("x", action) if isinstance(action, str) and mcp_match else action
    if (
        not isinstance(action, str)
        or not isinstance(shown_action, str)
        or not _ACTION.fullmatch(shown_action)
    ):
        issues.add(at("action"), f"{where}.action", f"{action!r} must be a name like github.delete_repo")
    tier = Tier.T3
    if "tier" not in raw:
        issues.add(line, f"{where}.tier", "missing: write tier: T0, T1, T2, T3 or deny")
    else:
        try:
            tier = Tier.parse(str(raw.get("tier")))
        except ValueError as exc:
            issues.add(at("tier"), f"{where}.tier", str(exc))

    hosts, methods, paths = _parse_match(raw.get("match"), where, at("match"), issues)
    mcp_tools = _parse_mcp_tools(raw.get("match"), where, at("match"), issues)
    if mcp_tools is not None and methods is not None and methods != frozenset({"POST"}):
        issues.add(
            at("match"), f"{where}.match.methods", "an MCP tool call is a POST: give methods [POST] or none"
        )
    when, program = _parse_when(raw.get("when"), where, at("when"), issues)
    target = raw.get("target", DEFAULT_TARGET)
    if not isinstance(target, str) or not target:
        issues.add(at("target"), f"{where}.target", "must be a non-empty string")
        target = DEFAULT_TARGET
    elif paths is not None or "target" in raw:
        captured = set.intersection(*(set(p.variables) for p in paths)) if paths else set()
        if mcp_tools is not None:
            captured.add("tool")
        elif _MCP_TEMPLATE.search(target):
            issues.add(at("target"), f"{where}.target", "{tool} and {arguments.NAME} need match.mcp_tools")
        try:
            check_target(_MCP_TEMPLATE.sub("x", target) if mcp_tools is not None else target, captured)
        except TemplateError as exc:
            issues.add(at("target"), f"{where}.target", str(exc))
    limits = _parse_limits(raw.get("limits"), tier, where, at("limits"), issues)
    warrant = _parse_warrant(
        raw.get("warrant"), tier, where, at("warrant"), issues, mcp=mcp_tools is not None
    )
    inject = _parse_inject(raw.get("inject"), tier, where, at("inject"), issues)
    if inject and (hosts is None or any(pattern.wildcard for pattern in hosts)):
        issues.add(
            at("inject"),
            f"{where}.inject",
            "a credential goes only to hosts named exactly: give match.hosts without wildcards",
        )
    websocket = _parse_flag(raw, "websocket", where, at("websocket"), issues)
    passthrough = _parse_flag(raw, "passthrough", where, at("passthrough"), issues)
    if passthrough:
        _check_passthrough(raw, tier, methods, paths, when, where, at("passthrough"), issues)
        if inject:
            issues.add(
                at("inject"), f"{where}.inject", "a passthrough tunnel is not read: nothing can be injected"
            )
        if websocket:
            issues.add(
                at("websocket"), f"{where}.websocket", "a passthrough tunnel is not HTTP: no WebSocket"
            )
    if len(issues.issues) != before:
        return None
    return Rule(
        id=str(rule_id),
        index=index,
        line=line,
        hosts=hosts,
        methods=methods,
        paths=paths,
        when=when,
        when_program=program,
        when_inputs=None if when is None else cel_inputs(when),
        when_keys={} if when is None else cel_key_reads(when),
        action=str(action),
        target=target,
        tier=tier,
        limits=limits,
        warrant=warrant,
        websocket=websocket,
        passthrough=passthrough,
        mcp_tools=mcp_tools,
        inject_headers=inject,
    )


def _parse_mcp_tools(raw: Any, where: str, line: int, issues: _Collector) -> tuple[str, ...] | None:
    if not isinstance(raw, LineMap) or "mcp_tools" not in raw:
        return None
    value = raw["mcp_tools"]
    at = _key_line(raw, "mcp_tools", line)
    if not isinstance(value, LineSeq) or not value or not all(isinstance(v, str) and v for v in value):
        issues.add(
            at, f"{where}.match.mcp_tools", "must be a non-empty list of tool names or globs (* ? [..])"
        )
        return None
    return tuple(value)


def _parse_inject(
    raw: Any, tier: Tier, where: str, line: int, issues: _Collector
) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, LineMap) or set(raw) != {"headers"} or not isinstance(raw["headers"], LineMap):
        issues.add(
            line, f"{where}.inject", "must be {headers: {Name: value}} (values may hold {secret:NAME})"
        )
        return ()
    if tier is Tier.DENY:
        issues.add(line, f"{where}.inject", "a deny rule forwards nothing: nothing to inject into")
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in raw["headers"].items():
        at = _key_line(raw["headers"], name, line)
        path = f"{where}.inject.headers.{name}"
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name) or name.lower() in _NOT_INJECTABLE:
            issues.add(at, path, "not a header that can be injected")
            continue
        if name.lower() in seen:
            issues.add(at, path, "given twice")
            continue
        if not isinstance(value, str) or any(ch in value for ch in "\r\n\x00"):
            issues.add(at, path, "must be a one-line string")
            continue
        leftover = _SECRET_REF.sub("", value)
        if "{secret:" in leftover:
            issues.add(at, path, "a secret name is letters, digits, '.', '_' and '-': {secret:NAME}")
            continue
        seen.add(name.lower())
        headers.append((name, value))
    return tuple(headers)


def _parse_flag(raw: LineMap, key: str, where: str, line: int, issues: _Collector) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        issues.add(line, f"{where}.{key}", f"must be true or false, not {value!r}")
        return False
    return value


def _check_passthrough(
    raw: LineMap,
    tier: Tier,
    methods: frozenset[str] | None,
    paths: tuple[PathTemplate, ...] | None,
    when: str | None,
    where: str,
    line: int,
    issues: _Collector,
) -> None:
    """A tunnel is decided on host and port alone: nothing else about its content is visible."""
    if tier not in (Tier.T0, Tier.T1, Tier.DENY):
        issues.add(
            line,
            f"{where}.passthrough",
            f"a tunnel cannot carry a warrant: tier must be T0, T1 or deny, not {tier}",
        )
    match = raw.get("match")
    if not isinstance(match, LineMap) or "hosts" not in match:
        issues.add(line, f"{where}.passthrough", "a passthrough rule must name its hosts in match.hosts")
    if methods is not None or paths is not None:
        issues.add(
            line, f"{where}.passthrough", "a passthrough rule matches on hosts only (no methods or paths)"
        )
    if when is not None:
        issues.add(
            line, f"{where}.passthrough", "a passthrough rule cannot have a when: the tunnel is opaque"
        )
    if "limits" in raw:
        issues.add(line, f"{where}.passthrough", "a passthrough rule takes no rate limit")


def _parse_match(
    raw: Any, where: str, line: int, issues: _Collector
) -> tuple[tuple[HostPattern, ...] | None, frozenset[str] | None, tuple[PathTemplate, ...] | None]:
    if raw is None:
        return None, None, None
    if not isinstance(raw, LineMap):
        issues.add(line, f"{where}.match", "must be a mapping of hosts, methods, paths")
        return None, None, None
    for key in raw:
        if key not in _MATCH_KEYS:
            issues.add(_key_line(raw, key, line), f"{where}.match.{key}", "unknown field")

    def items(key: str) -> list[tuple[int, int, str]] | None:
        value = raw.get(key)
        if value is None:
            return None
        key_line = _key_line(raw, key, line)
        if not isinstance(value, LineSeq) or not value:
            issues.add(key_line, f"{where}.match.{key}", "must be a non-empty list")
            return None
        strings: list[tuple[int, int, str]] = []
        for i, item in enumerate(value):
            item_line = _item_line(value, i, key_line)
            if isinstance(item, str):
                strings.append((i, item_line, item))
            else:
                # YAML reads `1.10` as the number 1.1: a host written that way would silently change.
                issues.add(item_line, f"{where}.match.{key}[{i}]", f"{item!r} must be a string (quote it)")
        return strings

    hosts: list[HostPattern] | None = None
    if (host_items := items("hosts")) is not None:
        hosts = []
        for i, item_line, item in host_items:
            try:
                hosts.append(parse_host_pattern(item))
            except ValueError as exc:
                issues.add(item_line, f"{where}.match.hosts[{i}]", str(exc))
    methods: set[str] | None = None
    if (method_items := items("methods")) is not None:
        methods = set()
        for i, item_line, text in method_items:
            try:
                if normalize_method(text) != text:
                    raise AmbiguousRequest("request.bad_method", "")
                methods.add(text)
            except AmbiguousRequest:
                issues.add(
                    item_line, f"{where}.match.methods[{i}]", f"{text!r} must be an upper-case HTTP method"
                )
    paths: list[PathTemplate] | None = None
    if (path_items := items("paths")) is not None:
        paths = []
        for i, item_line, item in path_items:
            try:
                paths.append(compile_path(item))
            except TemplateError as exc:
                issues.add(item_line, f"{where}.match.paths[{i}]", str(exc))
    return (
        tuple(hosts) if hosts is not None else None,
        frozenset(methods) if methods is not None else None,
        tuple(paths) if paths is not None else None,
    )


def _parse_when(raw: Any, where: str, line: int, issues: _Collector) -> tuple[str | None, Any]:
    if raw is None:
        return None, None
    if not isinstance(raw, str) or not raw.strip():
        issues.add(line, f"{where}.when", "must be a CEL expression string")
        return None, None
    try:
        program = cel.compile(raw)
    except Exception as exc:  # the CEL binding raises ValueError, but any failure means "invalid"
        first = str(exc).splitlines()[0]
        issues.add(line, f"{where}.when", f"invalid CEL: {first}")
        return None, None
    bound = set(_CEL_MACRO_VARIABLE.findall(raw))
    unknown = {str(v).split(".")[0] for v in program.variables()} - {"request", "agent"} - bound
    if unknown:
        issues.add(
            line, f"{where}.when", f"unknown variable(s) {', '.join(sorted(unknown))}; use request or agent"
        )
    return raw, program


def cel_inputs(source: str) -> frozenset[str] | None:
    """The `request` fields (and `agent`) a `when` reads; None when its text does not tell.

    Handing CEL only these is what keeps evaluation cheap: the binding converts every value it is
    given. A mention of `request` other than `request.<field>` (indexing, iterating, passing it whole)
    means the whole context; a stray name in a string or comment only adds a field.
    """
    inputs: set[str] = set()
    for root in _CEL_ROOT.finditer(source):
        if root.group(1) == "agent":
            inputs.add("agent")
            continue
        member = _CEL_FIELD.match(source, root.end())
        if member is None or member.group(1) not in CEL_REQUEST_FIELDS:
            return None
        inputs.add(member.group(1))
    return frozenset(inputs)


_KEYED_FIELDS = ("query", "form", "headers", "json")
_KEY_READ = re.compile(
    r"""(?<![\w.])request\s*\.\s*(query|form|headers|json)(?:\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)|\s*\[\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*\])?"""
)


def cel_key_reads(source: str) -> dict[str, frozenset[str] | None]:
    """For each keyed `request` field (query, form, headers, json) a `when` mentions: the keys it reads
    (`request.form.amount`, `request.headers["x-env"]`), or None when it reads the map another way
    (`'a' in request.form`, `size(request.query)`, iterating) — then every key counts as read."""
    reads: dict[str, set[str] | None] = {}
    for found in _KEY_READ.finditer(source):
        field_name = found.group(1)
        key = found.group(2) or found.group(3) or found.group(4)
        if key is None:
            reads[field_name] = None
        elif reads.get(field_name, set()) is not None:
            known = reads.setdefault(field_name, set())
            assert known is not None
            known.add(key.lower() if field_name == "headers" else key)
    return {name: (None if keys is None else frozenset(keys)) for name, keys in reads.items()}


def _parse_limits(raw: Any, tier: Tier, where: str, line: int, issues: _Collector) -> RateLimit | None:
    if raw is None:
        return None
    if not isinstance(raw, LineMap) or set(raw) - {"rate"} or "rate" not in raw:
        issues.add(line, f"{where}.limits", "must be a mapping with rate, e.g. {rate: 10/m}")
        return None
    if tier is not Tier.T1:
        issues.add(line, f"{where}.limits", f"limits apply to T1 rules only, this rule is {tier}")
    try:
        return parse_rate(raw["rate"])
    except ValueError as exc:
        issues.add(_key_line(raw, "rate", line), f"{where}.limits.rate", str(exc))
        return None


def _parse_warrant(
    raw: Any, tier: Tier, where: str, line: int, issues: _Collector, *, mcp: bool = False
) -> WarrantPolicy:
    default_bind = "mcp" if mcp else "exact"  # §14: an MCP tool call binds the tool and its arguments
    if raw is None:
        return WarrantPolicy(bind=default_bind)
    if not isinstance(raw, LineMap):
        issues.add(line, f"{where}.warrant", "must be a mapping of ttl, max_uses, bind")
        return WarrantPolicy()
    if not tier.needs_warrant:
        issues.add(
            line, f"{where}.warrant", f"warrant settings apply to T2/T3 rules only, this rule is {tier}"
        )
    for key in raw:
        if key not in ("ttl", "max_uses", "bind"):
            issues.add(_key_line(raw, key, line), f"{where}.warrant.{key}", "unknown field")
    ttl: int | None = None
    if "ttl" in raw:
        try:
            ttl = parse_duration(raw["ttl"])
        except ValueError as exc:
            issues.add(_key_line(raw, "ttl", line), f"{where}.warrant.ttl", str(exc))
    max_uses = raw.get("max_uses", 1)
    if isinstance(max_uses, bool) or not isinstance(max_uses, int) or not 1 <= max_uses <= 1000:
        issues.add(_key_line(raw, "max_uses", line), f"{where}.warrant.max_uses", "must be an integer 1-1000")
        max_uses = 1
    bind = raw.get("bind", default_bind)
    if bind not in _BINDS:
        issues.add(
            _key_line(raw, "bind", line),
            f"{where}.warrant.bind",
            f"{bind!r} is not one of exact, path, host, mcp",
        )
        bind = default_bind
    elif bind == "mcp" and not mcp:
        issues.add(_key_line(raw, "bind", line), f"{where}.warrant.bind", "bind: mcp needs match.mcp_tools")
        bind = "exact"
    return WarrantPolicy(ttl_seconds=ttl, max_uses=max_uses, bind=str(bind))


def _build(rules: list[Rule], default_tier: Tier, text: str, file: str) -> RuleSet:
    exact: dict[str, list[int]] = {}
    suffix: dict[str, list[int]] = {}
    any_host: list[int] = []
    named: set[str] = set()
    for position, rule in enumerate(rules):
        if rule.hosts is None:
            any_host.append(position)
            continue
        for pattern in rule.hosts:
            bucket = suffix if pattern.wildcard else exact
            entries = bucket.setdefault(pattern.host, [])
            if not entries or entries[-1] != position:
                entries.append(position)
            # Only a rule that can let traffic through opens an internal host: naming a host in
            # a deny rule must not make it reachable for the requests that rule does not match.
            # A pattern with a port opens only that port (named as "host:port").
            if not pattern.wildcard and rule.tier is not Tier.DENY:
                named.add(pattern.host if pattern.port is None else f"{pattern.host}:{pattern.port}")
    return RuleSet(
        version=1,
        default_tier=default_tier,
        rules=tuple(rules),
        revision=hashlib.sha256(text.encode()).hexdigest(),
        source=file,
        by_exact_host={host: tuple(ids) for host, ids in exact.items()},
        by_wildcard_suffix={host: tuple(ids) for host, ids in suffix.items()},
        any_host=tuple(any_host),
        named_hosts=frozenset(named),
        by_id={rule.id: rule for rule in rules},  # ids are unique: load_rules refuses duplicates
        warnings=tuple(lint(rules, file)),
    )


def lint(rules: list[Rule] | tuple[Rule, ...], file: str = "policy.yaml") -> list[PolicyIssue]:
    """Rules that an earlier rule (without `when`) always matches first (duplicate ids are errors)."""
    warnings: list[PolicyIssue] = []
    # Only rules that could cover a rule's first host pattern are compared with it: comparing every
    # pair made loading a 10,000-rule policy take minutes.
    exact: dict[str, list[int]] = {}
    wildcard: dict[str, list[int]] = {}
    any_host: list[int] = []
    for position, rule in enumerate(rules):
        where = f"rules[{rule.index}]"
        for earlier_position in _possible_covers(rule, exact, wildcard, any_host):
            earlier = rules[earlier_position]
            if earlier.when is None and _covers(earlier, rule):
                warnings.append(
                    PolicyIssue(
                        file,
                        rule.line,
                        where,
                        f"rule {rule.id!r} is unreachable: rule {earlier.id!r} (line {earlier.line}) matches everything it matches",
                    )
                )
                break
        if rule.hosts is None:
            any_host.append(position)
        for pattern in rule.hosts or ():
            (wildcard if pattern.wildcard else exact).setdefault(pattern.host, []).append(position)
    for rule in rules:
        cap = WARRANT_TTL_CAPS.get(rule.tier)
        ttl = rule.warrant.ttl_seconds
        if cap is not None and ttl is not None and ttl > cap:
            warnings.append(
                PolicyIssue(
                    file,
                    rule.line,
                    f"{rule.id}.warrant.ttl",
                    f"{ttl}s is longer than the {cap // 60} min a {rule.tier} warrant may live; it is capped at {cap // 60} min",
                )
            )
    return warnings


def _possible_covers(
    rule: Rule, exact: Mapping[str, list[int]], wildcard: Mapping[str, list[int]], any_host: list[int]
) -> list[int]:
    """Positions of earlier rules that might cover `rule`, in document order: a cover of a rule
    covers its first host pattern, and only these patterns can."""
    positions = list(any_host)
    if rule.hosts is not None:
        first = rule.hosts[0]
        if first.wildcard:
            positions += wildcard.get(first.host, ())
        else:
            positions += exact.get(first.host, ())
        suffix = first.host
        while (dot := suffix.find(".")) >= 0:
            suffix = suffix[dot + 1 :]
            positions += wildcard.get(suffix, ())
    return sorted(set(positions))


def _covers(earlier: Rule, later: Rule) -> bool:
    if earlier.mcp_tools is not None:
        # An MCP rule matches only tool calls, and only by name: it covers a later rule only when
        # that one matches tool calls too, each of whose globs it lists (or "*").
        if later.mcp_tools is None:
            return False
        if "*" not in earlier.mcp_tools and not set(later.mcp_tools) <= set(earlier.mcp_tools):
            return False
    if earlier.hosts is not None:
        if later.hosts is None:
            return False
        if not all(any(mine.covers(theirs) for mine in earlier.hosts) for theirs in later.hosts):
            return False
    if earlier.methods is not None and (later.methods is None or not later.methods <= earlier.methods):
        return False
    if earlier.paths is not None:
        if later.paths is None:
            return False
        if not all(any(mine.covers(theirs) for mine in earlier.paths) for theirs in later.paths):
            return False
    return True
