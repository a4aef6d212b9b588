"""Upstream forwarding: a small keep-alive HTTP/1.1 client that connects only to the checked address."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import certifi
from cachetools import TTLCache

from policy.addresses import is_internal, parse_ip
from policy.model import Request

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "vienna-warrant", "expect"}
_MAX_HEAD = 64 * 1024
_MAX_IDLE_PER_KEY = 32
_IDLE_SECONDS = 30.0
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
_UNSAFE_IN_HEAD = re.compile(r"[\r\n\x00]")


class UpstreamError(Exception):
    """The upstream could not be reached or answered badly: `status` is 502 or 504."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Relayed:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    seconds: float


class DestinationResolver:
    """Resolves names once and caches briefly; the caller checks the chosen address and connects to it."""

    def __init__(self, *, ttl: float = 30.0) -> None:
        self._cache: TTLCache[tuple[str, int], tuple[str, ...]] = TTLCache(maxsize=4096, ttl=ttl)

    async def lookup(self, host: str, port: int) -> tuple[str, ...]:
        if parse_ip(host) is not None:
            return (host,)
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise OSError(f"{host} has no address")
        self._cache[key] = addresses
        return addresses

    @staticmethod
    def choose(addresses: Iterable[str]) -> str:
        """The address to check and connect to: an internal one wins, so a mixed answer is refused."""
        listed = list(addresses)
        for address in listed:
            if is_internal(address):
                return address
        return listed[0]


def upstream_ssl_context(extra_ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    context.load_default_certs()
    if extra_ca_file is not None:
        context.load_verify_locations(cafile=str(extra_ca_file))
    return context


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def usable(self, now: float) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and now - self.idle_since < _IDLE_SECONDS
        )

    def close(self) -> None:
        self.writer.close()


_PoolKey = tuple[str, str, int, str]  # scheme, address, port, server name


