"""A policy reload (parse, validate, lint) runs off the event loop: requests keep being answered meanwhile."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from tests.integration.harness import STANDARD_POLICY, Sidecar, Upstream, running_sidecar, unique


def _reloads(sidecar: Sidecar) -> float:
    text = sidecar.http.get(sidecar.api_url + "/metrics", timeout=10).text
    found = re.search(r'^vienna_policy_reloads_total\{result="success"\} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _big_policy(rules: int) -> str:
    lines = [STANDARD_POLICY.rstrip()]
    for i in range(rules):
        lines += [
            f"  - id: filler-{i}",
            f'    match: {{hosts: [h{i}.example.com], methods: [GET], paths: ["/a/{{x}}/b{i}"]}}',
            f"    action: filler.r{i}",
            "    tier: T1",
        ]
    return "\n".join(lines) + "\n"


def test_requests_sent_during_a_slow_reload_are_answered_before_it_ends(
    tmp_path: Path, upstream: Upstream
) -> None:
    with running_sidecar(tmp_path) as sidecar:
        assert sidecar.process is not None
        before = _reloads(sidecar)
        sidecar.policy_file.write_text(_big_policy(20_000))  # seconds of parsing on this machine
        sidecar.process.send_signal(signal.SIGHUP)
        answered_during = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            response = sidecar.request("GET", upstream.url("/" + unique("during-reload")))
            assert response.status_code == 200
            if _reloads(sidecar) > before:
                break
            answered_during += 1
        assert _reloads(sidecar) > before, "the reload finished"
        assert answered_during > 0, "requests were answered while the reload was running"
