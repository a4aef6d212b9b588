"""Policy hot reload: file watcher, SIGHUP, Kubernetes ConfigMap symlink swaps, and bad files."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import requests

from tests.audit.support import DELETE_IS_T0, POLICY, Sidecar, Upstream, events, wait_until

OLD_REVISION = hashlib.sha256(POLICY.encode()).hexdigest()
NEW_REVISION = hashlib.sha256(DELETE_IS_T0.encode()).hexdigest()
RELOAD_WITHIN = 3.0  # the watcher polls every second


def _delete(sidecar: Sidecar, upstream: Upstream) -> requests.Response:
    return sidecar.request("DELETE", upstream.url("/repos/acme/reloaded"))


def _assert_t3(response: requests.Response) -> None:
    assert response.status_code == 403
    body = response.json()
    assert (body["error"], body["tier"], body["policy_revision"]) == ("warrant_required", "T3", OLD_REVISION)


def _assert_t0(response: requests.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["Vienna-Decision"] == "allow"


def _reloads(sidecar: Sidecar, result: str) -> float:
    return sidecar.metrics().value("vienna_policy_reloads_total", result=result)


def _revision_is(sidecar: Sidecar, revision: str) -> bool:
    return bool(sidecar.readyz()["policy_revision"] == revision)


def test_a_valid_change_is_picked_up_counted_and_audited(tmp_path: Path, upstream: Upstream) -> None:
    sidecar = Sidecar(tmp_path).start()
    try:
        before = _delete(sidecar, upstream)
        _assert_t3(before)
        assert sidecar.readyz()["policy_revision"] == OLD_REVISION
        assert (_reloads(sidecar, "success"), _reloads(sidecar, "error")) == (1, 0)

        written = time.monotonic()
        sidecar.policy_file.write_text(DELETE_IS_T0)
        assert wait_until(lambda: _revision_is(sidecar, NEW_REVISION), RELOAD_WITHIN)
        assert time.monotonic() - written < RELOAD_WITHIN
        after = _delete(sidecar, upstream)
        _assert_t0(after)
        metrics = sidecar.metrics()
        assert metrics.value("vienna_policy_reloads_total", result="success") == 2
        assert metrics.value("vienna_policy_reloads_total", result="error") == 0
        assert metrics.value("vienna_policy_rules") == 3
        ready = sidecar.readyz()
        assert (ready["status"], ready["policy_rules"]) == ("ready", 3)
    finally:
        assert sidecar.stop() == 0

    stored = events(sidecar.db)
    decisions = {event.payload["decision_id"]: event for event in stored if event.type == "decision"}
    old = decisions[before.headers["Vienna-Decision-Id"]]
    new = decisions[after.headers["Vienna-Decision-Id"]]
    assert (old.policy_revision, old.payload["tier"]) == (OLD_REVISION, "T3")
    assert (new.policy_revision, new.payload["tier"]) == (NEW_REVISION, "T0")
    [reloaded] = [event for event in stored if event.type == "policy"]
    assert reloaded.policy_revision == NEW_REVISION
    assert reloaded.payload == {"event": "reloaded", "previous_revision": OLD_REVISION, "rules": 3}
    assert old.seq < reloaded.seq < new.seq


def test_a_bad_file_keeps_the_last_good_policy(tmp_path: Path, upstream: Upstream) -> None:
    sidecar = Sidecar(tmp_path).start()
    try:
        sidecar.policy_file.write_text("version: 1\nrules: [\n")  # not YAML
        assert wait_until(lambda: _reloads(sidecar, "error") == 1, RELOAD_WITHIN)
        _assert_t3(_delete(sidecar, upstream))
        assert sidecar.readyz()["policy_revision"] == OLD_REVISION

        sidecar.policy_file.write_text(POLICY.replace("tier: T0", "tier: T9"))  # YAML, not a policy
        assert wait_until(lambda: _reloads(sidecar, "error") == 2, RELOAD_WITHIN)
        _assert_t3(_delete(sidecar, upstream))
        assert sidecar.request("GET", upstream.url("/still/read")).status_code == 200
        ready = sidecar.readyz()
        assert (ready["status"], ready["policy_revision"]) == ("ready", OLD_REVISION)
        assert _reloads(sidecar, "success") == 1

        sidecar.policy_file.unlink()  # a missing file is not a policy either; nothing changes
        time.sleep(1.3)
        _assert_t3(_delete(sidecar, upstream))

        sidecar.policy_file.write_text(DELETE_IS_T0)  # and a good file afterwards still loads
        assert wait_until(lambda: _revision_is(sidecar, NEW_REVISION), RELOAD_WITHIN)
        _assert_t0(_delete(sidecar, upstream))
        assert _reloads(sidecar, "success") == 2
    finally:
        assert sidecar.stop() == 0
    stderr = sidecar.stderr_text()
    assert stderr.count("policy reload failed, keeping revision") >= 2
    assert f"keeping revision {OLD_REVISION[:12]}" in stderr


def test_sighup_reloads(tmp_path: Path, upstream: Upstream) -> None:
    sidecar = Sidecar(tmp_path).start()
    try:
        # Same size, same mtime, same path: invisible to the watcher, so only SIGHUP can load it.
        policy = sidecar.policy_file
        info = policy.stat()
        staged = policy.with_name("policy.yaml.new")
        staged.write_text(DELETE_IS_T0)
        os.utime(staged, ns=(info.st_atime_ns, info.st_mtime_ns))
        staged.replace(policy)
        assert policy.stat().st_size == info.st_size
        time.sleep(1.5)
        _assert_t3(_delete(sidecar, upstream))
        assert _revision_is(sidecar, OLD_REVISION)

        sidecar.signal(signal.SIGHUP)
        assert wait_until(lambda: _revision_is(sidecar, NEW_REVISION), 2.0)
        _assert_t0(_delete(sidecar, upstream))
        assert (_reloads(sidecar, "success"), _reloads(sidecar, "error")) == (2, 0)

        sidecar.signal(signal.SIGHUP)  # nothing changed: no reload is counted, the sidecar stays up
        time.sleep(0.3)
        assert _reloads(sidecar, "success") == 2
        assert sidecar.readyz()["status"] == "ready"
    finally:
        assert sidecar.stop() == 0


def test_a_configmap_symlink_swap_reloads(tmp_path: Path, upstream: Upstream) -> None:
    """The kubelet's layout: policy.yaml -> ..data/policy.yaml, ..data -> ..<timestamp>/, swapped atomically."""
    mount = tmp_path / "config"
    first = mount / "..2026_11_26_12_00_00.000000001"
    first.mkdir(parents=True)
    (first / "policy.yaml").write_text(POLICY)
    (mount / "..data").symlink_to(first.name)
    (mount / "policy.yaml").symlink_to("..data/policy.yaml")
    sidecar = Sidecar(tmp_path / "sidecar", policy_file=mount / "policy.yaml").start()
    try:
        _assert_t3(_delete(sidecar, upstream))

        second = mount / "..2026_11_26_12_05_00.000000002"
        second.mkdir()
        (second / "policy.yaml").write_text(DELETE_IS_T0)
        (mount / "..data_tmp").symlink_to(second.name)
        (mount / "..data_tmp").replace(mount / "..data")  # rename(2): the atomic swap
        (first / "policy.yaml").unlink()
        first.rmdir()

        assert wait_until(lambda: _revision_is(sidecar, NEW_REVISION), RELOAD_WITHIN)
        _assert_t0(_delete(sidecar, upstream))
        assert (_reloads(sidecar, "success"), _reloads(sidecar, "error")) == (2, 0)
    finally:
        assert sidecar.stop() == 0
