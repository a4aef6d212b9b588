"""Vienna Direct handlers (DESIGN.md §13): their validation with line-precise errors, the checking
of an intent's params, and the filling of templates. Pure: nothing here runs anything.

A handler turns an approved (or T0/T1) intent into one concrete action: an argv (never a shell), an
HTTP request (sent through the sidecar's own enforcement), or a SQL statement with bound parameters.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from policy.yaml_lines import LineMap, LineSeq

MAX_OUTPUT_BYTES = 64 * 1024
MAX_PARAM_CHARS = 4096  # whatever max_length says: a pattern never runs over megabytes
_HANDLER_KEYS = frozenset({"id", "action", "params", "exec", "http", "sql", "description"})
_PARAM_KEYS = frozenset({"pattern", "max_length", "enum", "description"})
_EXEC_KEYS = frozenset({"argv", "timeout", "env"})
_HTTP_KEYS = frozenset({"method", "url", "headers", "json", "body", "timeout"})
_SQL_KEYS = frozenset({"dsn_env", "query", "timeout", "write", "max_rows"})
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_ACTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SQL_PARAM = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")
_DURATION = re.compile(r"^([1-9][0-9]{0,5})(ms|s|m)$")
_MAX_TIMEOUT = 3600.0
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class ParamSpec:
    name: str
    pattern: re.Pattern[str] | None = field(default=None, compare=False)
    pattern_source: str | None = None
    max_length: int | None = None
    enum: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ExecSpec:
    argv: tuple[str, ...]
    timeout: float
    env: tuple[str, ...]  # names passed through from the sidecar's environment; nothing else is


@dataclass(frozen=True, slots=True)
class HttpSpec:
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    json: Any  # a JSON structure whose strings may hold {param} templates, or None
    body: str | None
    timeout: float


@dataclass(frozen=True, slots=True)
class SqlSpec:
    dsn_env: str
    query: str
    timeout: float
    write: bool
    max_rows: int
    names: tuple[str, ...]  # the :name placeholders, in order of first use


@dataclass(frozen=True, slots=True)
class Handler:
    id: str
    action: str
    line: int
    params: Mapping[str, ParamSpec]
    kind: str  # "exec" | "http" | "sql"
    exec: ExecSpec | None = None
    http: HttpSpec | None = None
    sql: SqlSpec | None = None

    def describe(self) -> str:
        if self.exec is not None:
            return f"exec {list(self.exec.argv)} (timeout {self.exec.timeout:g}s, no shell)"
        if self.http is not None:
            return f"http {self.http.method} {self.http.url} (through the sidecar's enforcement)"
        assert self.sql is not None
        mode = "read-write" if self.sql.write else "read-only"
        return f"sql on ${self.sql.dsn_env}: {self.sql.query!r} ({mode}, at most {self.sql.max_rows} rows)"


class ParamError(ValueError):
    """Params an intent cannot run with: `code` is the reason code, the message says which and why."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --- loading (called from policy.rules with its issue collector) ---------------------------------


def parse_handlers(raw: Any, line: int, add: Any, key_line: Any, item_line: Any) -> list[Handler]:
    """`add(line, path, message)` records a problem; the helpers find a key's or an item's line."""
    if raw is None:
        return []
    if not isinstance(raw, LineSeq):
        add(line, "handlers", "must be a list of handlers")
        return []
    found: list[Handler] = []
    actions: dict[str, int] = {}
    ids: dict[str, int] = {}
    for index, item in enumerate(raw):
        at = item_line(raw, index, line)
        handler = _parse_handler(item, index, at, add, key_line)
        if handler is None:
            continue
        where = f"handlers[{index}]"
        if handler.action in actions:
            add(
                handler.line,
                f"{where}.action",
                f"a second handler for {handler.action!r} (first on line {actions[handler.action]})",
            )
            continue
        if handler.id in ids:
            add(handler.line, f"{where}.id", f"duplicate id {handler.id!r} (first on line {ids[handler.id]})")
            continue
        actions[handler.action] = handler.line
        ids[handler.id] = handler.line
        found.append(handler)
    return found


