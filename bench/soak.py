"""Soak: a mixed-tier load at a fixed rate for a set time, watching the sidecar's memory and descriptors.

usage: python bench/soak.py [--seconds 600] [--rate 40] [--sample 5] [--concurrency 64]

Starts a loopback upstream (aiohttp, its own process) and `vienna run` with a policy that has every
tier, then sends requests at a fixed rate (open loop: a slow sidecar does not slow the schedule; when
`--concurrency` requests are already in flight the next one is counted as dropped). The mix:

    T0 GET                      35%   forwarded
    T1 POST                     20%   forwarded
    T1 POST, limited 600/m       5%   forwarded or 429
    T2 PUT, no warrant          10%   403 warrant_required (20 distinct requests: pending ones are reused)
    T3 DELETE + fresh warrant   10%   forwarded (warrants minted here with the sidecar's key)
    deny GET                    10%   403 denied
    ambiguous path               5%   400 bad_request
    forged warrant               5%   403 warrant_invalid

Every `--sample` seconds it reads the sidecar's RSS and open descriptors from /proc and prints a row;
at the end it prints the growth from the first sample after warm-up to the last, and the RSS trend
(least-squares slope) over the run after warm-up. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yarl

if not __package__:  # run as a file: bench/ is on sys.path first, and bench/proxy.py would shadow `proxy`
    _here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from policy.model import Intent, Tier
from policy.warrants import Approval, Constraints, WarrantClaims, WarrantKeys, mint
from proxy.keys import key_id

AGENT = "soak-agent"
POLICY = """\
version: 1
default_tier: T3
rules:
  - id: deny-admin
    match: {hosts: ["127.0.0.1"], paths: ["/admin/**"]}
    action: soak.admin
    tier: deny
  - id: read
    match: {hosts: ["127.0.0.1"], methods: [GET]}
    action: soak.read
    tier: T0
  - id: notes
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/notes/**"]}
    action: soak.note
    tier: T1
  - id: limited
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/limited/**"]}
    action: soak.limited
    tier: T1
    limits: {rate: 600/m}
  - id: items
    match: {hosts: ["127.0.0.1"], methods: [PUT], paths: ["/items/**"]}
    action: soak.write_item
    tier: T2
  - id: delete-repo
    match: {hosts: ["127.0.0.1"], methods: [DELETE], paths: ["/repos/{owner}/{repo}"]}
    action: soak.delete_repo
    target: "{owner}/{repo}"
    tier: T3
"""
UPSTREAM = """\
import sys
from aiohttp import web

async def ok(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b'{"ok":true}', content_type="application/json")

app = web.Application()
app.router.add_route("*", "/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
# (kind, weight): see the module docstring.
MIX: tuple[tuple[str, int], ...] = (
    ("t0", 35),
    ("t1", 20),
    ("t1-limited", 5),
    ("t2-no-warrant", 10),
    ("t3-warrant", 10),
    ("deny", 10),
    ("ambiguous", 5),
    ("forged", 5),
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), opener.open(url, timeout=1) as answer:
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s")


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    requests: int
    rss_kib: int
    fds: int
    threads: int


def sample(pid: int, at: float, requests: int) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"].strip())
    fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return Sample(at, requests, rss, fds, threads)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of value over time (seconds), per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    denominator = sum((t - mean_t) ** 2 for t, _ in points)
    if denominator == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / denominator


@dataclass
class Load:
    proxy: str
    upstream_port: int
    keys: WarrantKeys
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    slowest: list[tuple[float, float, str]] = field(default_factory=list)  # (seconds, at, kind)
    sent: int = 0
    dropped: int = 0
    started: float = 0.0

    def url(self, path: str) -> yarl.URL:
        return yarl.URL(f"http://127.0.0.1:{self.upstream_port}{path}", encoded=True)

    def warrant(self, path: str, *, forged: bool = False) -> str:
        now = int(time.time())
        claims = WarrantClaims(
            iss="vienna",
            sub=AGENT,
            jti="wt_" + secrets.token_urlsafe(12),
            iat=now,
            nbf=now,
            exp=now + 300,
            tier=Tier.T3,
            intent=Intent(action="soak.delete_repo", target=path, rule="delete-repo"),
            approvals=(Approval(who="soak", at=float(now), justification="soak"),) * 2,
            con=Constraints(
                method="DELETE",
                scheme="http",
                host="127.0.0.1",
                port=self.upstream_port,
                path=path,
                path_prefix=None,
                query="",
                body_sha256=hashlib.sha256(b"").hexdigest(),
            ),
        )
        token = mint(claims, self.keys)
        return token[:-4] + "AAAA" if forged else token

    async def one(self, client: aiohttp.ClientSession, kind: str, n: int) -> None:
        headers: dict[str, str] = {}
        data: bytes | None = None
        if kind == "t0":
            method, path = "GET", f"/read/{n % 1000}"
        elif kind == "t1":
            method, path, data = "POST", f"/notes/{n % 1000}", b"note=1"
        elif kind == "t1-limited":
            method, path, data = "POST", f"/limited/{n % 10}", b"x=1"
        elif kind == "t2-no-warrant":
            method, path, data = "PUT", f"/items/{n % 20}", b"item=1"
        elif kind in ("t3-warrant", "forged"):
            method, path = "DELETE", f"/repos/soak/r{n}"
            headers["Vienna-Warrant"] = self.warrant(path, forged=kind == "forged")
        elif kind == "deny":
            method, path = "GET", f"/admin/{n % 100}"
        else:
            method, path = "GET", f"/files/a%2F..%2Fb{n % 100}"
        started = time.perf_counter()
        try:
            async with client.request(
                method, self.url(path), data=data, headers=headers, proxy=self.proxy
            ) as answer:
                await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outcomes[f"{kind} error {type(exc).__name__}"] += 1
            return
        took = time.perf_counter() - started
        self.latencies.append(took)
        if len(self.slowest) < 5 or took > self.slowest[-1][0]:
            self.slowest = sorted([*self.slowest, (took, time.monotonic(), kind)], reverse=True)[:5]
        self.outcomes[f"{kind} {status}"] += 1


async def drive(
    load: Load, *, seconds: float, rate: float, every: float, concurrency: int, pid: int
) -> list[Sample]:
    kinds = [kind for kind, _ in MIX]
    weights = [weight for _, weight in MIX]
    chooser = random.Random(7)
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as client:

        async def run(kind: str, n: int) -> None:
            try:
                await load.one(client, kind, n)
            finally:
                slots.release()

        start = load.started = time.monotonic()
        next_sample = start
        n = 0
        print(f"{'t(s)':>6} {'sent':>8} {'req/s':>7} {'RSS MiB':>8} {'fds':>5} {'thr':>4}", flush=True)
        while (now := time.monotonic()) < start + seconds:
            if now >= next_sample:
                current = sample(pid, now - start, load.sent)
                samples.append(current)
                previous = samples[-2] if len(samples) > 1 else current
                span = current.at - previous.at
                rps = (current.requests - previous.requests) / span if span > 0 else 0.0
                print(
                    f"{current.at:6.0f} {current.requests:8d} {rps:7.1f} {current.rss_kib / 1024:8.1f}"
                    f" {current.fds:5d} {current.threads:4d}",
                    flush=True,
                )
                next_sample += every
            due = start + n / rate
            if due > now:
                await asyncio.sleep(min(due - now, max(0.0, next_sample - now)))
                continue
            n += 1
            if slots.locked():
                load.dropped += 1
                continue
            await slots.acquire()
            load.sent += 1
            task = asyncio.create_task(run(chooser.choices(kinds, weights)[0], n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        samples.append(sample(pid, time.monotonic() - start, load.sent))
    return samples


def percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def directory_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def report(
    samples: list[Sample], load: Load, seconds: float, rate: float, data_dir: Path | None = None
) -> None:
    warm = [s for s in samples if s.at >= min(30.0, seconds * 0.1)] or samples
    first, last = warm[0], samples[-1]
    print()
    print(f"duration {seconds:.0f}s, target rate {rate:g}/s, sent {load.sent}, dropped {load.dropped}")
    print("outcomes: " + ", ".join(f"{kind} ×{count}" for kind, count in sorted(load.outcomes.items())))
    if load.latencies:
        ordered = sorted(load.latencies)
        print(
            f"latency over {len(ordered)} requests: p50 {percentile(ordered, 0.5) * 1000:.1f} ms,"
            f" p99 {percentile(ordered, 0.99) * 1000:.1f} ms, p99.9 {percentile(ordered, 0.999) * 1000:.1f} ms,"
            f" max {ordered[-1] * 1000:.1f} ms"
        )
        start = load.started
        print(
            "slowest: "
            + ", ".join(
                f"{took * 1000:.0f} ms ({kind}, at {at - start:.0f}s)" for took, at, kind in load.slowest
            )
        )
    if data_dir is not None and data_dir.exists():
        print(f"data dir at the end: {directory_bytes(data_dir) / 1e6:.1f} MB ({data_dir})")
    rss_growth = (last.rss_kib - first.rss_kib) / 1024
    print(
        f"RSS after warm-up ({first.at:.0f}s): {first.rss_kib / 1024:.1f} MiB → end: {last.rss_kib / 1024:.1f} MiB "
        f"(growth {rss_growth:+.1f} MiB, {100 * rss_growth * 1024 / first.rss_kib:+.1f}%); "
        f"trend {slope_per_minute([(s.at, s.rss_kib / 1024) for s in warm]):+.2f} MiB/min; "
        f"peak {max(s.rss_kib for s in samples) / 1024:.1f} MiB"
    )
    print(
        f"open fds after warm-up: {first.fds} → end: {last.fds} (growth {last.fds - first.fds:+d}); "
        f"peak {max(s.fds for s in samples)}; threads {first.threads} → {last.threads}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to run (default 600)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second (default 40)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--concurrency", type=int, default=64, help="most requests in flight (default 64)")
    parser.add_argument(
        "--vienna-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra `vienna run` argument (repeatable), e.g. --vienna-arg=--audit-retain=64MiB",
    )
    args = parser.parse_args(argv)
    vienna = Path(sys.executable).with_name("vienna")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("VIENNA_")
    }
    with tempfile.TemporaryDirectory(prefix="vienna-soak-") as tmp:
        work = Path(tmp)
        (work / "policy.yaml").write_text(POLICY)
        key_file = work / "warrant.key"
        key_file.write_text(secrets.token_hex(48))
        secret = key_file.read_bytes().strip()
        keys = WarrantKeys(keys={key_id(secret): secret}, active_kid=key_id(secret))
        upstream_port, proxy_port, api_port = free_port(), free_port(), free_port()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            processes.append(
                subprocess.Popen([sys.executable, "-c", UPSTREAM, str(upstream_port)], env=env, cwd=work)
            )
            with (work / "vienna.log").open("wb") as log:
                sidecar = subprocess.Popen(
                    [
                        str(vienna),
                        "run",
                        "--policy",
                        str(work / "policy.yaml"),
                        "--listen",
                        f"127.0.0.1:{proxy_port}",
                        "--api",
                        f"127.0.0.1:{api_port}",
                        "--data-dir",
                        str(work / "data"),
                        "--agent-id",
                        AGENT,
                        "--warrant-key-file",
                        str(key_file),
                        "--audit-stdout",
                        "false",
                        *args.vienna_arg,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=work,
                )
            processes.append(sidecar)
            wait_port(upstream_port)
            wait_http(f"http://127.0.0.1:{api_port}/readyz")
            load = Load(proxy=f"http://127.0.0.1:{proxy_port}", upstream_port=upstream_port, keys=keys)
            print(f"soak: {args.seconds:.0f}s at {args.rate:g} req/s against vienna run (pid {sidecar.pid})")
            samples = asyncio.run(
                drive(
                    load,
                    seconds=args.seconds,
                    rate=args.rate,
                    every=args.sample,
                    concurrency=args.concurrency,
                    pid=sidecar.pid,
                )
            )
            report(samples, load, args.seconds, args.rate, work / "data")
        finally:
            for process in reversed(processes):
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
