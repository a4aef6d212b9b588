"""`vienna run --demo` (the README's first command): every tier tried once on one machine, and the printed
operator tokens really approve."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import requests

from tests.integration.harness import clean_env, free_port
from tests.vienna_process import VIENNA


def test_demo_shows_every_tier_working_on_one_machine(tmp_path: Path) -> None:
    proxy, api = free_port(), free_port()
    log = tmp_path / "demo.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(VIENNA), "run", "--demo", "--listen", f"127.0.0.1:{proxy}", "--api", f"127.0.0.1:{api}",
             "--data-dir", str(tmp_path / "data"), "--audit-stdout", "false"],
            stdout=subprocess.DEVNULL, stderr=sink, env=clean_env(), cwd=tmp_path,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 40
            while "try it yourself" not in log.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()
                time.sleep(0.2)
            text = log.read_text()
            assert "try it yourself" in text, text
            assert text.count("→ 200 allow") == 2, text  # T0 and T1 forwarded
            assert text.count("→ 403 deny warrant_required — warrant request wr_") == 2, text  # T2 and T3
            assert "→ 403 deny denied — policy.deny" in text, text
            token = re.search(r"--token (alice-demo-[0-9a-f]+)", text)
            assert token is not None
            pending = requests.get(
                f"http://127.0.0.1:{api}/v1/warrant-requests?status=pending",
                headers={"Authorization": f"Bearer {token.group(1)}"},
                timeout=10,
            )
            assert pending.status_code == 200 and len(pending.json()) == 2
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(20)
