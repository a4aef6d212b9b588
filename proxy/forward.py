"""Upstream forwarding: resolve and pin the checked address, send the normalised request, relay the answer."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import certifi
from aiohttp.abc import AbstractResolver, ResolveResult
from cachetools import TTLCache
from multidict import CIMultiDict
from yarl import URL

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
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "vienna-warrant"}


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
    """Resolves names once, caches briefly, and remembers which address was checked for each name.

    The connection is made to the remembered address (no second lookup), so a DNS answer that
    changes between the check and the connection (rebinding) cannot redirect it.
    """

    def __init__(self, *, ttl: float = 30.0) -> None:
        self._cache: TTLCache[tuple[str, int], tuple[str, ...]] = TTLCache(maxsize=4096, ttl=ttl)
        self.pinned: dict[tuple[str, int], str] = {}

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

    def pin(self, host: str, port: int, address: str) -> None:
        self.pinned[(host, port)] = address


class _PinnedResolver(AbstractResolver):
    def __init__(self, destinations: DestinationResolver) -> None:
        self._destinations = destinations

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self._destinations.pinned.get((host, port))
        if address is None:
            # Never look the name up again here: only a checked address may be used.
            raise OSError(f"no checked address for {host}:{port}")
        ip_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": ip_family,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def upstream_ssl_context(extra_ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    context.load_default_certs()
    if extra_ca_file is not None:
        context.load_verify_locations(cafile=str(extra_ca_file))
    return context


class Forwarder:
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
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=_PinnedResolver(self.destinations),
                ssl=self._ssl,
                limit=0,
                limit_per_host=0,
                use_dns_cache=False,
                keepalive_timeout=30,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: Request, headers: Iterable[tuple[str, str]]) -> Relayed:
        url = URL.build(
            scheme=request.scheme,
            host=request.host,
            port=request.port,
            path=request.path,
            query_string=request.query,
            encoded=True,
        )
        outgoing = forwarded_headers(headers)
        outgoing.append(("Host", request.authority))
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._connect_timeout,
            connect=self._connect_timeout,
            sock_read=self._response_timeout,
        )
        started = time.perf_counter()
        kwargs: dict[str, Any] = {}
        if request.body or request.method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
            kwargs["data"] = request.body
        try:
            async with asyncio.timeout(self._response_timeout + self._connect_timeout):
                async with self._client().request(
                    request.method,
                    url,
                    headers=CIMultiDict(outgoing),
                    allow_redirects=False,
                    timeout=timeout,
                    compress=None,
                    chunked=None,
                    **kwargs,
                ) as response:
                    body = await self._read_body(response)
                    relayed_headers = [
                        (k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in response.raw_headers
                        if k.decode("latin-1").lower() not in HOP_BY_HOP
                    ]
                    return Relayed(
                        status=response.status,
                        reason=response.reason or "",
                        headers=relayed_headers,
                        body=body,
                        seconds=time.perf_counter() - started,
                    )
        except TimeoutError as exc:
            raise UpstreamError(
                504, "upstream.timeout", f"upstream {request.authority} did not answer in time"
            ) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise UpstreamError(
                504, "upstream.timeout", f"upstream {request.authority} did not answer in time"
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise UpstreamError(502, "upstream.tls", f"TLS with {request.authority} failed: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                502, "upstream.unreachable", f"cannot connect to {request.authority}: {exc.strerror or exc}"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(
                502, "upstream.error", f"upstream {request.authority} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > self._max_response:
                raise UpstreamError(
                    502, "upstream.too_large", f"upstream response exceeds {self._max_response} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def forwarded_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    listed = list(headers)
    named_in_connection: set[str] = set()
    for key, value in listed:
        if key.lower() == "connection":
            named_in_connection.update(token.strip().lower() for token in value.split(","))
    return [
        (k, v) for k, v in listed if k.lower() not in NOT_FORWARDED and k.lower() not in named_in_connection
    ]
