"""Handlers in the policy (§13): validation with line-precise errors, params checked before anything
runs, templates filled one value at a time, the digest an execution warrant binds."""

from __future__ import annotations

import pytest

from policy.handlers import (
    ParamError,
    check_params,
    exec_argv,
    fill,
    fill_json,
    params_digest,
    sql_parameters,
)
from policy.rules import PolicyError, load_rules

BASE = """\
version: 1
default_tier: T3
rules:
  - id: restart
    match: {hosts: [x.example]}
    action: service.restart
    tier: T2
"""
GOOD = (
    BASE
    + """\
handlers:
  - id: restart-api
    action: service.restart
    params: {target: {pattern: "^[a-z0-9-]{1,40}$"}}
    exec: {argv: ["kubectl", "rollout", "restart", "deployment/{target}"], timeout: 60s}
  - id: open-ticket
    action: ticket.create
    params: {title: {max_length: 200}, kind: {enum: [bug, task]}}
    http: {method: POST, url: "https://tickets.example.com/api/issues?kind={kind}", json: {title: "{title}", labels: ["{kind}"]}}
  - id: orders-on-day
    action: report.orders
    params: {day: {pattern: "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}
    sql: {dsn_env: REPORTS_DSN, query: "SELECT count(*) AS n FROM orders WHERE day = :day AND note <> ':no' AND x::text = :day", timeout: 5s}
"""
)


def test_the_designs_example_loads_and_describes_itself() -> None:
    rules = load_rules(GOOD)
    restart = rules.handler("service.restart")
    assert restart is not None and restart.kind == "exec" and restart.exec is not None
    assert restart.exec.timeout == 60 and restart.exec.argv[0] == "kubectl"
    assert "no shell" in restart.describe()
    ticket = rules.handler("ticket.create")
    assert (
        ticket is not None
        and ticket.http is not None
        and ticket.http.json == {"title": "{title}", "labels": ["{kind}"]}
    )
    orders = rules.handler("report.orders")
    assert orders is not None and orders.sql is not None and orders.sql.write is False
    assert orders.sql.names == ("day",)  # ':no' inside a literal is text, '::text' a cast — and day once


@pytest.mark.parametrize(
    ("handler", "line", "message"),
    [
        (
            "  - {id: a, action: x.y, exec: {argv: ['{p}']}, params: {p: {pattern: 'a'}}}",
            10,
            "must be literal",
        ),
        ("  - {id: a, action: x.y, exec: {argv: [ls, '{q}']}}", 10, "{q} is not a declared param"),
        (
            "  - {id: a, action: x.y, exec: {argv: [ls, '{p}']}, params: {p: {}}}",
            10,
            "give it a pattern or an enum",
        ),
        ("  - {id: a, action: x.y, exec: {argv: [ls], timeout: 2h}}", 10, "not a duration"),
        (
            "  - {id: a, action: x.y, http: {url: 'https://{p}.example.com/'}, params: {p: {}}}",
            10,
            "must be literal",
        ),
        (
            "  - {id: a, action: x.y, sql: {dsn_env: D, query: 'select {p}'}, params: {p: {}}}",
            10,
            "use :name placeholders",
        ),
        (
            "  - {id: a, action: x.y, sql: {dsn_env: D, query: 'select :nope'}}",
            10,
            ":nope is not a declared param",
        ),
        (
            "  - {id: a, action: x.y, exec: {argv: [ls]}, http: {url: 'https://a.example/'}}",
            10,
            "exactly one of",
        ),
        (
            "  - {id: a, action: x.y, params: {p: {pattern: '('}}, exec: {argv: [ls]}}",
            10,
            "not a regular expression",
        ),
        ("  - {id: a, action: x.y, shell: true, exec: {argv: [ls]}}", 10, "unknown field"),
    ],
    ids=[
        "program",
        "undeclared",
        "unpatterned argv param",
        "timeout",
        "templated host",
        "sql template",
        "sql param",
        "two kinds",
        "bad regex",
        "unknown",
    ],
)
def test_bad_handlers_name_their_line(handler: str, line: int, message: str) -> None:
    with pytest.raises(PolicyError) as refused:
        load_rules(BASE + "handlers:\n" + "  # a comment line\n" + handler + "\n")
    text = str(refused.value)
    assert message in text and f":{line}:" in text, text


def test_two_handlers_for_one_action_are_refused() -> None:
    with pytest.raises(PolicyError, match="second handler"):
        load_rules(
            BASE
            + "handlers:\n  - {id: a, action: x.y, exec: {argv: [ls]}}\n  - {id: b, action: x.y, exec: {argv: [ls]}}\n"
        )


def _restart() -> object:
    handler = load_rules(GOOD).handler("service.restart")
    assert handler is not None
    return handler


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("api; rm -rf /", "params.pattern"),
        ("$(reboot)", "params.pattern"),
        ("api\nrm", "params.control"),
        ("api\x00", "params.control"),
        ("x" * 41, "params.pattern"),
    ],
)
def test_injection_through_params_is_refused_before_anything_runs(target: str, code: str) -> None:
    handler = load_rules(GOOD).handler("service.restart")
    assert handler is not None
    with pytest.raises(ParamError) as refused:
        check_params(handler, target, {})
    assert refused.value.code == code


