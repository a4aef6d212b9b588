"""kill -9 in the middle of retention cuts loses nothing: each cut (the signed anchor and the
delete) is one transaction, so after every kill the chain verifies from a signed cut and every
event that was not exported is still there."""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
import time
from pathlib import Path

from proxy.audit_keeper import mark_exported
from proxy.store import Store
from tests.audit.support import events, run_vienna

EVENTS = 30_000
EXPORTED = 24_000
CHILD = """
import sys, time
from pathlib import Path
import proxy.audit_keeper as keeper_module
from policy.retention import Retention
from proxy.audit_keeper import AuditKeeper, exported_release
from proxy.metrics import Metrics

keeper_module.CUT_CHUNK = int(sys.argv[2])
data = Path(sys.argv[1])
keeper = AuditKeeper(
    data / "audit.db",
    audit_key=(data / "audit.key").read_bytes().strip(),
    checkpoint_path=data / "checkpoints.jsonl",
    retention=Retention(max_bytes=1),  # drop everything that was exported
    min_free_bytes=0,
    released=lambda: exported_release(data / "state.db"),
    metrics=Metrics(),
)
print("cutting", flush=True)
while True:
    keeper.tick()
"""


def _write_chain(data: Path) -> None:
    store = Store(data / "audit.db")
    try:
        for seq in range(1, EVENTS + 1):
            store.append(
                type="decision" if seq % 3 else "intent",
                agent="crash-agent",
                policy_revision="r" * 64,
                payload={"decision_id": f"d_{seq:08x}", "forwarded": True, "n": seq},
                ts=1_700_000_000 + seq / 100,
                durable=seq % 500 == 0,
            )
        store.flush()
    finally:
        store.close()


def test_kill_9_during_retention_cuts_loses_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_chain(data)
    (data / "audit.key").write_text(secrets.token_hex(32))
    marked = next(e for e in events(data / "audit.db") if e.seq == EXPORTED)
    assert mark_exported(data / "audit.db", EXPORTED, marked.hash, time.time())
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    kills = 0
    while kills < 20:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data), "3000"], stdout=subprocess.PIPE, env=env
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"cutting"
        time.sleep(rng.uniform(0.05, 0.6))  # mid-verify, mid-cut, between cuts
        child.kill()
        child.wait()
        child.stdout.close()
        kills += 1
        kept = events(data / "audit.db")
        first = kept[0].seq
        # nothing that was not exported is gone, and nothing in between
        assert first <= EXPORTED + 1
        assert [e.seq for e in kept] == list(range(first, EVENTS + 1))
        verify = run_vienna("audit", "verify", str(data / "audit.db"))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        if first > 1:
            assert f"the chain starts at seq {first}" in verify.stdout
        if first == EXPORTED + 1:
            break
    assert events(data / "audit.db")[0].seq > 1, "no cut ever happened"
