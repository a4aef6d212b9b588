"""Attack family "handler abuse" (§13): what an agent can try through the params of a Vienna Direct
intent — shell syntax, newlines, options smuggled as values, SQL quotes — and what a handler must
never do — outlive its timeout, flood memory, reach what the policy forbids, run twice on one
warrant, run with params other than the approved ones. Real `vienna run`, real processes, real SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.direct_support import events, intent
from tests.integration.harness import Sidecar, Upstream, new_session


@pytest.mark.parametrize(
    "word",
    [
        "hello; rm -rf /",
        "$(touch /tmp/vienna-pwned)",
        "`id`",
        "a && b || c",
        "x > /etc/passwd",
        "'; DROP TABLE x; --",
        "%s%n%x",
    ],
)
def test_shell_syntax_in_a_param_is_one_argv_item(direct: Sidecar, word: str) -> None:
    body = intent(direct, "demo.echo", word=word).json()
    assert body["status"] == "succeeded" and body["result"]["stdout"] == word + "\n"
    assert not Path("/tmp/vienna-pwned").exists()


def test_sql_quotes_in_a_param_are_a_bound_value(direct: Sidecar) -> None:
    for day in ("2026-12-01' OR '1'='1", "x'; DELETE FROM orders; --", "2026-12-01\\' OR 1=1 --"):
        body = intent(direct, "report.orders", day=day).json()
        assert body["status"] == "succeeded" and body["result"]["rows"] == [], day
    assert len(intent(direct, "report.orders", day="2026-12-01").json()["result"]["rows"]) == 2


def test_a_handler_whose_http_target_the_policy_denies_reaches_nothing(
    direct: Sidecar, direct_upstream: Upstream
) -> None:
    denied = intent(direct, "http.metadata").json()
    assert denied["status"] == "failed" and denied["error"] == "http.refused_by_policy"


def test_a_replayed_execution_warrant_and_changed_params_are_refused(direct: Sidecar) -> None:
    passback = intent(direct, "service.restart", "web", reason="rollout").json()
    request_id = passback["warrant_request"]["id"]
    assert direct.approve(request_id, "alice").status_code == 200
    warrant = direct.get_request(request_id)["warrant"]
    api = new_session()
    for params in (
        {"target": "web", "reason": "rollout; rm -rf /"},
        {"target": "web", "reason": "rollout", "extra": "1"},
    ):
        changed = api.post(
            direct.api_url + "/v1/executions", json={"warrant": warrant, "params": params}, timeout=30
        )
        assert changed.status_code in (400, 403), changed.text
    assert (
        api.post(direct.api_url + "/v1/executions", json={"warrant": warrant}, timeout=30).json()["status"]
        == "succeeded"
    )
    replay = api.post(direct.api_url + "/v1/executions", json={"warrant": warrant}, timeout=30)
    assert replay.status_code == 403 and replay.json()["reason_code"] == "warrant.replayed"
    # A proxy warrant is not an execution warrant, and a made-up one is refused for what it is.
    forged = api.post(
        direct.api_url + "/v1/executions", json={"warrant": warrant[:-6] + "AAAAAA"}, timeout=30
    )
    assert forged.status_code == 403 and forged.json()["reason_code"] == "warrant.bad_signature"


def test_timeout_kills_the_process_group_and_output_is_bounded(direct: Sidecar) -> None:
    slow = intent(direct, "demo.slow").json()
    assert (
        slow["status"] == "failed"
        and slow["result"]["timed_out"] is True
        and slow["result"]["exit_code"] is None
    )
    child = int(slow["result"]["stderr"].strip())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    flood = intent(direct, "demo.flood").json()
    assert flood["status"] == "succeeded" and flood["result"]["stdout_truncated"] is True
    assert len(flood["result"]["stdout"]) == 64 * 1024


def test_bad_params_are_refused_before_anything_runs(direct: Sidecar) -> None:
    before = len(events(direct))
    for action, params, code in (
        ("demo.echo", {}, "params.missing"),
        ("demo.echo", {"word": "x", "extra": "y"}, "params.unknown"),
        ("demo.echo", {"word": "--help"}, "params.option_like"),
        ("demo.echo", {"word": "a\nb"}, "params.control"),
        ("http.fetch", {"item": "../admin"}, "params.pattern"),
    ):
        answer = intent(direct, action, **params)
        assert answer.status_code == 400 and answer.json()["reason_code"] == code, answer.text
    assert not [e for e in events(direct)[before:] if e.type == "execution"]
    denied = intent(direct, "db.drop")
    assert denied.status_code == 403 and denied.json()["error"] == "denied"
