"""Internal destinations: loopback, private, link-local (cloud metadata), CGNAT, ULA and their IPv6 wrappings.

The `open` sidecar has only wildcard and any-host rules, so none of these is named and all must be
refused with `destination.internal`, whatever the spelling. DNS rebinding is tested against the real
addon and resolver in-process, with a resolver that changes its answer: the connection goes to the
address that was checked, never to a second lookup's. Redirects are relayed untouched; the follow-up
is a request of its own, classified on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from mitmproxy import connection, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import ProxyMode

from proxy.addon import EnforcementAddon
from proxy.forward import DestinationResolver
from proxy.settings import add_run_flags, resolve_settings
from tests.security.conftest import OPEN_POLICY
from tests.security.support import (
    METADATA_PATH,
    Sidecar,
    Upstream,
    assert_refused,
    connect_tunnel,
    one,
    raw_request,
    unique,
)

with warnings.catch_warnings():
    # proxy.runtime imports mitmproxy.addons, which imports ldap3, which warns about pyasn1 at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from proxy.runtime import Sidecar as RunningSidecar
    from proxy.runtime import build_sidecar

INTERNAL_HOSTS = [
    pytest.param("localhost", id="localhost"),
    pytest.param("LOCALHOST", id="localhost-upper"),
    pytest.param("localhost.", id="localhost-trailing-dot"),
    pytest.param("127.0.0.1", id="loopback"),
    pytest.param("127.1", id="loopback-short"),
    pytest.param("2130706433", id="loopback-decimal"),
    pytest.param("0x7f000001", id="loopback-hex"),
    pytest.param("0177.0.0.01", id="loopback-octal"),
    pytest.param("127.255.255.254", id="loopback-other"),
    pytest.param("[::1]", id="ipv6-loopback"),
    pytest.param("[::ffff:127.0.0.1]", id="ipv4-mapped-loopback"),
    pytest.param("[::127.0.0.1]", id="ipv4-compatible-loopback"),
    pytest.param("0.0.0.0", id="unspecified"),
    pytest.param("0", id="unspecified-short"),
    pytest.param("10.0.0.1", id="rfc1918-10"),
    pytest.param("172.16.5.4", id="rfc1918-172"),
    pytest.param("192.168.1.1", id="rfc1918-192"),
    pytest.param("169.254.169.254", id="cloud-metadata"),
    pytest.param("0xa9fea9fe", id="cloud-metadata-hex"),
    pytest.param("[::ffff:a9fe:a9fe]", id="cloud-metadata-ipv4-mapped"),
    pytest.param("[64:ff9b::a9fe:a9fe]", id="cloud-metadata-nat64"),
    pytest.param("[2002:a9fe:a9fe::1]", id="cloud-metadata-6to4"),
    pytest.param("100.64.0.1", id="cgnat"),
    pytest.param("100.100.100.200", id="alibaba-metadata-cgnat"),
    pytest.param("[fd00:ec2::254]", id="aws-metadata-ipv6-ula"),
    pytest.param("[fe80::1]", id="ipv6-link-local"),
    pytest.param("198.18.0.1", id="benchmarking-range"),
    pytest.param("224.0.0.1", id="multicast"),
    pytest.param("255.255.255.255", id="broadcast"),
]


@pytest.mark.parametrize("host", INTERNAL_HOSTS)
def test_internal_destination_is_refused_when_no_rule_names_it(
    open_sidecar: Sidecar, upstream: Upstream, host: str
) -> None:
    marker = unique("i")
    answer = one(open_sidecar.exchange(raw_request("GET", f"{host}:{upstream.port}", f"/{marker}")))
    assert_refused(answer, 403, "destination.internal", "denied")
    assert not upstream.seen_containing(marker)


def test_wildcard_write_rule_does_not_open_loopback(open_sidecar: Sidecar, upstream: Upstream) -> None:
    marker = unique("i")
    request = raw_request("POST", f"localhost:{upstream.port}", f"/{marker}", body=b"x=1")
    assert_refused(one(open_sidecar.exchange(request)), 403, "destination.internal", "denied")
    assert not upstream.seen_containing(marker)


def test_metadata_name_under_a_wildcard_deny_rule_is_denied(open_sidecar: Sidecar) -> None:
    answer = one(open_sidecar.exchange(raw_request("GET", "metadata.google.internal", METADATA_PATH)))
    assert_refused(answer, 403, "policy.deny", "denied")


@pytest.mark.parametrize(
    "target", ["localhost:443", "169.254.169.254:443", "[::1]:443", "10.0.0.1:443", "2130706433:443"]
)
def test_connect_to_an_internal_destination_is_refused_before_the_tunnel(
    open_sidecar: Sidecar, target: str
) -> None:
    tunnel, refusal = connect_tunnel(
        open_sidecar.proxy_port, target, ca_file=open_sidecar.ca_file, server_name=None
    )
    assert tunnel is None and refusal is not None
    assert_refused(refusal, 403, "destination.internal", "denied")


def test_naming_one_loopback_address_opens_only_that_one(main: Sidecar, upstream: Upstream) -> None:
    """`main` names 127.0.0.1; 127.0.0.2 and ::1 stay closed."""
    for host in ("127.0.0.2", "[::1]"):
        answer = one(main.exchange(raw_request("GET", f"{host}:{upstream.port}", "/ok")))
        assert_refused(answer, 403, "destination.internal", "denied")


# --- redirects --------------------------------------------------------------------------------------


def test_redirect_to_metadata_is_relayed_untouched_and_the_follow_up_refused(
    main: Sidecar, upstream: Upstream
) -> None:
    relayed = main.proxied.get(upstream.url("/redirect/internal"), allow_redirects=False, timeout=10)
    assert (relayed.status_code, relayed.headers["Vienna-Decision"]) == (302, "allow")
    assert relayed.headers["Location"] == f"http://169.254.169.254{METADATA_PATH}"
    followed = main.proxied.get(upstream.url("/redirect/internal"), allow_redirects=True, timeout=10)
    assert [r.status_code for r in followed.history] == [302]
    assert_refused(followed, 403, "policy.deny", "denied")


def test_redirect_to_a_private_address_is_relayed_and_the_follow_up_refused(
    main: Sidecar, upstream: Upstream
) -> None:
    relayed = main.proxied.get(upstream.url("/redirect/private"), allow_redirects=False, timeout=10)
    assert (relayed.status_code, relayed.headers["Location"]) == (302, "http://10.0.0.1/admin")
    followed = main.proxied.get(upstream.url("/redirect/private"), allow_redirects=True, timeout=10)
    assert_refused(followed, 403, "destination.internal", "denied")


# --- DNS rebinding, against the real addon, resolver and forwarder ----------------------------------

PUBLIC = "93.184.216.34"  # any public address: the forwarder's connection to it is redirected below


class Rebinder:
    """Stands in for the system resolver: answers from a script, one answer per lookup."""

    def __init__(self, answers: list[list[str]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def getaddrinfo(self, host: Any, port: Any, **_: Any) -> list[tuple[Any, ...]]:
        self.lookups.append(str(host))
        addresses = self.answers[min(len(self.lookups), len(self.answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses]


@pytest.fixture
def in_process(tmp_path: Path) -> Iterator[RunningSidecar]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(OPEN_POLICY)
    key = tmp_path / "warrant.key"
    key.write_text("k" * 64)
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    args = ["--policy", str(policy), "--data-dir", str(tmp_path / "data"), "--warrant-key-file", str(key)]
    settings = resolve_settings(
        parser.parse_args([*args, "--agent-id", "sec-agent", "--audit-stdout", "false"]), {}
    )
    sidecar = build_sidecar(settings)
    # A cache that forgets at once: every request looks the name up again, as after a short DNS TTL.
    sidecar.forwarder.destinations = DestinationResolver(ttl=0.001)
    yield sidecar
    sidecar.store.close()


@pytest.fixture
async def connections(
    monkeypatch: pytest.MonkeyPatch, upstream: Upstream, in_process: RunningSidecar
) -> AsyncIterator[list[tuple[str, int]]]:
    """Where the forwarder connects; a connection to PUBLIC is carried to the loopback upstream instead."""
    attempts: list[tuple[str, int]] = []
    real: Callable[..., Any] = asyncio.open_connection

    async def open_connection(host: str, port: int, **kwargs: Any) -> Any:
        if host == PUBLIC:
            attempts.append((host, port))
            return await real("127.0.0.1", upstream.port, **kwargs)
        if port != upstream.app_port:  # the upstream's own tap uses the real thing
            attempts.append((host, port))
        return await real(host, port, **kwargs)

    monkeypatch.setattr(asyncio, "open_connection", open_connection)
    yield attempts
    await in_process.forwarder.close()


def _flow(url: str) -> http.HTTPFlow:
    # mitmproxy.test.tflow would do, but importing it drags in ldap3, which warns at import time.
    client = connection.Client(
        peername=("127.0.0.1", 40000),
        sockname=("127.0.0.1", 8080),
        timestamp_start=0.0,
        proxy_mode=ProxyMode.parse("regular"),
    )
    flow = http.HTTPFlow(client, connection.Server(address=None))
    flow.request = http.Request.make("GET", url)
    return flow


async def _through_addon(sidecar: RunningSidecar, url: str) -> http.Response:
    addon = EnforcementAddon(sidecar)
    options = SimpleNamespace(update=lambda **_: None)
    addon.load(cast(Loader, SimpleNamespace(master=SimpleNamespace(options=options))))  # as mitmproxy would
    flow = _flow(url)
    addon.requestheaders(flow)
    await addon.request(flow)
    assert flow.response is not None
    return flow.response


def _reason_code(response: http.Response) -> str:
    code: str = json.loads(response.content or b"{}")["reason_code"]
    return code


async def test_dns_rebinding_public_then_private_connects_only_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch,
    in_process: RunningSidecar,
    connections: list[tuple[str, int]],
    upstream: Upstream,
) -> None:
    rebinder = Rebinder([[PUBLIC], ["127.0.0.1"]])
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", rebinder.getaddrinfo)
    marker = unique("rebind")

    first = await _through_addon(in_process, f"http://rebind.test:{upstream.port}/{marker}")
    assert first.status_code == 200, first.content
    assert rebinder.lookups == ["rebind.test"]  # one lookup per request: the forwarder never asks again
    assert connections == [(PUBLIC, upstream.port)]
    assert [s.header("host") for s in upstream.seen_containing(marker)] == [f"rebind.test:{upstream.port}"]

    await asyncio.sleep(0.01)  # the cached answer expires; the name now resolves to loopback
    second = await _through_addon(in_process, f"http://rebind.test:{upstream.port}/{marker}-again")
    assert (second.status_code, _reason_code(second)) == (403, "destination.internal")
    assert rebinder.lookups == ["rebind.test", "rebind.test"]
    assert connections == [(PUBLIC, upstream.port)]  # nothing was opened for the rebound answer
    assert not upstream.seen_containing(f"{marker}-again")


async def test_dns_answer_mixing_public_and_private_is_refused(
    monkeypatch: pytest.MonkeyPatch,
    in_process: RunningSidecar,
    connections: list[tuple[str, int]],
    upstream: Upstream,
) -> None:
    rebinder = Rebinder([[PUBLIC, "10.1.2.3"]])
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", rebinder.getaddrinfo)
    response = await _through_addon(in_process, f"http://mixed.test:{upstream.port}/x")
    assert (response.status_code, _reason_code(response)) == (403, "destination.internal")
    assert connections == []


async def test_dns_answer_of_metadata_address_is_refused(
    monkeypatch: pytest.MonkeyPatch,
    in_process: RunningSidecar,
    connections: list[tuple[str, int]],
    upstream: Upstream,
) -> None:
    rebinder = Rebinder([["169.254.169.254"]])
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", rebinder.getaddrinfo)
    response = await _through_addon(in_process, f"http://innocent.example:{upstream.port}/x")
    assert (response.status_code, _reason_code(response)) == (403, "destination.internal")
    assert connections == []


def test_resolver_prefers_the_internal_answer_so_a_mixed_answer_is_checked_as_internal() -> None:
    assert DestinationResolver.choose([PUBLIC, "192.168.0.10", "8.8.8.8"]) == "192.168.0.10"
    assert DestinationResolver.choose(["::ffff:127.0.0.1", PUBLIC]) == "::ffff:127.0.0.1"
    assert DestinationResolver.choose([PUBLIC, "8.8.8.8"]) == PUBLIC