def _parse_handler(raw: Any, index: int, line: int, add: Any, key_line: Any) -> Handler | None:
    where = f"handlers[{index}]"
    if not isinstance(raw, LineMap):
        add(line, where, "must be a mapping with id, action, params and one of exec, http, sql")
        return None
    problems: list[int] = []

    def problem(at: int, path: str, message: str) -> None:
        problems.append(1)
        add(at, path, message)

    def at(key: str) -> int:
        return int(key_line(raw, key, line))

    for key in raw:
        if key not in _HANDLER_KEYS:
            problem(at(key), f"{where}.{key}", "unknown field")
    handler_id, action = raw.get("id"), raw.get("action")
    if not isinstance(handler_id, str) or not _ID.fullmatch(handler_id):
        problem(
            at("id"), f"{where}.id", f"{handler_id!r} must be a name of letters, digits, '-', '_', '.', ':'"
        )
    if not isinstance(action, str) or not _ACTION.fullmatch(action):
        problem(at("action"), f"{where}.action", f"{action!r} must be a name like service.restart")
    params = _parse_params(raw.get("params"), f"{where}.params", at("params"), problem, key_line)
    kinds = [kind for kind in ("exec", "http", "sql") if kind in raw]
    if len(kinds) != 1:
        problem(line, where, "needs exactly one of exec, http, sql")
        return None
    kind = kinds[0]
    spec: ExecSpec | HttpSpec | SqlSpec | None
    if kind == "exec":
        spec = _parse_exec(raw["exec"], f"{where}.exec", at("exec"), params, problem, key_line)
    elif kind == "http":
        spec = _parse_http(raw["http"], f"{where}.http", at("http"), params, problem, key_line)
    else:
        spec = _parse_sql(raw["sql"], f"{where}.sql", at("sql"), params, problem, key_line)
    if problems or spec is None:
        return None
    return Handler(
        id=str(handler_id),
        action=str(action),
        line=line,
        params=params,
        kind=kind,
        exec=spec if isinstance(spec, ExecSpec) else None,
        http=spec if isinstance(spec, HttpSpec) else None,
        sql=spec if isinstance(spec, SqlSpec) else None,
    )


def _parse_params(raw: Any, where: str, line: int, problem: Any, key_line: Any) -> dict[str, ParamSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, LineMap):
        problem(line, where, "must be a mapping of param name → {pattern, max_length, enum}")
        return {}
    found: dict[str, ParamSpec] = {}
    for name, spec in raw.items():
        at = int(key_line(raw, name, line))
        path = f"{where}.{name}"
        if not isinstance(name, str) or not _PARAM_NAME.fullmatch(name):
            problem(at, path, "a param name is letters, digits and '_'")
            continue
        if spec is None:
            spec = LineMap()
        if not isinstance(spec, LineMap):
            problem(at, path, "must be a mapping of pattern, max_length, enum")
            continue
        for key in spec:
            if key not in _PARAM_KEYS:
                problem(int(key_line(spec, key, at)), f"{path}.{key}", "unknown field")
        compiled: re.Pattern[str] | None = None
        source = spec.get("pattern")
        if source is not None:
            if not isinstance(source, str):
                problem(int(key_line(spec, "pattern", at)), f"{path}.pattern", "must be a string")
            else:
                try:
                    compiled = re.compile(source)
                except re.error as exc:
                    problem(
                        int(key_line(spec, "pattern", at)),
                        f"{path}.pattern",
                        f"not a regular expression: {exc}",
                    )
        max_length = spec.get("max_length")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= 65536
        ):
            problem(int(key_line(spec, "max_length", at)), f"{path}.max_length", "must be an integer 1-65536")
            max_length = None
        enum = spec.get("enum")
        if enum is not None and (
            not isinstance(enum, LineSeq) or not enum or not all(isinstance(v, str) for v in enum)
        ):
            problem(int(key_line(spec, "enum", at)), f"{path}.enum", "must be a non-empty list of strings")
            enum = None
        found[name] = ParamSpec(
            name=name,
            pattern=compiled,
            pattern_source=source if isinstance(source, str) else None,
            max_length=max_length,
            enum=tuple(enum) if enum is not None else None,
        )
    return found


def parse_timeout(value: object, default: float) -> float:
    if value is None:
        return default
    if not isinstance(value, str) or not (m := _DURATION.fullmatch(value)):
        raise ValueError(f"{value!r} is not a duration like 500ms, 30s or 2m")
    seconds = int(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)]
    if seconds > _MAX_TIMEOUT:
        raise ValueError(f"{value!r} is longer than {_MAX_TIMEOUT:g}s")
    return seconds


