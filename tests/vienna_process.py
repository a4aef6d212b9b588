"""What every test that starts a real `vienna run` shares: the command line and a clean environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

VIENNA = Path(sys.executable).with_name("vienna")


def run_command(
    *,
    policy: Path,
    proxy_port: int,
    api_port: int,
    data_dir: Path,
    agent_id: str,
    warrant_key: Path,
    operators: Path | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """`vienna run` on loopback ports with the given files; `extra` flags come last and win."""
    command = [
        str(VIENNA), "run",
        "--policy", str(policy),
        "--listen", f"127.0.0.1:{proxy_port}",
        "--api", f"127.0.0.1:{api_port}",
        "--data-dir", str(data_dir),
        "--agent-id", agent_id,
        "--warrant-key-file", str(warrant_key),
    ]  # fmt: skip
    if operators is not None:
        command += ["--operators", str(operators)]
    return [*command, *extra]


def clean_environment() -> dict[str, str]:
    """The test runner's environment without proxy variables or VIENNA_* settings."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.lower().endswith("_proxy") and not key.startswith("VIENNA_")
    }
