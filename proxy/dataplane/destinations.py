"""Where a request may go: names resolved once (the checked address is the one connected to), the sidecar's own listeners."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable
from pathlib import Path

import certifi
from cachetools import TTLCache

from policy.addresses import is_internal, parse_ip


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


class OwnListeners:
    """The sidecar's own listening sockets (proxy and API): a request to any of them is a loop.

    A listener bound to a wildcard address answers on every local address, so "is this address local"
    is asked of the kernel: only a local address can be bound to.
    """

    def __init__(self, listeners: Iterable[tuple[str, int]]) -> None:
        self._listeners: list[tuple[str, int]] = []
        for host, port in listeners:
            self._listeners.append((_canonical(host), port))
            if parse_ip(host.strip("[]")) is None and host not in _WILDCARDS:
                # A listener given by name (`--api localhost:9090`) answers on what the name resolves to.
                with contextlib.suppress(OSError):
                    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                        self._listeners.append((_canonical(str(info[4][0])), port))
        self._local: dict[str, bool] = {}

    def is_own(self, address: str, port: int) -> bool:
        canonical = _canonical(address)
        for host, listen_port in self._listeners:
            if port != listen_port:
                continue
            if host in _WILDCARDS:
                if self._is_local(canonical):
                    return True
            elif canonical == host:
                return True
        return False

    def _is_local(self, address: str) -> bool:
        known = self._local.get(address)
        if known is not None:
            return known
        ip = parse_ip(address)
        local = False
        if ip is not None:
            if ip.is_loopback or ip.is_unspecified:
                local = True
            else:
                family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
                with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.bind((str(ip), 0))
                    local = True
        if len(self._local) < 4096:
            self._local[address] = local
        return local


_WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 -- compared with, never bound


def _canonical(host: str) -> str:
    ip = parse_ip(host.strip("[]"))
    if ip is None:
        return host.lower()
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def upstream_ca_bundle(extra_ca_file: Path | None, data_dir: Path) -> Path | None:
    """mitmproxy trusts one bundle for upstream TLS: the public roots plus the operator's extra CA."""
    if extra_ca_file is None:
        return None
    bundle = data_dir / "upstream-ca-bundle.pem"
    text = Path(certifi.where()).read_text() + "\n" + extra_ca_file.read_text()
    bundle.write_text(text)
    return bundle