def test_unknown_missing_enum_type_and_option_like_params() -> None:
    rules = load_rules(GOOD)
    ticket = rules.handler("ticket.create")
    assert ticket is not None
    for params, code in (
        ({"title": "t"}, "params.missing"),
        ({"title": "t", "kind": "bug", "extra": "x"}, "params.unknown"),
        ({"title": "t", "kind": "epic"}, "params.enum"),
        ({"title": ["t"], "kind": "bug"}, "params.type"),
        ({"title": "t" * 201, "kind": "bug"}, "params.too_long"),
    ):
        with pytest.raises(ParamError) as refused:
            check_params(ticket, "", params)
        assert refused.value.code == code, params
    echo = load_rules(
        BASE
        + "handlers:\n  - {id: e, action: x.y, params: {w: {pattern: '.*'}}, exec: {argv: [echo, '{w}']}}\n"
    ).handler("x.y")
    assert echo is not None
    with pytest.raises(ParamError) as option:
        check_params(echo, "", {"w": "--output=/etc/passwd"})
    assert option.value.code == "params.option_like"
    restart = rules.handler("service.restart")
    assert restart is not None
    with pytest.raises(ParamError) as conflict:
        check_params(restart, "api", {"target": "db"})
    assert conflict.value.code == "params.conflict"


def test_templates_fill_each_value_once_and_never_through_a_shell() -> None:
    rules = load_rules(GOOD)
    restart = rules.handler("service.restart")
    assert restart is not None
    values = check_params(restart, "api-1", {})
    assert exec_argv(restart, values) == ["kubectl", "rollout", "restart", "deployment/api-1"]
    assert fill("{a}-{b}", {"a": "{b}", "b": "x"}) == "{b}-x"  # a value's braces stay as they are
    assert fill_json({"t": ["{a}"], "n": 1}, {"a": "v"}) == {"t": ["v"], "n": 1}
    orders = rules.handler("report.orders")
    assert orders is not None
    assert sql_parameters(orders, check_params(orders, "", {"day": "2026-12-01"})) == {"day": "2026-12-01"}


def test_params_digest_is_canonical_and_binds_action_target_and_values() -> None:
    one = params_digest("a", "t", {"x": "1", "y": "2"})
    assert one == params_digest("a", "t", {"y": "2", "x": "1"})
    assert (
        len(
            {
                one,
                params_digest("b", "t", {"x": "1", "y": "2"}),
                params_digest("a", "u", {"x": "1", "y": "2"}),
                params_digest("a", "t", {"x": "1", "y": "3"}),
            }
        )
        == 4
    )


def test_sql_placeholders_skip_literals_comments_and_casts() -> None:
    from policy.handlers import sql_placeholders, sql_to_pyformat

    query = "SELECT ':a', \"col:b\", x::int -- :c\n/* :d */ FROM t WHERE y = :e AND z LIKE '50%' AND w = :e"
    assert [name for _, _, name in sql_placeholders(query)] == ["e", "e"]
    assert sql_to_pyformat(query).endswith("y = %(e)s AND z LIKE '50%%' AND w = %(e)s")


def test_an_option_cannot_be_assembled_from_two_params_nor_a_dot_segment_walk_the_url() -> None:
    rules = load_rules(
        BASE
        + "handlers:\n"
        + "  - {id: c, action: x.cat, params: {pre: {pattern: '.*'}, arg: {pattern: '.*'}}, exec: {argv: [cat, '{pre}{arg}']}}\n"
        + "  - {id: u, action: x.get, params: {id: {pattern: '[a-z.]+'}}, http: {url: 'https://a.example/v1/users/{id}/sessions'}}\n"
    )
    cat = rules.handler("x.cat")
    assert cat is not None
    for pre, arg in (("", "-rf"), ("-", "x"), ("", "@/etc/passwd")):
        with pytest.raises(ParamError) as refused:
            check_params(cat, "", {"pre": pre, "arg": arg})
        assert refused.value.code == "params.option_like"
    get = rules.handler("x.get")
    assert get is not None
    for value in ("..", "."):
        with pytest.raises(ParamError) as walked:
            check_params(get, "", {"id": value})
        assert walked.value.code == "params.dot_segment"
    assert check_params(get, "", {"id": "a.b"}) == {"id": "a.b"}


def test_url_params_need_a_pattern_and_sql_is_one_statement() -> None:
    with pytest.raises(PolicyError, match="goes into the URL"):
        load_rules(
            BASE
            + "handlers:\n  - {id: u, action: x.y, params: {p: {}}, http: {url: 'https://a.example/{p}'}}\n"
        )
    with pytest.raises(PolicyError, match="one statement only"):
        load_rules(
            BASE
            + "handlers:\n  - {id: q, action: x.y, sql: {dsn_env: D, query: 'SELECT 1; COMMIT; DELETE FROM t'}}\n"
        )


def test_a_target_the_handler_does_not_take_is_refused() -> None:
    ticket = load_rules(GOOD).handler("ticket.create")
    assert ticket is not None
    with pytest.raises(ParamError) as refused:
        check_params(ticket, "prod", {"title": "t", "kind": "bug"})
    assert refused.value.code == "params.target_unused"


def test_the_digest_keeps_types() -> None:
    assert params_digest("a", "", {"force": False}) != params_digest("a", "", {"force": "False"})
    assert params_digest("a", "", {"n": 1}) != params_digest("a", "", {"n": "1"})
    with pytest.raises(ValueError):
        params_digest("a", "", {"n": float("nan")})