def _timeout(raw: LineMap, where: str, line: int, problem: Any, key_line: Any, default: float) -> float:
    try:
        return parse_timeout(raw.get("timeout"), default)
    except ValueError as exc:
        problem(int(key_line(raw, "timeout", line)), f"{where}.timeout", str(exc))
        return default


def _template_names(text: str) -> list[str]:
    return _VARIABLE.findall(text)


def _check_names(names: list[str], params: Mapping[str, ParamSpec], at: int, path: str, problem: Any) -> None:
    for name in names:
        if name not in params:
            problem(at, path, f"{{{name}}} is not a declared param (declare it under params)")


def _parse_exec(
    raw: Any, where: str, line: int, params: Mapping[str, ParamSpec], problem: Any, key_line: Any
) -> ExecSpec | None:
    if not isinstance(raw, LineMap):
        problem(line, where, "must be a mapping with argv (and timeout, env)")
        return None
    for key in raw:
        if key not in _EXEC_KEYS:
            problem(int(key_line(raw, key, line)), f"{where}.{key}", "unknown field")
    argv = raw.get("argv")
    at = int(key_line(raw, "argv", line))
    if not isinstance(argv, LineSeq) or not argv or not all(isinstance(a, str) for a in argv):
        problem(at, f"{where}.argv", "must be a non-empty list of strings")
        return None
    if _template_names(argv[0]):
        problem(at, f"{where}.argv[0]", "the program must be literal: a param never chooses what runs")
    used: set[str] = set()
    for position, item in enumerate(argv):
        names = _template_names(item)
        used.update(names)
        _check_names(names, params, at, f"{where}.argv[{position}]", problem)
    for name in sorted(used & set(params)):
        spec = params[name]
        if spec.pattern is None and spec.enum is None:
            problem(at, f"{where}.argv", f"param {name!r} goes into argv: give it a pattern or an enum")
    env = raw.get("env", LineSeq())
    if not isinstance(env, LineSeq) or not all(isinstance(e, str) and _ENV_NAME.fullmatch(e) for e in env):
        problem(
            int(key_line(raw, "env", line)), f"{where}.env", "must be a list of environment variable names"
        )
        env = LineSeq()
    return ExecSpec(
        argv=tuple(argv),
        timeout=_timeout(raw, where, line, problem, key_line, 30.0),
        env=tuple(env),
    )


def _json_template_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return _template_names(value)
    if isinstance(value, (LineMap, dict)):
        return [name for item in value.values() for name in _json_template_names(item)]
    if isinstance(value, (LineSeq, list)):
        return [name for item in value for name in _json_template_names(item)]
    return []


def _plain(value: Any) -> Any:
    if isinstance(value, (LineMap, dict)):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (LineSeq, list)):
        return [_plain(v) for v in value]
    return value


