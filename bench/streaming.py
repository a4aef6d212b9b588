"""Streaming, memory and reloads, in one run: the sidecar beside a direct connection and bare mitmproxy.

usage: python bench/streaming.py [--gigabytes 1] [--parallel-mb 200] [--rules 10000]

- time to the first SSE event (the upstream sends one every 200 ms), median of 20, per path;
- peak RSS of the proxy process above idle while one client downloads `--gigabytes` GB, and while
  three download `--parallel-mb` MB at once; RSS once they are done;
- the longest gap between T0 answers (a client asking back-to-back) while the sidecar reloads a
  policy of `--rules` rules, and how long that reload took.
Prints markdown tables. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.proxy import BARE_MITMPROXY, POLICY, free_port, launch_sidecar, wait_port

UPSTREAM = """\
import asyncio, sys
from aiohttp import web

async def sse(request):
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for index in range(3):
        await response.write(f"data: {index}\\n\\n".encode())
        await asyncio.sleep(0.2)
    await response.write_eof()
    return response

async def big(request):
    size = int(request.query["bytes"])
    response = web.StreamResponse(headers={"Content-Length": str(size)})
    await response.prepare(request)
    block = b"b" * 262144
    sent = 0
    while sent < size:
        piece = block[: size - sent]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response

async def ok(request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_get("/sse", sse)
app.router.add_get("/big", big)
app.router.add_get("/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def first_event_ms(proxy_port: int | None, upstream_port: int) -> float:
    port = proxy_port or upstream_port
    target = f"http://127.0.0.1:{upstream_port}/sse" if proxy_port else "/sse"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{upstream_port}\r\nConnection: close\r\n\r\n".encode()
    )
    buffer = b""
    while b"data: 0" not in buffer:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buffer += chunk
    elapsed = (time.perf_counter() - started) * 1000
    writer.close()
    return elapsed


def download(proxy_port: int, upstream_port: int, size: int) -> int:
    url = f"http://127.0.0.1:{upstream_port}/big?bytes={size}"
    with socket.create_connection(("127.0.0.1", proxy_port)) as sock:
        sock.sendall(
            f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{upstream_port}\r\nConnection: close\r\n\r\n".encode()
        )
        received = 0
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
        return received


def peak_during(pid: int, work: list[threading.Thread]) -> int:
    peak = rss(pid)
    for thread in work:
        thread.start()
    while any(thread.is_alive() for thread in work):
        peak = max(peak, rss(pid))
        time.sleep(0.02)
    return peak


def start_sidecar(tmp: Path, policy: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    return launch_sidecar(policy, tmp / "data", tmp / "vienna.log", ["--audit-stdout", "false"])


def big_policy(rules: int) -> str:
    lines = [POLICY.rstrip()]
    for i in range(rules):
        lines += [
            f"  - id: filler-{i}",
            f'    match: {{hosts: [h{i}.example.com], methods: [GET], paths: ["/a/{{x}}/b{i}"]}}',
            f"    action: filler.r{i}",
            "    tier: T1",
        ]
    return "\n".join(lines) + "\n"


def reloads(api: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{api}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('vienna_policy_reloads_total{result="success"}'):
                return float(line.split()[-1])
    return 0.0


async def gap_during_reload(
    proc: subprocess.Popen[bytes], port: int, api: int, upstream_port: int, policy: Path, rules: int
) -> tuple[float, float]:
    """Back-to-back T0 requests on one connection while the reload runs; a separate task (on its own
    connection) watches the reload counter, so polling it never counts as a gap."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET http://127.0.0.1:{upstream_port}/t0 HTTP/1.1\r\nHost: 127.0.0.1:{upstream_port}\r\n\r\n".encode()
    before = reloads(api)
    done = asyncio.Event()
    finished: list[float] = []

    async def watch() -> None:
        while not done.is_set():
            if await asyncio.to_thread(reloads, api) > before:
                finished.append(time.perf_counter())
                done.set()
            await asyncio.sleep(0.05)

    policy.write_text(big_policy(rules))
    started = time.perf_counter()
    proc.send_signal(signal.SIGHUP)
    watcher = asyncio.create_task(watch())
    longest, last = 0.0, time.perf_counter()
    while not done.is_set() and time.perf_counter() - started < 120:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")),
            0,
        )
        await reader.readexactly(length)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    done.set()
    await watcher
    writer.close()
    return longest * 1000, (finished[0] if finished else time.perf_counter()) - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--parallel-mb", type=int, default=200)
    parser.add_argument("--rules", type=int, default=10_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vienna-bench-stream-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upstream_port = free_port()
        (tmp / "upstream.py").write_text(UPSTREAM)
        processes.append(
            subprocess.Popen(
                [sys.executable, str(tmp / "upstream.py"), str(upstream_port)], stderr=subprocess.DEVNULL
            )
        )
        wait_port(upstream_port)
        bare_port = free_port()
        (tmp / "bare.py").write_text(BARE_MITMPROXY)
        bare = subprocess.Popen(
            [sys.executable, str(tmp / "bare.py"), str(bare_port), str(tmp / "bare-conf")]
        )
        processes.append(bare)
        wait_port(bare_port)
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        sidecar, port, api = start_sidecar(tmp, policy)
        processes.append(sidecar)

        print("\n| path | first SSE event, median of 20 (ms) | added over direct (ms) |\n|---|---|---|")
        direct = statistics.median(asyncio.run(first_event_ms(None, upstream_port)) for _ in range(20))
        print(f"| direct | {direct:.2f} | - |")
        for name, proxy in (("bare mitmproxy (buffers the response)", bare_port), ("vienna sidecar", port)):
            value = statistics.median(asyncio.run(first_event_ms(proxy, upstream_port)) for _ in range(20))
            print(f"| {name} | {value:.2f} | {value - direct:+.2f} |")

        time.sleep(1)
        idle = rss(sidecar.pid)
        size = int(args.gigabytes * (1 << 30))
        one = peak_during(sidecar.pid, [threading.Thread(target=download, args=(port, upstream_port, size))])
        part = args.parallel_mb << 20
        three = peak_during(
            sidecar.pid,
            [threading.Thread(target=download, args=(port, upstream_port, part)) for _ in range(3)],
        )
        time.sleep(2)
        after = rss(sidecar.pid)
        mib = 1 << 20
        print("\n| sidecar RSS | MiB | above idle (MiB) |\n|---|---|---|")
        print(f"| idle | {idle / mib:.1f} | - |")
        print(f"| peak, one {args.gigabytes:g} GB download | {one / mib:.1f} | {(one - idle) / mib:+.1f} |")
        print(
            f"| peak, three {args.parallel_mb} MB downloads at once | {three / mib:.1f} | {(three - idle) / mib:+.1f} |"
        )
        print(f"| after them | {after / mib:.1f} | {(after - idle) / mib:+.1f} |")

        gap_ms, reload_s = asyncio.run(
            gap_during_reload(sidecar, port, api, upstream_port, policy, args.rules)
        )
        print(f"\n| reload of {args.rules:,} rules | value |\n|---|---|")
        print(f"| reload took (s) | {reload_s:.2f} |")
        print(f"| longest gap between T0 answers meanwhile (ms) | {gap_ms:.1f} |")
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
