"""Tests for policy.addresses: literal parsing, embedded IPv4 and address classes."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.addresses import AddressClass, classify_address, embedded_ipv4, is_internal, parse_ip

C = AddressClass


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("127.0.0.1", IPv4Address("127.0.0.1"), id="ipv4"),
        pytest.param("::1", IPv6Address("::1"), id="bare-ipv6"),
        pytest.param("[::1]", IPv6Address("::1"), id="bracketed-ipv6"),
        pytest.param("[2001:DB8::1]", IPv6Address("2001:db8::1"), id="upper-case-ipv6"),
        pytest.param("::ffff:127.0.0.1", IPv6Address("::ffff:7f00:1"), id="mapped-kept-as-ipv6"),
        pytest.param("example.com", None, id="name"),
        pytest.param("", None, id="empty"),
        pytest.param("127.1", None, id="short-ipv4-is-not-a-literal"),
        pytest.param("0x7f000001", None, id="hex-ipv4-is-not-a-literal"),
        pytest.param("01.2.3.4", None, id="leading-zero"),
        pytest.param("[127.0.0.1]", None, id="bracketed-ipv4"),
        pytest.param("[::1", None, id="unclosed-bracket"),
        pytest.param(" 127.0.0.1", None, id="whitespace"),
    ],
)
def test_parse_ip_accepts_only_canonical_literals(
    text: str, expected: IPv4Address | IPv6Address | None
) -> None:
    assert parse_ip(text) == expected


@pytest.mark.parametrize(
    ("ipv6", "expected"),
    [
        pytest.param("::ffff:169.254.169.254", "169.254.169.254", id="ipv4-mapped"),
        pytest.param("::ffff:7f00:1", "127.0.0.1", id="ipv4-mapped-hex"),
        pytest.param("::10.0.0.1", "10.0.0.1", id="ipv4-compatible"),
        pytest.param("::2", "0.0.0.2", id="ipv4-compatible-low"),
        pytest.param("64:ff9b::a9fe:a9fe", "169.254.169.254", id="nat64-well-known"),
        pytest.param("64:ff9b:1:2:3:4:7f00:1", "127.0.0.1", id="nat64-local-use"),
        pytest.param("2002:c0a8:0101::1", "192.168.1.1", id="6to4"),
        pytest.param("2002:0808:0808:ffff::", "8.8.8.8", id="6to4-public"),
        pytest.param("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45", id="teredo-rfc4380-example"),
        pytest.param("2001::ffff:ffff:80ff:fffe", "127.0.0.1", id="teredo-loopback-client"),
    ],
)
def test_embedded_ipv4_is_found(ipv6: str, expected: str) -> None:
    assert embedded_ipv4(IPv6Address(ipv6)) == IPv4Address(expected)


@pytest.mark.parametrize(
    "ipv6",
    [
        pytest.param("::", id="unspecified"),
        pytest.param("::1", id="loopback"),
        pytest.param("2001:db8::1", id="documentation"),
        pytest.param("2606:4700::1111", id="global-unicast"),
        pytest.param("fe80::1", id="link-local"),
        pytest.param("::ffff:0:0:1", id="siit-translated-is-not-looked-through"),
        pytest.param("64:ff9b:2::7f00:1", id="outside-nat64-local-use"),
    ],
)
def test_embedded_ipv4_is_none_without_an_embedding(ipv6: str) -> None:
    assert embedded_ipv4(IPv6Address(ipv6)) is None


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        pytest.param("8.8.8.8", C.PUBLIC, id="public-ipv4"),
        pytest.param("1.1.1.1", C.PUBLIC, id="public-ipv4-2"),
        pytest.param("172.32.0.1", C.PUBLIC, id="just-above-172-16-12"),
        pytest.param("100.128.0.1", C.PUBLIC, id="just-above-cgnat"),
        pytest.param("127.0.0.1", C.LOOPBACK, id="loopback"),
        pytest.param("127.255.255.254", C.LOOPBACK, id="loopback-range"),
        pytest.param("10.1.2.3", C.PRIVATE, id="rfc1918-10"),
        pytest.param("172.16.0.1", C.PRIVATE, id="rfc1918-172-low"),
        pytest.param("172.31.255.255", C.PRIVATE, id="rfc1918-172-high"),
        pytest.param("192.168.1.1", C.PRIVATE, id="rfc1918-192"),
        pytest.param("169.254.169.254", C.LINK_LOCAL, id="cloud-metadata"),
        pytest.param("100.64.0.1", C.CGNAT, id="cgnat-low"),
        pytest.param("100.127.255.255", C.CGNAT, id="cgnat-high"),
        pytest.param("0.0.0.0", C.UNSPECIFIED, id="ipv4-unspecified"),
        pytest.param("0.1.2.3", C.RESERVED, id="this-network"),
        pytest.param("192.0.0.8", C.RESERVED, id="ietf-protocol-assignments"),
        pytest.param("192.0.2.1", C.RESERVED, id="test-net-1"),
        pytest.param("198.51.100.1", C.RESERVED, id="test-net-2"),
        pytest.param("203.0.113.1", C.RESERVED, id="test-net-3"),
        pytest.param("198.18.0.1", C.RESERVED, id="benchmarking"),
        pytest.param("198.19.255.255", C.RESERVED, id="benchmarking-high"),
        pytest.param("192.88.99.1", C.RESERVED, id="6to4-relay-anycast"),
        pytest.param("224.0.0.1", C.MULTICAST, id="ipv4-multicast"),
        pytest.param("239.255.255.250", C.MULTICAST, id="ssdp-multicast"),
        pytest.param("240.0.0.1", C.RESERVED, id="class-e"),
        pytest.param("255.255.255.255", C.RESERVED, id="broadcast"),
        pytest.param("2606:4700::1111", C.PUBLIC, id="public-ipv6"),
        pytest.param("2001:4860:4860::8888", C.PUBLIC, id="public-ipv6-2"),
        pytest.param("::1", C.LOOPBACK, id="ipv6-loopback"),
        pytest.param("[::1]", C.LOOPBACK, id="bracketed-ipv6-loopback"),
        pytest.param("::", C.UNSPECIFIED, id="ipv6-unspecified"),
        pytest.param("fe80::1", C.LINK_LOCAL, id="ipv6-link-local"),
        pytest.param("febf::1", C.LINK_LOCAL, id="ipv6-link-local-high"),
        pytest.param("fc00::1", C.UNIQUE_LOCAL, id="ula-fc"),
        pytest.param("fd12:3456::1", C.UNIQUE_LOCAL, id="ula-fd"),
        pytest.param("fec0::1", C.RESERVED, id="site-local"),
        pytest.param("ff02::1", C.MULTICAST, id="ipv6-multicast"),
        pytest.param("2001:db8::1", C.RESERVED, id="ipv6-documentation"),
        pytest.param("3fff::1", C.RESERVED, id="ipv6-documentation-3fff"),
        pytest.param("100::1", C.RESERVED, id="discard-only"),
        pytest.param("2001:2::1", C.RESERVED, id="ipv6-benchmarking"),
        pytest.param("::ffff:0:a00:1", C.RESERVED, id="siit-translated"),
        pytest.param("4000::1", C.RESERVED, id="outside-global-unicast"),
        pytest.param("::ffff:169.254.169.254", C.LINK_LOCAL, id="mapped-metadata"),
        pytest.param("::ffff:8.8.8.8", C.PUBLIC, id="mapped-public"),
        pytest.param("::127.0.0.1", C.LOOPBACK, id="compatible-loopback"),
        pytest.param("64:ff9b::10.0.0.1", C.PRIVATE, id="nat64-private"),
        pytest.param("64:ff9b::8.8.8.8", C.PUBLIC, id="nat64-public"),
        pytest.param("64:ff9b:1::a9fe:a9fe", C.LINK_LOCAL, id="nat64-local-use-metadata"),
        pytest.param("2002:7f00:1::", C.LOOPBACK, id="6to4-loopback"),
        pytest.param("2002:6440:1::1", C.CGNAT, id="6to4-cgnat"),
        pytest.param("2001::ffff:ffff:f5ff:fffe", C.PRIVATE, id="teredo-private-client"),
        pytest.param("2001:5::1", C.RESERVED, id="ietf-protocol-assignment-v6"),
    ],
)
def test_address_is_classified(address: str, expected: AddressClass) -> None:
    assert classify_address(address) is expected
    assert is_internal(address) is (expected is not C.PUBLIC)


def test_classify_accepts_address_objects() -> None:
    assert classify_address(IPv4Address("10.0.0.1")) is C.PRIVATE
    assert classify_address(IPv6Address("fe80::1%eth0")) is C.LINK_LOCAL


@pytest.mark.parametrize("text", ["example.com", "127.1", "", "[127.0.0.1]"])
def test_classify_refuses_text_that_is_not_an_ip_literal(text: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        classify_address(text)


@given(st.ip_addresses())
def test_classify_never_raises_on_any_address(ip: IPv4Address | IPv6Address) -> None:
    assert classify_address(ip) in set(AddressClass)
    assert classify_address(str(ip)) is classify_address(ip)


_INTERNAL_IPV4_NETWORKS = [
    IPv4Network(network)
    for network in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]

_INTERNAL_IPV4 = st.sampled_from(_INTERNAL_IPV4_NETWORKS).flatmap(
    lambda network: st.ip_addresses(network=network)
)


def _wrappings(ipv4: IPv4Address) -> dict[str, IPv6Address]:
    value = int(ipv4)
    return {
        "mapped": IPv6Address((0xFFFF << 32) | value),
        "nat64": IPv6Address((0x64FF9B << 96) | value),
        "nat64-local-use": IPv6Address((0x64FF9B0001 << 80) | value),
        "6to4": IPv6Address((0x2002 << 112) | (value << 80) | 1),
        "teredo": IPv6Address((0x20010000 << 96) | (value ^ 0xFFFFFFFF)),
    }


@given(_INTERNAL_IPV4)
def test_internal_ipv4_stays_internal_when_wrapped_in_ipv6(ip: IPv4Address | IPv6Address) -> None:
    assert isinstance(ip, IPv4Address)
    assert is_internal(ip)
    for form, wrapped in _wrappings(ip).items():
        assert embedded_ipv4(wrapped) == ip, form
        assert classify_address(wrapped) is classify_address(ip), form
