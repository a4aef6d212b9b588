"""Audit volume: bytes written per T0 request and stored per event, durable vs group commit, in one run.

usage: python bench/audit.py [--seconds 8] [--connections 1,8] [--strace]

Starts a loopback upstream and `vienna run` with a T0 policy (audit to stdout off, then on), drives
it with keep-alive clients, and reads the sidecar's /proc/PID/io before and after: `wchar` (bytes
handed to write/pwrite: the WAL, the database at checkpoints, checkpoints.jsonl, stdout — socket
sends are not counted) and `syscw` (write calls). After a clean stop it counts the events and
divides the size of audit.db (checkpointed, WAL empty) by them: stored bytes per event.
With --strace (if strace is installed) it also splits the bytes by file for one of the runs.
Latency p50/p99/p99.9/max is over every request of a run. Measures; asserts nothing.

    | audit | conns | req/s | written B/req | write calls/req | stored B/event | p50 | p99 | p99.9 | max |
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file: bench/ is on sys.path first, and bench/proxy.py would shadow `proxy`
    _here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from bench.proxy import POLICY, UPSTREAM, drive, free_port, launch_sidecar, wait_port


@dataclass
class Run:
    label: str
    connections: int
    requests: int
    seconds: float
    written: float
    calls: float
    stored_per_event: float
    events_per_request: float
    latencies: list[float]
    by_file: dict[str, float]


def proc_io(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, value = line.split(":")
        values[key] = int(value)
    return values


def start_sidecar(work: Path, name: str, flags: list[str]) -> tuple[subprocess.Popen[bytes], int, Path]:
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    proc, port, _ = launch_sidecar(policy, work / name, work / f"{name}.log", flags)
    return proc, port, work / name


def split_by_file(trace: Path, requests: int) -> dict[str, float]:
    totals: collections.Counter[str] = collections.Counter()
    pattern = re.compile(r"(?:pwrite64|write)\(\d+<([^>]*)>.*= (\d+)$")
    for line in trace.read_text().splitlines():
        match = pattern.search(line)
        if match:
            name = match.group(1).rsplit("/", 1)[-1]
            if "socket" in name or name.startswith(("TCP", "UNIX", "pipe")):
                continue
            totals[name] += int(match.group(2))
    return {name: count / requests for name, count in totals.most_common()}


def measure(
    work: Path, upstream: int, label: str, flags: list[str], connections: int, seconds: float, trace: bool
) -> Run:
    name = re.sub(r"\W+", "-", f"{label}-{connections}")
    proc, port, data = start_sidecar(work, name, flags)
    try:
        warm = asyncio.run(drive(port, upstream, via_proxy=True, connections=connections, seconds=1.0))
        time.sleep(1.5)  # the warm-up's write-behind and WAL checkpoint are done
        tracer = None
        trace_file = work / f"{name}.trace"
        if trace and shutil.which("strace"):
            tracer = subprocess.Popen(
                ["strace", "-f", "-yy", "-qq", "-e", "trace=write,pwrite64", "-o", str(trace_file), "-p", str(proc.pid)]
            )  # fmt: skip
            time.sleep(0.5)
        before = proc_io(proc.pid)
        samples: list[float] = []
        count = asyncio.run(
            drive(port, upstream, via_proxy=True, connections=connections, seconds=seconds, samples=samples)
        )
        time.sleep(1.5)  # the last write-behind commit and one WAL checkpoint
        after = proc_io(proc.pid)
        if tracer is not None:
            tracer.terminate()
            tracer.wait(10)
    finally:
        proc.terminate()
        proc.wait(20)
    db = data / "audit.db"
    connection = sqlite3.connect(db)
    try:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        events = int(connection.execute("SELECT COUNT(*) FROM audit").fetchone()[0])
    finally:
        connection.close()
    total_requests = warm + count  # the warm-up's events are stored too
    return Run(
        label=label,
        connections=connections,
        requests=count,
        seconds=seconds,
        written=(after["wchar"] - before["wchar"]) / count,
        calls=(after["syscw"] - before["syscw"]) / count,
        stored_per_event=db.stat().st_size / events if events else 0.0,
        events_per_request=events / total_requests if total_requests else 0.0,
        latencies=sorted(samples),
        by_file=split_by_file(trace_file, count) if tracer is not None else {},
    )


def percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))] * 1000 if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", default="1,8", help="comma-separated connection counts")
    parser.add_argument("--strace", action="store_true", help="also split the bytes by file (slower runs)")
    args = parser.parse_args()
    counts = [int(c) for c in str(args.connections).split(",")]
    work = Path(tempfile.mkdtemp(prefix="vienna-bench-audit-"))
    modes = [
        ("durable (default), stdout off", ["--durable-audit", "true", "--audit-stdout", "false"]),
        ("group commit, stdout off", ["--durable-audit", "false", "--audit-stdout", "false"]),
        ("durable (default), stdout on", ["--durable-audit", "true", "--audit-stdout", "true"]),
    ]
    upstream_port = free_port()
    (work / "upstream.py").write_text(UPSTREAM)
    upstream = subprocess.Popen([sys.executable, str(work / "upstream.py"), str(upstream_port)])
    runs: list[Run] = []
    try:
        wait_port(upstream_port)
        for label, flags in modes:
            for connections in counts:
                runs.append(
                    measure(work, upstream_port, label, flags, connections, args.seconds, args.strace)
                )
    finally:
        upstream.terminate()
        upstream.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nT0 GETs on keep-alive connections, {args.seconds:.0f} s per run\n")
    print(
        "| audit | conns | req/s | written B/req | write calls/req | events/req | stored B/event"
        " | p50 ms | p99 ms | p99.9 ms | max ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r.label} | {r.connections} | {r.requests / r.seconds:,.0f} | {r.written:,.0f} | {r.calls:.1f}"
            f" | {r.events_per_request:.1f} | {r.stored_per_event:,.0f} | {percentile(r.latencies, 0.5):.2f}"
            f" | {percentile(r.latencies, 0.99):.2f} | {percentile(r.latencies, 0.999):.2f}"
            f" | {percentile(r.latencies, 1.0):.2f} |"
        )
    split = [r for r in runs if r.by_file]
    for r in split:
        files = ", ".join(f"{name} {value:,.0f}" for name, value in r.by_file.items())
        print(f"\nbytes per request by file ({r.label}, {r.connections} conns, under strace): {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
