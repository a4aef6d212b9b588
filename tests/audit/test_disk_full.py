"""A data dir on a small tmpfs that fills up: every request gets 503 audit.full, nothing forwarded
is missing from the audit, and the sidecar serves again once there is room."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.support import Sidecar, Upstream, events, run_vienna

SIZE = "24m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> None:
    """Write zeros until the file system is full (down to the last 4 KiB block)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def test_a_full_disk_refuses_every_request_with_audit_full_and_loses_nothing(
    small_disk: Path, upstream: Upstream
) -> None:
    sidecar = Sidecar(small_disk / "work", args=["--audit-stdout", "false"]).start()
    forwarded: list[str] = []
    try:
        for index in range(20):
            response = sidecar.request("GET", upstream.url(f"/disk/before/{index}"))
            assert response.status_code == 200
            forwarded.append(response.headers["Vienna-Decision-Id"])
        sent_before = len(upstream.seen())
        _fill(small_disk / "filler")

        # SQLite's own "disk is full" or the keeper's free-space floor, whichever comes first
        answers = [sidecar.request("GET", upstream.url(f"/disk/full/{index}")) for index in range(10)]
        for answer in answers:
            if answer.status_code == 200:
                forwarded.append(answer.headers["Vienna-Decision-Id"])
        refused = [a for a in answers if a.status_code != 200]
        assert refused, "a full disk never refused a request"
        time.sleep(1.5)  # the keeper has looked at the disk by now
        later = [
            sidecar.request("GET", upstream.url("/disk/full/later")),
            sidecar.request("DELETE", upstream.url("/repos/acme/widgets")),
            sidecar.request("GET", upstream.url("/forbidden/x")),
        ]
        for answer in [*refused, *later]:
            assert answer.status_code == 503, answer.text
            assert answer.json()["reason_code"] == "audit.full", answer.text
        ready = sidecar.http.get(sidecar.api_url + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["reason_code"] == "audit.full"
        assert sidecar.metrics().value("vienna_audit_full") == 1
        went_out = [path for _, path in upstream.seen()[sent_before:]]
        assert "/disk/full/later" not in went_out

        (small_disk / "filler").unlink()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sidecar.http.get(sidecar.api_url + "/readyz", timeout=5).status_code == 200:
                break
            time.sleep(0.2)
        again = sidecar.request("GET", upstream.url("/disk/after"))
        assert again.status_code == 200, again.text
        forwarded.append(again.headers["Vienna-Decision-Id"])
    finally:
        code = sidecar.stop()
        assert code == 0, sidecar.stderr_text()[-3000:]
    recorded = {str(e.payload["decision_id"]) for e in events(sidecar.db) if e.type == "decision"}
    assert set(forwarded) <= recorded  # every forwarded request has its decision
    verify = run_vienna("audit", "verify", str(sidecar.db))
    assert verify.returncode == 0, verify.stdout