def _parse_http(
    raw: Any, where: str, line: int, params: Mapping[str, ParamSpec], problem: Any, key_line: Any
) -> HttpSpec | None:
    if not isinstance(raw, LineMap):
        problem(line, where, "must be a mapping with method and url (and headers, json or body, timeout)")
        return None
    for key in raw:
        if key not in _HTTP_KEYS:
            problem(int(key_line(raw, key, line)), f"{where}.{key}", "unknown field")
    method = raw.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in _METHODS:
        problem(int(key_line(raw, "method", line)), f"{where}.method", f"{method!r} is not an HTTP method")
        method = "GET"
    url = raw.get("url")
    at = int(key_line(raw, "url", line))
    if not isinstance(url, str):
        problem(at, f"{where}.url", "must be an http:// or https:// URL")
        return None
    parts = urlsplit(url.replace("{", "x").replace("}", "x"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problem(at, f"{where}.url", "must be an http:// or https:// URL")
    origin = url.split("://", 1)[-1].split("/", 1)[0]
    if _template_names(origin) or "{" in url.split("://", 1)[0]:
        problem(
            at,
            f"{where}.url",
            "scheme, host and port must be literal: a param never chooses where a request goes",
        )
    url_names = _template_names(url)
    _check_names(url_names, params, at, f"{where}.url", problem)
    for name in sorted(set(url_names) & set(params)):
        if params[name].pattern is None and params[name].enum is None:
            problem(at, f"{where}.url", f"param {name!r} goes into the URL: give it a pattern or an enum")
    headers_raw = raw.get("headers", LineMap())
    headers: list[tuple[str, str]] = []
    if not isinstance(headers_raw, LineMap) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers_raw.items()
    ):
        problem(
            int(key_line(raw, "headers", line)),
            f"{where}.headers",
            "must be a mapping of header name → string",
        )
    else:
        for name, value in headers_raw.items():
            _check_names(
                _template_names(value),
                params,
                int(key_line(headers_raw, name, line)),
                f"{where}.headers.{name}",
                problem,
            )
            headers.append((name, value))
    body = raw.get("body")
    json_value = raw.get("json")
    if body is not None and json_value is not None:
        problem(line, where, "give json or body, not both")
    if body is not None and not isinstance(body, str):
        problem(int(key_line(raw, "body", line)), f"{where}.body", "must be a string")
        body = None
    if isinstance(body, str):
        _check_names(
            _template_names(body), params, int(key_line(raw, "body", line)), f"{where}.body", problem
        )
    if json_value is not None:
        _check_names(
            _json_template_names(json_value),
            params,
            int(key_line(raw, "json", line)),
            f"{where}.json",
            problem,
        )
    return HttpSpec(
        method=str(method).upper(),
        url=url,
        headers=tuple(headers),
        json=_plain(json_value),
        body=body,
        timeout=_timeout(raw, where, line, problem, key_line, 30.0),
    )


def _parse_sql(
    raw: Any, where: str, line: int, params: Mapping[str, ParamSpec], problem: Any, key_line: Any
) -> SqlSpec | None:
    if not isinstance(raw, LineMap):
        problem(line, where, "must be a mapping with dsn_env and query (and timeout, write, max_rows)")
        return None
    for key in raw:
        if key not in _SQL_KEYS:
            problem(int(key_line(raw, key, line)), f"{where}.{key}", "unknown field")
    dsn_env, query = raw.get("dsn_env"), raw.get("query")
    if not isinstance(dsn_env, str) or not _ENV_NAME.fullmatch(dsn_env):
        problem(
            int(key_line(raw, "dsn_env", line)),
            f"{where}.dsn_env",
            "must name an environment variable holding the DSN",
        )
        return None
    at = int(key_line(raw, "query", line))
    if not isinstance(query, str) or not query.strip():
        problem(at, f"{where}.query", "must be a SQL statement")
        return None
    if _template_names(query):
        problem(at, f"{where}.query", "no {templates} in SQL: use :name placeholders, bound as parameters")
    if ";" in query.strip().rstrip(";"):
        problem(
            at,
            f"{where}.query",
            "one statement only: no ';' (a second one could leave the read-only transaction)",
        )
    names: list[str] = []
    for _, _, name in sql_placeholders(query):
        if name not in names:
            names.append(name)
        if name not in params:
            problem(at, f"{where}.query", f":{name} is not a declared param (declare it under params)")
    write = raw.get("write", False)
    if not isinstance(write, bool):
        problem(int(key_line(raw, "write", line)), f"{where}.write", "must be true or false")
        write = False
    max_rows = raw.get("max_rows", 1000)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= 100_000:
        problem(int(key_line(raw, "max_rows", line)), f"{where}.max_rows", "must be an integer 1-100000")
        max_rows = 1000
    return SqlSpec(
        dsn_env=dsn_env,
        query=query,
        timeout=_timeout(raw, where, line, problem, key_line, 5.0),
        write=write,
        max_rows=max_rows,
        names=tuple(names),
    )


# --- at run time: params, digests, templates ------------------------------------------------------


def sql_placeholders(query: str) -> list[tuple[int, int, str]]:
    """The `:name` placeholders of a statement as (start, end, name), outside quoted strings, quoted
    identifiers and comments; `::type` casts are not placeholders."""
    found: list[tuple[int, int, str]] = []
    i, n = 0, len(query)
    while i < n:
        ch = query[i]
        if ch in ("'", '"'):
            end = i + 1
            while end < n:
                if query[end] == ch:
                    if end + 1 < n and query[end + 1] == ch:  # '' or "" escapes the quote
                        end += 2
                        continue
                    break
                end += 1
            i = end + 1
        elif query.startswith("--", i):
            newline = query.find("\n", i)
            i = n if newline < 0 else newline + 1
        elif query.startswith("/*", i):
            close = query.find("*/", i + 2)
            i = n if close < 0 else close + 2
        elif ch == ":" and query.startswith("::", i):
            i += 2
        elif (
            ch == ":"
            and (m := _SQL_PARAM.match(query, i))
            and not (i and (query[i - 1].isalnum() or query[i - 1] == "_"))
        ):
            found.append((m.start(), m.end(), m.group(1)))
            i = m.end()
        else:
            i += 1
    return found


def sql_to_pyformat(query: str) -> str:
    """The statement for psycopg: `:name` → `%(name)s`, every other `%` doubled."""
    parts: list[str] = []
    last = 0
    for start, end, name in sql_placeholders(query):
        parts.append(query[last:start].replace("%", "%%"))
        parts.append(f"%({name})s")
        last = end
    parts.append(query[last:].replace("%", "%%"))
    return "".join(parts)


def check_params(handler: Handler, target: str, params: Mapping[str, Any]) -> dict[str, str]:
    """The intent's params, validated against the handler's declarations, as strings. `target` is
    the param `target` when the handler declares one. Raises ParamError; nothing may run then."""
    given: dict[str, Any] = dict(params)
    if "target" in handler.params:
        if "target" in given and given["target"] != target:
            raise ParamError("params.conflict", "params.target differs from the intent's target")
        given["target"] = target
    elif target:
        raise ParamError(
            "params.target_unused",
            f"the handler of {handler.action} takes no target: operators would see one that does not run",
        )
    unknown = sorted(set(given) - set(handler.params))
    if unknown:
        raise ParamError("params.unknown", f"unknown param(s) for {handler.action}: {', '.join(unknown)}")
    missing = sorted(set(handler.params) - set(given))
    if missing:
        raise ParamError("params.missing", f"missing param(s) for {handler.action}: {', '.join(missing)}")
    checked: dict[str, str] = {}
    for name, spec in handler.params.items():
        value = given[name]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ParamError("params.type", f"param {name!r} must be a string or a number")
        text = str(value)
        if len(text) > MAX_PARAM_CHARS:
            raise ParamError("params.too_long", f"param {name!r} is longer than {MAX_PARAM_CHARS} characters")
        if "\x00" in text or "\n" in text or "\r" in text:
            raise ParamError(
                "params.control", f"param {name!r} holds a control character (NUL or a line break)"
            )
        if spec.max_length is not None and len(text) > spec.max_length:
            raise ParamError("params.too_long", f"param {name!r} is longer than {spec.max_length} characters")
        if spec.enum is not None and text not in spec.enum:
            raise ParamError("params.enum", f"param {name!r} must be one of {', '.join(spec.enum)}")
        if spec.pattern is not None and not spec.pattern.fullmatch(text):
            raise ParamError("params.pattern", f"param {name!r} does not match {spec.pattern_source!r}")
        if handler.http is not None and text in (".", "..") and "{" + name + "}" in handler.http.url:
            raise ParamError(
                "params.dot_segment", f"param {name!r} is a dot segment: it would change the URL's path"
            )
        checked[name] = text
    if handler.exec is not None:
        _check_argv(handler, checked)
    return checked


def _check_argv(handler: Handler, values: Mapping[str, str]) -> None:
    """A filled argv item that starts with a template must not start like an option: `-x`, `--x`,
    or `@file` (response files of curl, gcc, javac …), whatever templates produced it."""
    assert handler.exec is not None
    for template in handler.exec.argv[1:]:
        if not template.startswith("{"):
            continue
        filled = fill(template, values)
        if filled.startswith(("-", "@")):
            names = ", ".join(repr(n) for n in _template_names(template))
            raise ParamError(
                "params.option_like",
                f"param {names} would start an argument with {filled[0]!r}: it would be read as an option",
            )


def params_digest(action: str, target: str, params: Mapping[str, Any]) -> str:
    """What an intent warrant binds: the action, the target and the params as typed (`false` is not
    `"False"`), canonical JSON. Raises ValueError for NaN or infinities (not JSON)."""
    text = json.dumps(
        {"action": action, "target": target, "params": dict(params)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fill(template: str, values: Mapping[str, str]) -> str:
    """Each {name} replaced by its value, once; a value's own braces are never expanded."""
    return _VARIABLE.sub(lambda m: values[m.group(1)], template)


def fill_json(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return fill(value, values)
    if isinstance(value, dict):
        return {k: fill_json(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_json(v, values) for v in value]
    return value


def exec_argv(handler: Handler, values: Mapping[str, str]) -> list[str]:
    assert handler.exec is not None
    return [fill(item, values) for item in handler.exec.argv]


def sql_parameters(handler: Handler, values: Mapping[str, str]) -> dict[str, str]:
    assert handler.sql is not None
    return {name: values[name] for name in handler.sql.names}
