"""IP address classes (public or internal), looking through IPv4 addresses embedded in IPv6."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address


class AddressClass(StrEnum):
    """Where an address points; everything but `public` is internal."""

    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link_local"
    CGNAT = "cgnat"
    UNIQUE_LOCAL = "unique_local"
    UNSPECIFIED = "unspecified"
    MULTICAST = "multicast"
    RESERVED = "reserved"


_LOW32 = 0xFFFFFFFF

# First match wins, so narrower networks come before the wider ones that contain them.
_IPV4_CLASSES: tuple[tuple[IPv4Network, AddressClass], ...] = tuple(
    (IPv4Network(network), address_class)
    for network, address_class in (
        ("0.0.0.0/32", AddressClass.UNSPECIFIED),
        ("0.0.0.0/8", AddressClass.RESERVED),  # "this network"; Linux connects 0.x to the host itself
        ("10.0.0.0/8", AddressClass.PRIVATE),
        ("100.64.0.0/10", AddressClass.CGNAT),
        ("127.0.0.0/8", AddressClass.LOOPBACK),
        ("169.254.0.0/16", AddressClass.LINK_LOCAL),
        ("172.16.0.0/12", AddressClass.PRIVATE),
        ("192.0.0.0/24", AddressClass.RESERVED),  # IETF protocol assignments
        ("192.0.2.0/24", AddressClass.RESERVED),  # TEST-NET-1
        ("192.88.99.0/24", AddressClass.RESERVED),  # deprecated 6to4 relay anycast
        ("192.168.0.0/16", AddressClass.PRIVATE),
        ("198.18.0.0/15", AddressClass.RESERVED),  # benchmarking
        ("198.51.100.0/24", AddressClass.RESERVED),  # TEST-NET-2
        ("203.0.113.0/24", AddressClass.RESERVED),  # TEST-NET-3
        ("224.0.0.0/4", AddressClass.MULTICAST),
        ("255.255.255.255/32", AddressClass.RESERVED),  # limited broadcast
        ("240.0.0.0/4", AddressClass.RESERVED),
    )
)

# Consulted only after any embedded IPv4 address has been looked through.
_IPV6_CLASSES: tuple[tuple[IPv6Network, AddressClass], ...] = tuple(
    (IPv6Network(network), address_class)
    for network, address_class in (
        ("::/128", AddressClass.UNSPECIFIED),
        ("::1/128", AddressClass.LOOPBACK),
        ("::/8", AddressClass.RESERVED),  # the rest, e.g. SIIT's ::ffff:0:0:0/96, is never public
        ("100::/64", AddressClass.RESERVED),  # discard-only
        ("2001:db8::/32", AddressClass.RESERVED),  # documentation
        ("2001::/23", AddressClass.RESERVED),  # IETF protocol assignments (Teredo is looked through first)
        ("3fff::/20", AddressClass.RESERVED),  # documentation (RFC 9637)
        ("fc00::/7", AddressClass.UNIQUE_LOCAL),
        ("fe80::/10", AddressClass.LINK_LOCAL),
        ("fec0::/10", AddressClass.RESERVED),  # deprecated site-local
        ("ff00::/8", AddressClass.MULTICAST),
    )
)

# Only 2000::/3 is allocated for global unicast; anything else left unmatched is not routable.
_GLOBAL_UNICAST = IPv6Network("2000::/3")


def _last_32_bits(value: int) -> int:
    return value & _LOW32


def _six_to_four(value: int) -> int:
    # 2002:AABB:CCDD::/48 carries the IPv4 address in bits 16 to 48.
    return (value >> 80) & _LOW32


def _teredo_client(value: int) -> int:
    # Teredo stores the client's IPv4 address with every bit inverted.
    return (value & _LOW32) ^ _LOW32


_EMBEDDINGS: tuple[tuple[IPv6Network, Callable[[int], int]], ...] = tuple(
    (IPv6Network(network), extract)
    for network, extract in (
        ("::ffff:0:0/96", _last_32_bits),  # IPv4-mapped
        ("::/96", _last_32_bits),  # IPv4-compatible (deprecated, still routed by some stacks)
        ("64:ff9b::/96", _last_32_bits),  # NAT64 well-known prefix
        # RFC 8215 lets the operator pick the prefix length inside the /48; /96 is what is deployed.
        ("64:ff9b:1::/48", _last_32_bits),
        ("2002::/16", _six_to_four),
        ("2001::/32", _teredo_client),
    )
)

# `::` and `::1` sit inside ::/96 but are the IPv6 unspecified and loopback addresses themselves.
_NOT_COMPATIBLE = (IPv6Address("::"), IPv6Address("::1"))


def parse_ip(text: str) -> IPv4Address | IPv6Address | None:
    """The address `text` spells in canonical literal syntax (IPv6 may be bracketed), or None."""
    bracketed = text.startswith("[") and text.endswith("]")
    literal = text[1:-1] if bracketed else text
    try:
        address = ip_address(literal)
    except ValueError:
        return None
    if bracketed and isinstance(address, IPv4Address):
        return None
    return address


def embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through mapping, translation or tunnelling."""
    if ip in _NOT_COMPATIBLE:
        return None
    value = int(ip)
    for network, extract in _EMBEDDINGS:
        if ip in network:
            return IPv4Address(extract(value))
    return None


def _as_address(ip: str | IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    if not isinstance(ip, str):
        return ip
    address = parse_ip(ip)
    if address is None:
        raise ValueError(f"{ip!r} is not an IP address literal")
    return address


def classify_address(ip: str | IPv4Address | IPv6Address) -> AddressClass:
    """The class of `ip`; an IPv6 address carrying an IPv4 address gets the class of that IPv4 address."""
    address = _as_address(ip)
    if isinstance(address, IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded is None:
            return _classify_ipv6(address)
        address = embedded
    for network4, address_class in _IPV4_CLASSES:
        if address in network4:
            return address_class
    return AddressClass.PUBLIC


def _classify_ipv6(address: IPv6Address) -> AddressClass:
    for network, address_class in _IPV6_CLASSES:
        if address in network:
            return address_class
    if address not in _GLOBAL_UNICAST:
        return AddressClass.RESERVED
    return AddressClass.PUBLIC


def is_internal(ip: str | IPv4Address | IPv6Address) -> bool:
    """True for every address that is not public."""
    return classify_address(ip) is not AddressClass.PUBLIC
