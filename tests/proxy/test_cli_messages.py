"""What a newcomer reads when something is wrong: each message says what and what to write instead."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.vienna_process import VIENNA, clean_environment


def _vienna(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VIENNA), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=clean_environment(),
        check=False,
    )


def test_version(tmp_path: Path) -> None:
    result = _vienna("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("vienna ")


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    result = _vienna("run", "--policy", "missing.yaml", "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert result.returncode == 1
    assert "missing.yaml: no such file" in result.stderr and "Errno" not in result.stderr


def test_audit_verify_on_a_directory_says_which_file_to_give(tmp_path: Path) -> None:
    result = _vienna("audit", "verify", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "is a directory" in result.stderr and "audit.db" in result.stderr


def test_policy_mistakes_say_what_to_write(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        'version: 1\nrules:\n  - id: a\n    match: {hosts: ["https://api.example.com/v1"]}\n    action: a.b\n'
    )
    result = _vienna("policy", "check", str(policy), cwd=tmp_path)
    assert result.returncode == 1
    assert "rules[0].tier: missing: write tier: T0, T1, T2, T3 or deny" in result.stderr
    assert "is a URL, not a host: write 'api.example.com'" in result.stderr


def test_a_ttl_over_the_tier_cap_is_a_warning(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - id: a\n    match: {hosts: [x.example]}\n    action: a.b\n    tier: T3\n"
        "    warrant: {ttl: 1h}\n"
    )
    result = _vienna("policy", "check", str(policy), cwd=tmp_path)
    assert result.returncode == 0
    assert "capped at 5 min" in result.stdout + result.stderr


def test_a_proxy_port_in_use_names_our_flag_not_mitmproxys(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            api = spare.getsockname()[1]
        result = _vienna(
            "run", "--listen", f"127.0.0.1:{port}", "--api", f"127.0.0.1:{api}", "--data-dir", str(tmp_path / "d"),
            cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode != 0
    assert "--listen HOST:PORT" in result.stderr
    assert "--mode regular@" not in result.stderr


def test_explain_resolves_the_name_and_agrees_with_the_proxy(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - id: read\n    match: {methods: [GET]}\n    action: a.read\n    tier: T0\n"
    )
    result = _vienna("policy", "explain", str(policy), "GET", "http://localhost:8000/x", cwd=tmp_path)
    assert result.returncode == 0
    assert "destination.internal" in result.stdout and "127.0.0.1" in result.stdout


def test_two_sidecars_cannot_share_one_data_dir(tmp_path: Path) -> None:
    import fcntl
    import os

    data = tmp_path / "d"
    data.mkdir()
    fd = os.open(data / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sidecar holds it
        ports = []
        for _ in range(2):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                ports.append(probe.getsockname()[1])
        result = _vienna(
            "run", "--data-dir", str(data), "--listen", f"127.0.0.1:{ports[0]}", "--api", f"127.0.0.1:{ports[1]}",
            cwd=tmp_path,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert "is in use by another vienna process" in result.stderr
