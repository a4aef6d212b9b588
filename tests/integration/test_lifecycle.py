"""What survives a restart, what expires, and how the sidecar stops."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.harness import (
    STANDARD_POLICY,
    Sidecar,
    Upstream,
    assert_refused,
    clean_env,
    new_session,
    running_sidecar,
    unique,
)
from tests.vienna_process import VIENNA


@pytest.fixture(scope="module")
def restartable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """A sidecar of this module's own: its tests restart it."""
    with running_sidecar(tmp_path_factory.mktemp("restartable"), audit_stdout=False) as sidecar:
        yield sidecar


def test_warrant_used_before_a_restart_is_refused_as_a_replay_after_it(
    restartable: Sidecar, upstream: Upstream
) -> None:
    path = "/items/" + unique("restart-replay")
    warrant = restartable.obtain_warrant("PUT", upstream.url(path), data=b"x")
    assert restartable.request("PUT", upstream.url(path), data=b"x", warrant=warrant).status_code == 200

    restartable.restart()

    replay = restartable.request("PUT", upstream.url(path), data=b"x", warrant=warrant)
    assert_refused(replay, 403, "warrant_invalid", "warrant.replayed")
    assert len(upstream.seen(path)) == 1


def test_pending_request_and_unused_warrant_survive_a_restart(
    restartable: Sidecar, upstream: Upstream
) -> None:
    pending_path = "/items/" + unique("restart-pending")
    approved_path = "/items/" + unique("restart-approved")
    pending_id = restartable.request("PUT", upstream.url(pending_path), data=b"x").json()["warrant_request"][
        "id"
    ]
    warrant = restartable.obtain_warrant("PUT", upstream.url(approved_path), data=b"x")

    restartable.restart()

    again = restartable.request("PUT", upstream.url(pending_path), data=b"x")
    assert (
        assert_refused(again, 403, "warrant_required", "warrant.required")["warrant_request"]["id"]
        == pending_id
    )
    used = restartable.request("PUT", upstream.url(approved_path), data=b"x", warrant=warrant)
    assert (used.status_code, used.headers["Vienna-Decision"]) == (200, "allow")
    assert upstream.seen(pending_path) == []
    assert len(upstream.seen(approved_path)) == 1


def test_interception_ca_is_stable_across_a_restart(restartable: Sidecar) -> None:
    before = restartable.api("GET", "/v1/ca.pem")
    assert before.status_code == 200
    restartable.restart()
    after = restartable.api("GET", "/v1/ca.pem")
    assert after.status_code == 200
    assert after.content == before.content


def test_pending_request_expires_and_then_takes_no_votes(tmp_path: Path, upstream: Upstream) -> None:
    with running_sidecar(tmp_path, args=["--pending-ttl", "1"], audit_stdout=False) as sidecar:
        path = "/items/" + unique("expiry")
        passback = sidecar.request("PUT", upstream.url(path), data=b"x").json()
        request_id = passback["warrant_request"]["id"]
        assert passback["warrant_request"]["status"] == "pending"

        time.sleep(1.2)

        assert sidecar.get_request(request_id)["status"] == "expired"
        late = sidecar.approve(request_id, "alice")
        assert late.status_code == 409
        assert late.json()["reason_code"] == "approval.expired"
        assert "warrant" not in sidecar.get_request(request_id)

        again = sidecar.request("PUT", upstream.url(path), data=b"x")
        new_request = assert_refused(again, 403, "warrant_required", "warrant.required")["warrant_request"]
        assert (new_request["status"], new_request["id"] != request_id) == ("pending", True)
        assert upstream.seen(path) == []


