"""The fleet authority, measured in one run: approvals/s and consumes/s on SQLite and on PostgreSQL
with 1 and 2 replicas, audit shipping throughput per replica, and the latency a T2 request with a
warrant adds when the sidecar consumes it at the authority instead of in its own data dir.

usage: python bench/authority.py [--requests 300] [--concurrency 8] [--events 20000]
                                 [--pg-dsn postgresql://postgres@127.0.0.1:5432/test]

Starts real `vienna authority` processes (and, for the latency, a loopback upstream and `vienna run`
in both modes) on loopback ports; each PostgreSQL configuration gets a fresh database. Prints
markdown tables. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policy.audit import GENESIS_HASH, link

VIENNA = Path(sys.executable).with_name("vienna")
OPERATOR, SIDECAR, AGENT = "op-token-" + "a" * 32, "sc-token-" + "b" * 32, "bench-agent"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("VIENNA_")
    }


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_files(workdir: Path) -> tuple[Path, Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    operators = workdir / "operators.yaml"
    operators.write_text(f"operators:\n  - {{name: alice, token_sha256: {sha(OPERATOR)}}}\n")
    sidecars = workdir / "sidecars.yaml"
    sidecars.write_text(f"sidecars:\n  - {{name: bench, token_sha256: {sha(SIDECAR)}, agents: ['*']}}\n")
    key = workdir / "signing.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return operators, sidecars, key


def wait_ready(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url + "/readyz", timeout=1) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} was not ready")


@contextlib.contextmanager
def authorities(workdir: Path, store: str, replicas: int) -> Iterator[list[str]]:
    operators, sidecars, key = write_files(workdir)
    processes, urls = [], []
    try:
        for n in range(replicas):
            port = free_port()
            log = (workdir / f"authority{n}.log").open("ab")
            process = subprocess.Popen(
                [str(VIENNA), "authority", "--listen", f"127.0.0.1:{port}", "--store", store,
                 "--operators", str(operators), "--sidecars", str(sidecars), "--signing-key-file", str(key),
                 "--max-pending-requests", "0"],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env(),
            )  # fmt: skip
            processes.append(process)
            urls.append(f"http://127.0.0.1:{port}")
            wait_ready(urls[-1], process, "vienna authority")
        yield urls
    finally:
        for process in processes:
            process.terminate()
            process.wait(15)


@contextlib.contextmanager
def postgres_database(admin_dsn: str) -> Iterator[str]:
    import psycopg

    name = "vienna_bench_" + secrets.token_hex(4)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_dsn.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def run_all(
    count: int, concurrency: int, call: Callable[[int], Awaitable[float]]
) -> tuple[float, list[float]]:
    """(operations per second, latencies) of `count` calls with `concurrency` in flight."""
    queue = list(range(count))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            latencies.append(await call(queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started), latencies


def open_body(n: int) -> dict[str, Any]:
    return {
        "agent": AGENT,
        "tier": "T2",
        "intent": {"action": "bench.write", "target": str(n)},
        "request": {
            "method": "PUT",
            "scheme": "https",
            "host": "api.example.com",
            "port": 443,
            "path": f"/items/{n}",
            "query": "",
            "body_sha256": hashlib.sha256(b"").hexdigest(),
            "content_type": None,
            "url": f"https://api.example.com/items/{n}",
            "body_preview": "",
        },
        "terms": {"ttl_seconds": 900, "max_uses": 1, "bind": "exact"},
    }


async def measure_store(urls: Sequence[str], count: int, concurrency: int, events: int) -> dict[str, float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2)) as http:
        sidecar, operator = {"Authorization": f"Bearer {SIDECAR}"}, {"Authorization": f"Bearer {OPERATOR}"}
        ids: dict[int, str] = {}
        warrants: dict[int, str] = {}

        async def timed(
            method: str, url: str, headers: dict[str, str], body: dict[str, Any]
        ) -> tuple[float, Any]:
            started = time.perf_counter()
            async with http.request(method, url, headers=headers, json=body) as answer:
                data = await answer.json()
                if answer.status >= 400 and answer.status != 409:
                    raise SystemExit(f"{method} {url}: {answer.status} {data}")
            return time.perf_counter() - started, data

        async def open_one(n: int) -> float:
            took, data = await timed(
                "POST", urls[n % len(urls)] + "/v1/sidecar/warrant-requests", sidecar, open_body(n)
            )
            ids[n] = data["id"]
            return took

        async def approve_one(n: int) -> float:
            url = f"{urls[n % len(urls)]}/v1/warrant-requests/{ids[n]}/approve"
            took, _ = await timed("POST", url, operator, {"justification": "bench"})
            return took

        async def consume_one(n: int) -> float:
            took, data = await timed(
                "POST", urls[n % len(urls)] + "/v1/warrants/consume", sidecar, {"warrant": warrants[n]}
            )
            assert data.get("consumed"), data
            return took

        opens, _ = await run_all(count, concurrency, open_one)
        approvals, _ = await run_all(count, concurrency, approve_one)
        for n, request_id in ids.items():
            async with http.get(f"{urls[0]}/v1/warrant-requests/{request_id}", headers=sidecar) as answer:
                warrants[n] = (await answer.json())["warrant"]
        consumes, consume_latency = await run_all(count, concurrency, consume_one)
        sequential, sequential_latency = 0.0, []
        # One at a time: what a single T2 request waits for.
        extra = {count + n: None for n in range(100)}
        for n in extra:
            await open_one(n)
            await approve_one(n)
            async with http.get(f"{urls[0]}/v1/warrant-requests/{ids[n]}", headers=sidecar) as answer:
                warrants[n] = (await answer.json())["warrant"]
        for n in extra:
            sequential_latency.append(await consume_one(n))
        sequential = statistics.median(sequential_latency)

        # Shipping: one chain per replica, batches of 1000 events, all replicas at once.
        per_replica = events // len(urls)

        def chain_events(chain: int) -> list[list[dict[str, Any]]]:
            prev, out = GENESIS_HASH, []
            for seq in range(1, per_replica + 1):
                event = link(prev_hash=prev, seq=seq, ts=time.time(), type="decision", agent=AGENT,
                             policy_revision="r" * 64, payload={"decision_id": f"d_{chain}_{seq}", "decision": "allow",
                             "forwarded": True, "tier": "T0", "intent": {"action": "bench.read", "target": ""},
                             "request": {"method": "GET", "url": f"https://api.example.com/items/{seq}"}})  # fmt: skip
                out.append(event.as_dict())
                prev = event.hash
            return [out[i : i + 1000] for i in range(0, len(out), 1000)]

        prepared = [chain_events(n) for n in range(len(urls))]

        async def ship(replica: int) -> None:
            for batch in prepared[replica]:
                async with http.post(
                    urls[replica] + "/v1/audit/events",
                    headers=sidecar,
                    json={"chain": f"bench{replica}", "events": batch},
                ) as answer:
                    if answer.status != 200:
                        raise SystemExit(f"shipping: {answer.status} {await answer.text()}")

        started = time.perf_counter()
        await asyncio.gather(*(ship(n) for n in range(len(urls))))
        shipped = per_replica * len(urls) / (time.perf_counter() - started)
    return {
        "opens": opens,
        "approvals": approvals,
        "consumes": consumes,
        "consume_p50_ms": statistics.median(consume_latency) * 1000,
        "consume_p99_ms": statistics.quantiles(consume_latency, n=100)[98] * 1000,
        "consume_alone_p50_ms": sequential * 1000,
        "ship_per_replica": shipped / len(urls),
    }


# --- the latency a T2 request adds in authority mode ---------------------------------------------

POLICY = """\
version: 1
default_tier: T3
rules:
  - id: read
    match: {hosts: ["127.0.0.1"], methods: [GET], paths: ["/read"]}
    action: bench.read
    tier: T0
  - id: write
    match: {hosts: ["127.0.0.1"], methods: [GET], paths: ["/write/**"]}
    action: bench.write
    tier: T2
    warrant: {bind: path, max_uses: 1000, ttl: 15m}
