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
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from mitmproxy import connection, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ProxyMode

from proxy.dataplane.addon import EnforcementAddon
from proxy.dataplane.destinations import DestinationResolver
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


# --- DNS rebinding, against the real addon, resolver and address pins ------------------------------

PUBLIC = "93.184.216.34"  # any public address: never contacted, the test stops at the connect hook


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
    sidecar.destinations = DestinationResolver(ttl=0.001)
    yield sidecar
    sidecar.store.close()


def _flow(url: str, client: connection.Client | None = None) -> http.HTTPFlow:
    # mitmproxy.test.tflow would do, but importing it drags in ldap3, which warns at import time.
    client = client or connection.Client(
        peername=("127.0.0.1", 40000),
        sockname=("127.0.0.1", 8080),
        timestamp_start=0.0,
        proxy_mode=ProxyMode.parse("regular"),
    )
    flow = http.HTTPFlow(client, connection.Server(address=None))
    flow.request = http.Request.make("GET", url)
    return flow


def _addon(sidecar: RunningSidecar) -> EnforcementAddon:
    addon = EnforcementAddon(sidecar)
    options = SimpleNamespace(update=lambda **_: None)
    addon.load(cast(Loader, SimpleNamespace(master=SimpleNamespace(options=options))))  # as mitmproxy would
    return addon


async def _through_addon(addon: EnforcementAddon, flow: http.HTTPFlow) -> http.Response | None:
    """The hooks mitmproxy runs before it connects; None when the request is handed on to forward."""
    await addon.requestheaders(flow)
    await addon.request(flow)
    return flow.response


def _connect(addon: EnforcementAddon, flow: http.HTTPFlow) -> connection.Server:
    """What mitmproxy does next: open a server connection to the request's host, via the connect hook."""
    server = connection.Server(address=(flow.request.host, flow.request.port))
    addon.pins.server_connect(server_hooks.ServerConnectionHookData(server=server, client=flow.client_conn))
    return server


def _reason_code(response: http.Response) -> str:
    code: str = json.loads(response.content or b"{}")["reason_code"]
    return code


async def test_dns_rebinding_public_then_private_connects_only_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch, in_process: RunningSidecar, upstream: Upstream
) -> None:
    rebinder = Rebinder([[PUBLIC], ["127.0.0.1"]])
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", rebinder.getaddrinfo)
    addon = _addon(in_process)
    first = _flow(f"http://rebind.test:{upstream.port}/a")
    assert await _through_addon(addon, first) is None  # allowed: handed to mitmproxy to forward
    assert rebinder.lookups == ["rebind.test"]
    server = _connect(addon, first)
    assert server.error is None
    assert server.address == (PUBLIC, upstream.port)  # connects to the checked number, not the name
    assert first.request.host == "rebind.test"  # the name stays for SNI and Host

    await asyncio.sleep(0.01)  # the cached answer expires; the name now resolves to loopback
    second = _flow(f"http://rebind.test:{upstream.port}/again", client=first.client_conn)
    refused = await _through_addon(addon, second)
    assert refused is not None
    assert (refused.status_code, _reason_code(refused)) == (403, "destination.internal")
    assert rebinder.lookups == ["rebind.test", "rebind.test"]
    # the pin still holds the address that was checked: a reused connection can only go there
    assert addon.pins.pinned(first.client_conn, "rebind.test", upstream.port) == PUBLIC


async def test_a_connection_nobody_decided_is_refused_at_connect(
    in_process: RunningSidecar, upstream: Upstream
) -> None:
    addon = _addon(in_process)
    server = _connect(addon, _flow(f"http://never-decided.test:{upstream.port}/x"))
    assert server.error is not None and "no checked address" in server.error
    assert server.address == ("never-decided.test", upstream.port)


async def test_dns_answer_mixing_public_and_private_is_refused(
    monkeypatch: pytest.MonkeyPatch, in_process: RunningSidecar, upstream: Upstream
) -> None:
    rebinder = Rebinder([[PUBLIC, "10.1.2.3"]])
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", rebinder.getaddrinfo)
    addon = _addon(in_process)
    flow = _flow(f"http://mixed.test:{upstream.port}/x")
    response = await _through_addon(addon, flow)
    assert response is not None
    assert (response.status_code, _reason_code(response)) == (403, "destination.internal")
    assert _connect(addon, flow).error is not None


async def test_dns_answer_of_metadata_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, in_process: RunningSidecar, upstream: Upstream
) -> None:
    rebinder = Rebinder([["169.254.169.254"]])
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", rebinder.getaddrinfo)
    addon = _addon(in_process)
    flow = _flow(f"http://innocent.example:{upstream.port}/x")
    response = await _through_addon(addon, flow)
    assert response is not None
    assert (response.status_code, _reason_code(response)) == (403, "destination.internal")
    assert _connect(addon, flow).error is not None


def test_resolver_prefers_the_internal_answer_so_a_mixed_answer_is_checked_as_internal() -> None:
    assert DestinationResolver.choose([PUBLIC, "192.168.0.10", "8.8.8.8"]) == "192.168.0.10"
    assert DestinationResolver.choose(["::ffff:127.0.0.1", PUBLIC]) == "::ffff:127.0.0.1"
    assert DestinationResolver.choose([PUBLIC, "8.8.8.8"]) == PUBLIC