def test_sigterm_exits_0_within_seconds_and_leaves_an_intact_audit_chain(
    tmp_path: Path, upstream: Upstream
) -> None:
    sidecar = Sidecar(tmp_path, audit_stdout=False)
    sidecar.start()
    try:
        assert sidecar.request("GET", upstream.url("/" + unique("before-stop"))).status_code == 200
        assert sidecar.request("DELETE", upstream.url("/repos/acme/" + unique("stop"))).status_code == 403
    finally:
        started = time.monotonic()
        returncode = sidecar.stop()
    assert returncode == 0, sidecar.log_text()[-3000:]
    assert time.monotonic() - started < 5

    verified = subprocess.run(
        [str(VIENNA), "audit", "verify", str(sidecar.data_dir / "audit.db")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("ok:")


def test_audit_chain_of_the_shared_sidecar_verifies_while_it_runs(
    sidecar: Sidecar, upstream: Upstream
) -> None:
    assert sidecar.request("GET", upstream.url("/" + unique("chain"))).status_code == 200
    verified = subprocess.run(
        [str(VIENNA), "audit", "verify", str(sidecar.data_dir / "audit.db")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("ok:")


def test_sigterm_lets_an_in_flight_request_finish(tmp_path: Path, upstream: Upstream) -> None:
    sidecar = Sidecar(tmp_path, audit_stdout=False)
    sidecar.start()
    answers: list[requests.Response | BaseException] = []
    marker = unique("drain")

    def slow_request() -> None:
        with new_session(sidecar.proxy_url) as session:
            try:
                answers.append(session.get(upstream.url(f"/slow?seconds=1&marker={marker}"), timeout=20))
            except requests.RequestException as exc:
                answers.append(exc)

    client = threading.Thread(target=slow_request)
    client.start()
    deadline = time.monotonic() + 5
    while not any(marker in seen.query for seen in upstream.seen("/slow")) and time.monotonic() < deadline:
        time.sleep(0.02)
    returncode = sidecar.stop()
    client.join(20)

    assert returncode == 0
    [answer] = answers
    assert isinstance(answer, requests.Response), answer
    assert (answer.status_code, answer.headers["Vienna-Decision"]) == (200, "allow")


def _reloads(sidecar: Sidecar, result: str) -> float:
    for line in sidecar.api("GET", "/metrics").text.splitlines():
        if line.startswith(f'vienna_policy_reloads_total{{result="{result}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_policy_reload_applies_a_good_file_and_keeps_the_last_good_one_on_a_bad_file(
    tmp_path: Path, upstream: Upstream
) -> None:
    with running_sidecar(tmp_path, audit_stdout=False) as sidecar:
        path = "/reloaded/" + unique("reload")
        assert sidecar.request("GET", upstream.url(path)).status_code == 200
        first_revision = sidecar.api("GET", "/readyz").json()["policy_revision"]

        # a new first rule: reads under /reloaded/ are now never allowed
        sidecar.policy_file.write_text(
            STANDARD_POLICY.replace(
                "rules:\n",
                'rules:\n  - id: reloaded\n    match: {hosts: ["127.0.0.1"], paths: ["/reloaded/**"]}\n'
                "    action: demo.reloaded\n    tier: deny\n",
                1,
            )
        )
        assert sidecar.process is not None
        sidecar.process.send_signal(signal.SIGHUP)
        _wait_for(lambda: sidecar.api("GET", "/readyz").json()["policy_revision"] != first_revision)
        assert_refused(sidecar.request("GET", upstream.url(path)), 403, "denied", "policy.deny")
        good_revision = sidecar.api("GET", "/readyz").json()["policy_revision"]

        errors_before = _reloads(sidecar, "error")
        sidecar.policy_file.write_text("version: 1\nrules:\n  - id: broken\n    tier: T9\n")
        sidecar.process.send_signal(signal.SIGHUP)
        _wait_for(lambda: _reloads(sidecar, "error") > errors_before)
        assert sidecar.api("GET", "/readyz").json()["policy_revision"] == good_revision
        assert_refused(sidecar.request("GET", upstream.url(path)), 403, "denied", "policy.deny")
        assert sidecar.request("GET", upstream.url("/" + unique("still-read"))).status_code == 200
