"""Throughput and latency, in one run: direct vs bare mitmproxy vs the sidecar (T0 rule, keep-alive).

usage: python bench/proxy.py [--seconds 8] [--connections 1,32]

The sidecar runs twice: with `--durable-audit true` (the default: each decision is committed to
SQLite before the request is forwarded) and `false` (decisions group-committed every ~20 ms), so
the cost of durability shows in the same run.

Starts a loopback upstream (aiohttp), a bare mitmproxy (only the addons a working proxy needs)
and `vienna run` with a T0 policy, then drives each with the same keep-alive asyncio client:
requests/s and p50/p99 latency at 1 and at 32 connections, and the proxy process's CPU time
per request (from /proc). Prints a markdown table. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICY = """\
version: 1
default_tier: T3
rules:
  - id: bench-read
    match: {hosts: ["127.0.0.1"], methods: [GET]}
    action: bench.read
    tier: T0
"""
BARE_MITMPROXY = """\
import asyncio, gc, sys
from mitmproxy import options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

async def main() -> None:
    opts = options.Options(listen_host="127.0.0.1", listen_port=int(sys.argv[1]), confdir=sys.argv[2])
    master = Master(opts, event_loop=asyncio.get_running_loop())
    master.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(),
                      tlsconfig.TlsConfig(), errorcheck.ErrorCheck())
    master.options.update(connection_strategy="lazy")
    gc.collect(); gc.freeze()
    await master.run()

asyncio.run(main())
"""
UPSTREAM = """\
import sys
from aiohttp import web

async def ok(request: web.Request) -> web.Response:
    return web.Response(body=b'{"ok":true}', content_type="application/json")

app = web.Application()
app.router.add_get("/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class Result:
    name: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float | None


async def _one_connection(
    host: str, port: int, request: bytes, deadline: float, latencies: list[float] | None
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    done = 0
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n")[0].decode())
            if latencies is not None:
                latencies.append(time.perf_counter() - started)
            done += 1
    finally:
        writer.close()
    return done


async def drive(
    port: int,
    upstream_port: int,
    *,
    via_proxy: bool,
    connections: int,
    seconds: float,
    samples: list[float] | None = None,
) -> int:
    target = f"http://127.0.0.1:{upstream_port}/bench" if via_proxy else "/bench"
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{upstream_port}\r\n\r\n".encode()
    deadline = time.perf_counter() + seconds
    counts = await asyncio.gather(
        *(_one_connection("127.0.0.1", port, request, deadline, samples) for _ in range(connections))
    )
    return sum(counts)


def measure(
    name: str,
    port: int,
    upstream_port: int,
    pid: int | None,
    *,
    via_proxy: bool,
    connections: int,
    seconds: float,
) -> Result:
    asyncio.run(
        drive(port, upstream_port, via_proxy=via_proxy, connections=connections, seconds=1.0)
    )  # warm-up
    cpu_before = cpu_seconds(pid) if pid else 0.0
    samples: list[float] = []
    count = asyncio.run(
        drive(
            port,
            upstream_port,
            via_proxy=via_proxy,
            connections=connections,
            seconds=seconds,
            samples=samples,
        )
    )
    cpu_after = cpu_seconds(pid) if pid else 0.0
    samples.sort()
    p99 = samples[max(0, int(len(samples) * 0.99) - 1)] if samples else 0.0
    return Result(
        name=name,
        connections=connections,
        rps=count / seconds,
        p50_ms=statistics.median(samples) * 1000 if samples else 0.0,
        p99_ms=p99 * 1000,
        cpu_us_per_request=(cpu_after - cpu_before) / count * 1e6 if pid and count else None,
    )


def launch_sidecar(
    policy: Path, data_dir: Path, log: Path, flags: list[str]
) -> tuple[subprocess.Popen[bytes], int, int]:
    """`vienna run` on loopback ports with `policy` and `flags`, once /readyz answers: (process,
    proxy port, api port). The one launcher the benchmarks share."""
    vienna = Path(sys.executable).with_name("vienna")
    port, api = free_port(), free_port()
    proc = subprocess.Popen(
        [str(vienna), "run", "--policy", str(policy), "--listen", f"127.0.0.1:{port}", "--api", f"127.0.0.1:{api}",
         "--data-dir", str(data_dir), "--agent-id", "bench", *flags],
        stdout=subprocess.DEVNULL, stderr=log.open("ab"),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api}/readyz", timeout=1) as response:
                if response.status == 200:
                    return proc, port, api
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"sidecar never became ready; see {log}")


def start_sidecar(tmp: Path, *, durable: bool) -> tuple[subprocess.Popen[bytes], int]:
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    data = tmp / ("data-durable" if durable else "data-batched")
    flags = ["--audit-stdout", "false", "--durable-audit", "true" if durable else "false"]
    proc, port, _ = launch_sidecar(policy, data, tmp / "vienna.log", flags)
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", default="1,32", help="comma-separated connection counts")
    args = parser.parse_args()
    counts = [int(c) for c in str(args.connections).split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="vienna-bench-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upstream_port = free_port()
        (tmp / "upstream.py").write_text(UPSTREAM)
        processes.append(subprocess.Popen([sys.executable, str(tmp / "upstream.py"), str(upstream_port)]))
        wait_port(upstream_port)
        results = [
            measure("direct", upstream_port, upstream_port, None, via_proxy=False,
                    connections=c, seconds=args.seconds)
            for c in counts
        ]  # fmt: skip

        bare_port = free_port()
        (tmp / "bare.py").write_text(BARE_MITMPROXY)
        bare = subprocess.Popen(
            [sys.executable, str(tmp / "bare.py"), str(bare_port), str(tmp / "bare-conf")]
        )
        processes.append(bare)
        wait_port(bare_port)
        results.extend(
            measure("bare mitmproxy", bare_port, upstream_port, bare.pid, via_proxy=True,
                    connections=c, seconds=args.seconds)
            for c in counts
        )  # fmt: skip
        bare.terminate()

        for durable in (True, False):
            sidecar, port = start_sidecar(tmp, durable=durable)
            processes.append(sidecar)
            label = (
                "vienna, T0, decision committed before forwarding"
                if durable
                else "vienna, T0, audit group-committed"
            )
            results.extend(
                measure(label, port, upstream_port, sidecar.pid, via_proxy=True,
                        connections=c, seconds=args.seconds)
                for c in counts
            )  # fmt: skip
            sidecar.terminate()
            sidecar.wait(15)
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    bare_by_count = {r.connections: r for r in results if r.name == "bare mitmproxy"}
    print(f"\nkeep-alive connections, {args.seconds:.0f} s each; latency over every request of the run\n")
    print("| path | connections | req/s | × bare mitmproxy | p50 ms | p99 ms | proxy CPU µs/req |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        cpu = f"{r.cpu_us_per_request:.0f}" if r.cpu_us_per_request is not None else "-"
        base = bare_by_count.get(r.connections)
        ratio = r.rps / base.rps if base is not None and base.rps else 0.0
        print(
            f"| {r.name} | {r.connections} | {r.rps:,.0f} | {ratio:.2f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | {cpu} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