"""


async def upstream_server() -> tuple[Any, int]:
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@contextlib.contextmanager
def sidecar(workdir: Path, extra: Sequence[str]) -> Iterator[tuple[str, str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "policy.yaml").write_text(POLICY)
    (workdir / "operators.yaml").write_text(
        f"operators:\n  - {{name: alice, token_sha256: {sha(OPERATOR)}}}\n"
    )
    proxy, api = free_port(), free_port()
    log = (workdir / "sidecar.log").open("ab")
    process = subprocess.Popen(
        [str(VIENNA), "run", "--policy", str(workdir / "policy.yaml"), "--listen", f"127.0.0.1:{proxy}",
         "--api", f"127.0.0.1:{api}", "--data-dir", str(workdir / "data"), "--agent-id", AGENT,
         "--operators", str(workdir / "operators.yaml"), "--audit-stdout", "false", *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env(),
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{api}", process, "vienna run")
        yield f"http://127.0.0.1:{proxy}", f"http://127.0.0.1:{api}"
    finally:
        process.terminate()
        process.wait(15)


async def t2_latency(proxy: str, api: str, approve_at: str, port: int, count: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}/write/x"
        async with http.get(url, proxy=proxy) as refused:
            request_id = (await refused.json())["warrant_request"]["id"]
        async with http.post(
            f"{approve_at}/v1/warrant-requests/{request_id}/approve",
            headers={"Authorization": f"Bearer {OPERATOR}"},
            json={"justification": "bench"},
        ) as approved:
            assert approved.status == 200, await approved.text()
        async with http.get(f"{api}/v1/warrant-requests/{request_id}") as status:
            warrant = (await status.json())["warrant"]

        async def timed(target: str, headers: dict[str, str]) -> list[float]:
            out = []
            for _ in range(count):
                started = time.perf_counter()
                async with http.get(target, proxy=proxy, headers=headers) as answer:
                    await answer.read()
                    assert answer.status == 200, answer.status
                out.append(time.perf_counter() - started)
            return out

        await timed(f"http://127.0.0.1:{port}/read", {})  # warm up
        t0 = await timed(f"http://127.0.0.1:{port}/read", {})
        t2 = await timed(url, {"Vienna-Warrant": warrant})
    return {"t0_p50_ms": statistics.median(t0) * 1000, "t2_p50_ms": statistics.median(t2) * 1000}


async def latency(workdir: Path, count: int) -> dict[str, dict[str, float]]:
    runner, port = await upstream_server()
    results = {}
    try:
        with sidecar(workdir / "standalone", []) as (proxy, api):
            results["standalone"] = await t2_latency(proxy, api, api, port, count)
        with authorities(workdir / "fleet", f"sqlite:///{workdir}/fleet/store/authority.db", 1) as urls:
            token = workdir / "fleet" / "token"
            token.write_text(SIDECAR)
            with sidecar(
                workdir / "fleet-sidecar", ["--authority", urls[0], "--authority-token-file", str(token)]
            ) as (proxy, api):
                results["authority"] = await t2_latency(proxy, api, urls[0], port, count)
    finally:
        await runner.cleanup()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument(
        "--pg-dsn", default=os.environ.get("VIENNA_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    )
    args = parser.parse_args()
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="vienna-bench-") as tmp:
        work = Path(tmp)
        with authorities(work / "sqlite", f"sqlite:///{work}/sqlite/store/authority.db", 1) as urls:
            rows.append(
                (
                    "SQLite, 1 replica",
                    asyncio.run(measure_store(urls, args.requests, args.concurrency, args.events)),
                )
            )
        try:
            for replicas in (1, 2):
                with (
                    postgres_database(args.pg_dsn) as dsn,
                    authorities(work / f"pg{replicas}", dsn, replicas) as urls,
                ):
                    label = f"PostgreSQL, {replicas} replica{'s' if replicas > 1 else ''}"
                    rows.append(
                        (
                            label,
                            asyncio.run(measure_store(urls, args.requests, args.concurrency, args.events)),
                        )
                    )
        except Exception as exc:  # no PostgreSQL here: say so, keep the SQLite figures
            print(f"(PostgreSQL skipped: {exc})", file=sys.stderr)
        timings = asyncio.run(latency(work / "latency", args.latency_requests))
    print(
        f"\n{args.requests} requests, {args.concurrency} in flight; {args.events} audit events in batches of 1000\n"
    )
    print(
        "| store | opens/s | approvals/s | consumes/s | consume p50 / p99 (loaded) | consume p50 (alone) | shipping events/s per replica |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(
            f"| {label} | {r['opens']:.0f} | {r['approvals']:.0f} | {r['consumes']:.0f} |"
            f" {r['consume_p50_ms']:.1f} / {r['consume_p99_ms']:.1f} ms | {r['consume_alone_p50_ms']:.2f} ms |"
            f" {r['ship_per_replica']:.0f} |"
        )
    s, a = timings["standalone"], timings["authority"]
    print("\n| sidecar | T0 p50 | T2 with a warrant p50 | added by the warrant |")
    print("|---|---|---|---|")
    print(
        f"| standalone (HS256, local single use) | {s['t0_p50_ms']:.2f} ms | {s['t2_p50_ms']:.2f} ms | {s['t2_p50_ms'] - s['t0_p50_ms']:+.2f} ms |"
    )
    print(
        f"| authority mode (EdDSA, consumed at the authority) | {a['t0_p50_ms']:.2f} ms | {a['t2_p50_ms']:.2f} ms | {a['t2_p50_ms'] - a['t0_p50_ms']:+.2f} ms |"
    )
    print(json.dumps({"stores": dict(rows), "latency": timings}, indent=None), file=sys.stderr)


if __name__ == "__main__":
    main()
