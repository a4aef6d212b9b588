"""The control API and the operator command line against a live sidecar."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

from tests.integration.harness import (
    TOKENS,
    Sidecar,
    Upstream,
    assert_refused,
    clean_env,
    running_sidecar,
    unique,
)
from tests.vienna_process import VIENNA


def test_intent_for_a_t0_action_is_direct(sidecar: Sidecar) -> None:
    response = sidecar.api("POST", "/v1/intents", body={"action": "demo.read", "target": "anything"})
    assert response.status_code == 200
    body = response.json()
    assert (body["mode"], body["status"], body["tier"]) == ("direct", "allowed", "T0")
    assert body["intent"] == {"action": "demo.read", "target": "anything", "rule": "read"}
    assert body["execution_id"] is None  # §13: no handler runs demo.read, so nothing was executed


def test_intent_for_a_t3_action_is_a_passback_that_two_operators_can_approve(sidecar: Sidecar) -> None:
    target = "acme/" + unique("intent")
    intent = {"action": "demo.delete_repo", "target": target}
    first = sidecar.api("POST", "/v1/intents", body=intent)
    assert first.status_code == 200
    body = first.json()
    assert (body["mode"], body["status"], body["tier"]) == ("passback", "pending_approval", "T3")
    assert body["intent"] == {"action": "demo.delete_repo", "target": target, "rule": "delete-repo"}
    request = body["warrant_request"]
    assert (request["status"], request["approvals_required"]) == ("pending", 2)
    assert "warrant" not in body

    again = sidecar.api("POST", "/v1/intents", body=intent).json()
    assert again["warrant_request"]["id"] == request["id"]

    # Regression: the quorum vote on an intent without params.url used to answer 404 and stay pending.
    for who in ("alice", "bob"):
        vote = sidecar.approve(request["id"], who)
        assert vote.status_code == 200, vote.text
    assert sidecar.get_request(request["id"])["status"] == "approved"

    # Asking again answers with the approval and its warrant (the seed SDK's contract) ...
    answer = sidecar.api("POST", "/v1/intents", body=intent).json()
    assert (answer["mode"], answer["status"]) == ("passback", "approved")
    assert answer["warrant_request"]["id"] == request["id"]
    assert answer["warrant"] == sidecar.get_request(request["id"])["warrant"]
    assert answer["warrant_id"].startswith("wt_")
    # ... but a warrant bound to no HTTP request opens nothing on the data plane.
    claims = json.loads(base64.urlsafe_b64decode(answer["warrant"].split(".")[1] + "=="))
    assert claims["con"]["scheme"] == "intent"


def test_intent_naming_a_request_is_classified_and_its_warrant_works_on_the_proxy(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    path = "/items/" + unique("intent-url")
    url = upstream.url(path)
    intent = {"action": "write", "params": {"method": "PUT", "url": url, "body": "payload"}}
    response = sidecar.api("POST", "/v1/intents", body=intent)
    assert response.status_code == 200
    body = response.json()
    assert (body["mode"], body["tier"], body["intent"]["rule"]) == ("passback", "T2", "items-write")
    assert (body["instruction"]["method"], body["instruction"]["url"]) == ("PUT", url)
    assert body["constraints"]["method"] == "PUT"

    assert sidecar.approve(body["warrant_request"]["id"], "carol").status_code == 200
    approved = sidecar.api("POST", "/v1/intents", body=intent)
    assert approved.status_code == 200
    answer = approved.json()
    assert (answer["mode"], answer["status"]) == ("passback", "approved")
    assert answer["warrant_id"]

    forwarded = sidecar.request("PUT", url, data=b"payload", warrant=answer["warrant"])
    assert (forwarded.status_code, forwarded.headers["Vienna-Decision"]) == (200, "allow")
    assert len(upstream.seen(path)) == 1


def test_intent_for_a_deny_action_is_refused_403(sidecar: Sidecar) -> None:
    response = sidecar.api("POST", "/v1/intents", body={"action": "demo.forbidden", "target": "x"})
    body = assert_refused(response, 403, "denied", "policy.deny")
    assert "warrant_request" not in body


def test_intent_without_an_action_is_400(sidecar: Sidecar) -> None:
    response = sidecar.api("POST", "/v1/intents", body={"target": "x"})
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


def test_health_readiness_and_metrics_answer(sidecar: Sidecar) -> None:
    assert sidecar.api("GET", "/healthz").status_code == 200
    ready = sidecar.api("GET", "/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    metrics = sidecar.api("GET", "/metrics")
    assert metrics.status_code == 200
    assert "vienna_requests_total" in metrics.text


def test_ca_pem_is_a_certificate_and_nothing_more(sidecar: Sidecar) -> None:
    response = sidecar.api("GET", "/v1/ca.pem")
    assert response.status_code == 200
    text = response.text
    assert text.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in text


# --- vienna approvals ... -------------------------------------------------------------------------


def vienna(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VIENNA), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env({"VIENNA_TOKEN": token} if token else None),
        check=False,
    )


def test_cli_lists_approves_and_denies_pending_requests(sidecar: Sidecar, upstream: Upstream) -> None:
    to_approve = sidecar.request("PUT", upstream.url("/items/" + unique("cli-yes")), data=b"x").json()
    to_deny = sidecar.request("PUT", upstream.url("/items/" + unique("cli-no")), data=b"x").json()
    approve_id, deny_id = to_approve["warrant_request"]["id"], to_deny["warrant_request"]["id"]

    listed = vienna("approvals", "list", "--api", sidecar.api_url, "--token", TOKENS["alice"])
    assert listed.returncode == 0, listed.stderr
    assert "ID" in listed.stdout.splitlines()[0]
    assert approve_id in listed.stdout
    assert deny_id in listed.stdout

    approved = vienna(
        "approvals",
        "approve",
        approve_id,
        "--api",
        sidecar.api_url,
        "--justification",
        "ok",
        token=TOKENS["alice"],
    )
    assert approved.returncode == 0, approved.stderr
    assert "status approved" in approved.stdout
    assert "warrant" in sidecar.get_request(approve_id)

    denied = vienna("approvals", "deny", deny_id, "--api", sidecar.api_url, "--token", TOKENS["bob"])
    assert denied.returncode == 0, denied.stderr
    assert "status denied" in denied.stdout
    assert sidecar.get_request(deny_id)["status"] == "denied"

    after = vienna("approvals", "list", "--api", sidecar.api_url, "--token", TOKENS["alice"])
    assert approve_id not in after.stdout
    assert deny_id not in after.stdout


def test_cli_refusals_exit_nonzero(sidecar: Sidecar, upstream: Upstream) -> None:
    passback = sidecar.request("DELETE", upstream.url("/repos/acme/" + unique("cli"))).json()
    request_id = passback["warrant_request"]["id"]
    api = ("--api", sidecar.api_url)

    bad_token = vienna("approvals", "approve", request_id, *api, "--justification", "ok", "--token", "wrong")
    assert bad_token.returncode == 1
    assert "401" in bad_token.stderr

    missing_justification = vienna("approvals", "approve", request_id, *api, token=TOKENS["alice"])
    assert missing_justification.returncode == 1
    assert "400" in missing_justification.stderr

    assert (
        vienna(
            "approvals", "approve", request_id, *api, "--justification", "ok", token=TOKENS["alice"]
        ).returncode
        == 0
    )
    twice = vienna("approvals", "approve", request_id, *api, "--justification", "ok", token=TOKENS["alice"])
    assert twice.returncode == 1
    assert "409" in twice.stderr
    assert sidecar.get_request(request_id)["approvals"] == 1

    no_token = vienna("approvals", "list", *api)
    assert no_token.returncode == 2


def test_wrong_operator_tokens_are_throttled_per_client_and_audited(tmp_path: Path) -> None:

    with running_sidecar(tmp_path) as fresh:
        missing = fresh.api("GET", "/v1/warrant-requests?status=pending")
        assert (missing.status_code, missing.json()["reason"]) == (
            401,
            "an operator bearer token is required",
        )
        answers = [
            fresh.api("GET", "/v1/warrant-requests?status=pending", token=f"guess-{i}") for i in range(12)
        ]
        statuses = [answer.status_code for answer in answers]
        assert statuses[:9] == [401] * 9, statuses  # the missing one counted too: 10 failures allowed
        assert answers[0].json()["reason"] == "token not recognised"
        assert statuses[-1] == 429 and int(answers[-1].headers["Retry-After"]) >= 1
        assert answers[-1].json()["reason_code"] == "auth.throttled"
        # the right token still passes: an agent on the operators' address cannot lock them out
        assert fresh.api("GET", "/v1/warrant-requests", token=TOKENS["alice"]).status_code == 200
    events = [
        json.loads(line)
        for line in fresh.log_text().splitlines()
        if line.startswith("{") and '"authentication_failed"' in line
    ]
    assert len(events) >= 10 and {e["payload"]["reason_code"] for e in events} == {
        "auth.missing",
        "auth.unrecognised",
    }


def test_pending_requests_are_capped_per_agent_and_the_list_is_paged(
    tmp_path: Path, upstream: Upstream
) -> None:
    with running_sidecar(tmp_path, args=["--max-pending-requests", "3"]) as capped:
        marker = unique("cap")
        answers = [capped.request("DELETE", upstream.url(f"/repos/{marker}/r{i}")) for i in range(5)]
        assert [a.status_code for a in answers] == [403, 403, 403, 429, 429]
        assert answers[3].json()["reason_code"] == "warrant_request.limit"
        # the same request again reuses its pending request: not a new one, not refused
        assert capped.request("DELETE", upstream.url(f"/repos/{marker}/r0")).status_code == 403
        first = capped.api("GET", "/v1/warrant-requests?status=pending&limit=2", token=TOKENS["alice"])
        assert (len(first.json()), first.headers["X-Total-Count"]) == (2, "3")
        assert 'rel="next"' in first.headers["Link"]
        rest = capped.api(
            "GET", "/v1/warrant-requests?status=pending&limit=2&offset=2", token=TOKENS["alice"]
        )
        assert len(rest.json()) == 1 and "Link" not in rest.headers
        ids = {item["id"] for item in first.json() + rest.json()}
        assert len(ids) == 3