class Forwarder:
    """Sends one normalised request to `request.address` (never looked up again) and reads the answer."""

    def __init__(
        self,
        destinations: DestinationResolver,
        *,
        ssl_context: ssl.SSLContext,
        connect_timeout: float,
        response_timeout: float,
        max_response_bytes: int,
    ) -> None:
        self.destinations = destinations
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._response_timeout = response_timeout
        self._max_response = max_response_bytes
        self._idle: dict[_PoolKey, deque[_Connection]] = {}

    async def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def send(self, request: Request, headers: Iterable[tuple[str, str]]) -> Relayed:
        if request.address is None:
            raise UpstreamError(502, "upstream.unresolved", f"no checked address for {request.host}")
        key: _PoolKey = (request.scheme, request.address, request.port, request.host)
        head = _request_head(request, headers)
        started = time.perf_counter()
        for attempt in (1, 2):
            connection, reused = await self._acquire(key)
            try:
                async with asyncio.timeout(self._response_timeout):
                    connection.writer.write(head + request.body if request.body else head)
                    status, reason, response_headers, body, keep = await self._read_response(
                        connection, request
                    )
            except TimeoutError:
                connection.close()
                raise UpstreamError(
                    504,
                    "upstream.timeout",
                    f"upstream {request.authority} did not answer in {self._response_timeout:g}s",
                ) from None
            except UpstreamError:
                connection.close()
                raise
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                connection.close()
                # A kept-alive connection the server closed meanwhile: retry once, but only when
                # repeating the request cannot repeat a side effect.
                if reused and attempt == 1 and request.method in _RETRYABLE:
                    continue
                raise UpstreamError(
                    502, "upstream.error", f"upstream {request.authority} failed: {type(exc).__name__}: {exc}"
                ) from None
            if keep:
                self._release(key, connection)
            else:
                connection.close()
            return Relayed(status, reason, response_headers, body, time.perf_counter() - started)
        raise UpstreamError(502, "upstream.error", f"upstream {request.authority} failed")  # pragma: no cover

    async def _acquire(self, key: _PoolKey) -> tuple[_Connection, bool]:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now):
                return connection, True
            connection.close()
        scheme, address, port, server_name = key
        tls = scheme == "https"
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    address,
                    port,
                    ssl=self._ssl if tls else None,
                    server_hostname=server_name if tls else None,
                    limit=_MAX_HEAD,
                )
        except TimeoutError:
            raise UpstreamError(
                504, "upstream.connect_timeout", f"connecting to {server_name}:{port} timed out"
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamError(
                502, "upstream.tls", f"TLS with {server_name}:{port} failed: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            raise UpstreamError(
                502, "upstream.unreachable", f"cannot connect to {server_name}:{port}: {exc.strerror or exc}"
            ) from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer), False

    def _release(self, key: _PoolKey, connection: _Connection) -> None:
        idle = self._idle.setdefault(key, deque())
        if len(idle) >= _MAX_IDLE_PER_KEY:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def _read_response(
        self, connection: _Connection, request: Request
    ) -> tuple[int, str, list[tuple[str, str]], bytes, bool]:
        reader = connection.reader
        while True:
            raw = await reader.readuntil(b"\r\n\r\n")
            version, status, reason, headers = _parse_head(raw)
            if not 100 <= status < 200 or status == 101:
                break
        if status == 101:
            raise UpstreamError(
                502, "upstream.upgrade", "the upstream switched protocols; upgrades are not relayed"
            )
        lowered = [(k.lower(), v) for k, v in headers]
        connection_tokens = {t.strip().lower() for k, v in lowered if k == "connection" for t in v.split(",")}
        keep = (version == "HTTP/1.1" and "close" not in connection_tokens) or (
            version == "HTTP/1.0" and "keep-alive" in connection_tokens
        )
        codings = [t.strip().lower() for k, v in lowered if k == "transfer-encoding" for t in v.split(",")]
        lengths = {v.strip() for k, v in lowered if k == "content-length"}
        if request.method == "HEAD" or status in (204, 304):
            body = b""
        elif codings:
            if codings[-1] != "chunked":
                body, keep = await self._read_to_eof(reader), False
            else:
                body = await self._read_chunked(reader)
        elif lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise UpstreamError(
                    502, "upstream.bad_response", "the upstream sent conflicting Content-Length"
                )
            length = int(next(iter(lengths)))
            if length > self._max_response:
                raise UpstreamError(
                    502, "upstream.too_large", f"upstream response exceeds {self._max_response} bytes"
                )
            body = await reader.readexactly(length)
        else:
            body, keep = await self._read_to_eof(reader), False
        relayed = [
            (k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in connection_tokens
        ]
        return status, reason, relayed, body, keep

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            text = line[:-2].split(b";", 1)[0].strip()
            if not text or any(c not in b"0123456789abcdefABCDEF" for c in text) or len(text) > 16:
                raise UpstreamError(502, "upstream.bad_response", "the upstream sent a malformed chunk size")
            chunk_size = int(text, 16)
            if chunk_size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers are dropped
                    pass
                return b"".join(chunks)
            size += chunk_size
            if size > self._max_response:
                raise UpstreamError(
                    502, "upstream.too_large", f"upstream response exceeds {self._max_response} bytes"
                )
            chunks.append(await reader.readexactly(chunk_size))
            if await reader.readexactly(2) != b"\r\n":
                raise UpstreamError(502, "upstream.bad_response", "the upstream sent a malformed chunk")

    async def _read_to_eof(self, reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := await reader.read(65536):
            size += len(chunk)
            if size > self._max_response:
                raise UpstreamError(
                    502, "upstream.too_large", f"upstream response exceeds {self._max_response} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _parse_head(raw: bytes) -> tuple[str, int, str, list[tuple[str, str]]]:
    lines = raw[:-4].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise UpstreamError(
            502, "upstream.bad_response", f"the upstream sent a malformed status line {lines[0][:80]!r}"
        )
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise UpstreamError(502, "upstream.bad_response", "the upstream sent a malformed header line")
        headers.append((name, value.strip(" \t")))
    return version, int(code), reason, headers


def _request_head(request: Request, headers: Iterable[tuple[str, str]]) -> bytes:
    target = request.path + (f"?{request.query}" if request.query else "")
    lines = [f"{request.method} {target} HTTP/1.1", f"Host: {request.authority}"]
    for key, value in forwarded_headers(headers):
        if _UNSAFE_IN_HEAD.search(key) or _UNSAFE_IN_HEAD.search(value):
            # Normalisation refuses these; a CR or LF written here would start a header of its own.
            raise ValueError(f"header {key[:40]!r} cannot be written safely")
        lines.append(f"{key}: {value}")
    if request.body or request.method not in _BODYLESS_METHODS:
        lines.append(f"Content-Length: {len(request.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def forwarded_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    listed = list(headers)
    named_in_connection: set[str] = set()
    for key, value in listed:
        if key.lower() == "connection":
            named_in_connection.update(token.strip().lower() for token in value.split(","))
    return [
        (k, v) for k, v in listed if k.lower() not in NOT_FORWARDED and k.lower() not in named_in_connection
    ]
