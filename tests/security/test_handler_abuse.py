"""Attack family "handler abuse" (§13): what an agent can try through the params of a Vienna Direct
intent — shell syntax, newlines, options smuggled as values, SQL quotes — and what a handler must
never do — outlive its timeout, flood memory, reach what the policy forbids, run twice on one
warrant, run with params other than the approved ones. Real `vienna run`, real processes, real SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

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


def test_verify_takes_nothing_on_trust(direct: Sidecar) -> None:
    api = new_session()
    passback = intent(direct, "demo.unhandled", "prod", force=False).json()
    request_id = passback["warrant_request"]["id"]
    assert direct.approve(request_id, "alice").status_code == 200
    assert direct.approve(request_id, "bob").status_code == 200
    warrant = direct.get_request(request_id)["warrant"]

    def verify(**body: Any) -> requests.Response:
        return api.post(direct.api_url + "/v1/warrants/verify", json={"warrant": warrant, **body}, timeout=30)

    assert verify().status_code == 400  # no action: nothing to check the warrant against
    assert (
        verify(action="demo.unhandled", target="prod", params={"force": "False"}).json()["reason_code"]
        == "warrant.mismatch.params"
    )
    assert (
        verify(action="demo.unhandled", target="prod").json()["reason_code"] == "warrant.mismatch.params"
    )  # params omitted
    assert verify(action="demo.unhandled", target="prod", params={"force": False}).json()["valid"] is True
    assert (
        verify(action="demo.unhandled", target="prod", params={"force": False}, consume=True).json()[
            "consumed"
        ]
        is True
    )
    used = verify(action="demo.unhandled", target="prod", params={"force": False}).json()  # without consuming
    assert used["valid"] is False and used["reason_code"] == "warrant.replayed"
    # An execution warrant is for /v1/executions only.
    execution = intent(direct, "service.restart", "verify-me", reason="r").json()
    assert direct.approve(execution["warrant_request"]["id"], "alice").status_code == 200
    exec_warrant = direct.get_request(execution["warrant_request"]["id"])["warrant"]
    other = api.post(
        direct.api_url + "/v1/warrants/verify",
        json={"warrant": exec_warrant, "action": "service.restart", "target": "verify-me"},
        timeout=30,
    ).json()
    assert other["valid"] is False and other["reason_code"] == "warrant.not_verifiable"


def test_an_execution_warrant_is_single_use_whatever_the_rule_says(direct: Sidecar) -> None:
    import base64
    import json

    passback = intent(direct, "service.restart", "once", reason="r").json()  # the rule says max_uses: 5
    assert direct.approve(passback["warrant_request"]["id"], "alice").status_code == 200
    warrant = direct.get_request(passback["warrant_request"]["id"])["warrant"]
    con = json.loads(base64.urlsafe_b64decode(warrant.split(".")[1] + "=="))["con"]
    assert con["max_uses"] == 1 and con["body_sha256"] and con["query"] == "target=once"


def test_a_report_that_is_not_json_costs_no_use_and_is_refused(direct: Sidecar) -> None:
    passback = intent(direct, "demo.unhandled", "nan").json()
    request_id = passback["warrant_request"]["id"]
    assert (
        direct.approve(request_id, "alice").status_code == 200
        and direct.approve(request_id, "bob").status_code == 200
    )
    warrant = direct.get_request(request_id)["warrant"]
    api = new_session()
    refused = api.post(
        direct.api_url + "/v1/executions/report",
        data=b'{"warrant": "%s", "status": "succeeded", "result": {"x": NaN}}' % warrant.encode(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert refused.status_code == 400 and refused.json()["reason_code"] == "report.result"
    ok = api.post(
        direct.api_url + "/v1/executions/report",
        json={"warrant": warrant, "status": "succeeded", "result": {}},
        timeout=30,
    ).json()
    assert ok["valid"] is True  # the refused report did not use the warrant up
