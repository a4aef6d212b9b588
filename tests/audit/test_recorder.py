"""The Recorder and Store in process, on real SQLite files: checkpoints that fail, and what they sign."""

from __future__ import annotations

import asyncio
import importlib
import json
import shutil
import sqlite3
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from proxy.audit_log import Recorder
from proxy.metrics import Metrics
from proxy.store import Store, StoreUnavailable, read_events

if TYPE_CHECKING:
    from proxy.runtime import Sidecar

KEY = b"audit-key-for-tests-" * 3


def _recorder(tmp_path: Path, checkpoint_path: Path, every: int) -> Recorder:
    return Recorder(
        Store(tmp_path / "audit.db"),
        Metrics(),
        audit_key=KEY,
        checkpoint_path=checkpoint_path,
        checkpoint_every=every,
    )


def test_a_failing_checkpoint_does_not_fail_the_event_it_follows(tmp_path: Path) -> None:
    unwritable = tmp_path / "not-yet" / "checkpoints.jsonl"
    recorder = _recorder(tmp_path, unwritable, every=2)
    try:
        recorder.record("decision", agent="a", policy_revision="r", payload={"n": 1})
        second = recorder.record(
            "decision", agent="a", policy_revision="r", payload={"n": 2}
        )  # checkpoint fails
        assert second.seq == 2
        assert recorder.dirty  # still owed
        third = recorder.record("execution", agent="a", policy_revision="r", payload={"n": 3}, durable=False)
        assert third.seq == 3
        unwritable.parent.mkdir()
        entry = recorder.checkpoint()
        assert entry is not None and entry["size"] == 3
        assert not recorder.dirty
    finally:
        recorder.store.close()
    assert [event.seq for event in read_events(tmp_path / "audit.db")] == [1, 2, 3]


def test_what_a_checkpoint_signs_is_in_the_database_file_itself(tmp_path: Path) -> None:
    """Not only in the WAL, which synchronous=NORMAL does not sync at commit: a power loss must not
    leave a signed checkpoint ahead of the surviving log."""
    recorder = _recorder(tmp_path, tmp_path / "checkpoints.jsonl", every=1000)
    try:
        for n in range(7):
            recorder.record("decision", agent="a", policy_revision="r", payload={"n": n}, durable=n % 2 == 0)
        entry = recorder.checkpoint()
        assert entry is not None and entry["size"] == 7
        main_file_only = tmp_path / "copy" / "audit.db"
        main_file_only.parent.mkdir()
        shutil.copyfile(tmp_path / "audit.db", main_file_only)  # without -wal
        copied = list(read_events(main_file_only))
        assert len(copied) == 7
        assert copied[-1].hash == entry["head_hash"]
    finally:
        recorder.store.close()
    [line] = (tmp_path / "checkpoints.jsonl").read_text().splitlines()
    assert json.loads(line)["size"] == 7


async def test_the_checkpoint_timer_survives_a_store_that_cannot_write(tmp_path: Path) -> None:
    calls: list[str] = []

    class Flaky:
        dirty = True

        def checkpoint(self) -> None:
            calls.append("checkpoint")
            if len(calls) == 1:
                raise StoreUnavailable("audit store cannot write: database is locked")
            if len(calls) == 2:
                raise OSError("disk full")

    with warnings.catch_warnings():  # mitmproxy's dependencies warn on import
        warnings.simplefilter("ignore", DeprecationWarning)
        runtime: Any = importlib.import_module("proxy.runtime")
    sidecar = cast(
        "Sidecar", SimpleNamespace(settings=SimpleNamespace(checkpoint_seconds=0.01), recorder=Flaky())
    )
    task = asyncio.create_task(runtime._checkpoints(sidecar))
    try:
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(calls) >= 3:
                break
        assert not task.done()
        assert len(calls) >= 3
    finally:
        task.cancel()


def test_a_locked_database_refuses_durable_events_and_keeps_the_chain_gap_free(tmp_path: Path) -> None:
    store = Store(tmp_path / "audit.db")
    other = sqlite3.connect(tmp_path / "audit.db", isolation_level=None, timeout=0)
    try:
        store.append(type="decision", agent="a", policy_revision="r", payload={"n": 1}, ts=1.0)
        other.execute("BEGIN EXCLUSIVE")
        store._db.execute("PRAGMA busy_timeout=50")
        try:
            store.append(type="decision", agent="a", policy_revision="r", payload={"n": 2}, ts=2.0)
        except StoreUnavailable:
            pass
        else:
            raise AssertionError("a durable append into a locked database must raise StoreUnavailable")
        other.execute("ROLLBACK")
        assert store.head[0] == 1
        third = store.append(type="decision", agent="a", policy_revision="r", payload={"n": 3}, ts=3.0)
        assert third.seq == 2
    finally:
        other.close()
        store.close()
    assert [event.payload["n"] for event in read_events(tmp_path / "audit.db")] == [1, 3]


def test_the_stdout_line_is_the_event_as_sorted_json() -> None:
    from policy.audit import GENESIS_HASH, link
    from proxy.audit_log import stdout_line

    event = link(
        prev_hash=GENESIS_HASH,
        seq=7,
        ts=1.5,
        type="decision",
        agent='agent "é"',
        policy_revision="rev",
        payload={"b": [1, {"c": None}], "a": "x\n"},
    )
    line = stdout_line(event)
    assert "\n" not in line
    assert json.loads(line) == {"log": "vienna.audit", **event.as_dict()}
