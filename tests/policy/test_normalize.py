"""Tests for policy.normalize: methods, hosts, paths, targets and whole requests."""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from policy.normalize import (
    AmbiguousRequest,
    build_request,
    default_port,
    normalize_host,
    normalize_method,
    normalize_path,
    parse_authority,
    split_target,
)


def _refused_code(call: Callable[[str], object], raw: str) -> str:
    with pytest.raises(AmbiguousRequest) as caught:
        call(raw)
    assert caught.value.reason
    return caught.value.code


# -- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("GET", "GET", id="upper-case-kept"),
        pytest.param("get", "GET", id="lower-case-upper-cased"),
        pytest.param("Delete", "DELETE", id="mixed-case-upper-cased"),
        pytest.param("M-SEARCH", "M-SEARCH", id="hyphen-is-a-tchar"),
        pytest.param("PROPFIND", "PROPFIND", id="extension-method"),
    ],
)
def test_method_token_is_upper_cased(raw: str, expected: str) -> None:
    assert normalize_method(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("GE T", id="space"),
        pytest.param("GET\r\n", id="crlf"),
        pytest.param("G(ET", id="separator"),
        pytest.param("GE/T", id="slash"),
        pytest.param("GÉT", id="non-ascii-letter"),
    ],
)
def test_method_that_is_not_a_token_is_refused(raw: str) -> None:
    assert _refused_code(normalize_method, raw) == "request.bad_method"


# -- ports -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "port"),
    [pytest.param("http", 80, id="http"), pytest.param("https", 443, id="https")],
)
def test_default_port_follows_scheme(scheme: str, port: int) -> None:
    assert default_port(scheme) == port


@pytest.mark.parametrize("scheme", ["ftp", "ws", "", "file"])
def test_default_port_refuses_unproxied_scheme(scheme: str) -> None:
    assert _refused_code(default_port, scheme) == "request.bad_target"


# -- hosts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("example.com", "example.com", id="plain-name"),
        pytest.param("API.GitHub.COM", "api.github.com", id="lower-cased"),
        pytest.param("example.com.", "example.com", id="one-trailing-dot-stripped"),
        pytest.param("_dmarc.example.com", "_dmarc.example.com", id="underscore-tolerated"),
        pytest.param("localhost", "localhost", id="single-label"),
        pytest.param("1.2.3.example", "1.2.3.example", id="numeric-labels-then-name"),
        pytest.param("a" * 63 + ".com", "a" * 63 + ".com", id="63-char-label"),
        pytest.param("bücher.example", "xn--bcher-kva.example", id="idna-encoded"),
        pytest.param("BÜCHER.example.", "xn--bcher-kva.example", id="idna-case-folded-trailing-dot"),
        pytest.param("ｅｘａｍｐｌｅ。com", "example.com", id="fullwidth-name-mapped"),
        pytest.param("xn--bcher-kva.example", "xn--bcher-kva.example", id="punycode-kept"),
        pytest.param("[::1]", "::1", id="bracketed-ipv6"),
        pytest.param("::1", "::1", id="bare-ipv6"),
        pytest.param("[2001:DB8:0:0:0:0:0:1]", "2001:db8::1", id="ipv6-compressed"),
        pytest.param("64:ff9b::7f00:1", "64:ff9b::7f00:1", id="nat64-stays-ipv6"),
        pytest.param("::ffff:127.0.0.1", "127.0.0.1", id="ipv4-mapped-dotted"),
        pytest.param("[::ffff:7f00:1]", "127.0.0.1", id="ipv4-mapped-hex"),
        pytest.param("127.0.0.1", "127.0.0.1", id="dotted-ipv4"),
        pytest.param("127.0.0.1.", "127.0.0.1", id="ipv4-trailing-dot"),
        pytest.param("127.1", "127.0.0.1", id="two-part-ipv4"),
        pytest.param("10.1.2", "10.1.0.2", id="three-part-ipv4"),
        pytest.param("0x7f000001", "127.0.0.1", id="hex-ipv4"),
        pytest.param("0X7F000001", "127.0.0.1", id="upper-hex-ipv4"),
        pytest.param("2130706433", "127.0.0.1", id="decimal-ipv4"),
        pytest.param("0177.0.0.1", "127.0.0.1", id="octal-part"),
        pytest.param("0x7f.1", "127.0.0.1", id="hex-part-and-filler"),
        pytest.param("0", "0.0.0.0", id="zero"),
        pytest.param("１２７.０.０.１", "127.0.0.1", id="fullwidth-digits-become-ipv4"),
        pytest.param("169.254.169.254", "169.254.169.254", id="metadata-address"),
    ],
)
def test_host_is_normalised(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param(".", id="only-dot"),
        pytest.param(" example.com", id="leading-space"),
        pytest.param("example.com ", id="trailing-space"),
        pytest.param("example.com\t", id="tab"),
        pytest.param("exa\x00mple.com", id="nul"),
        pytest.param("exa\u200bmple.com", id="zero-width-space"),
        pytest.param("exa\u00admple.com", id="soft-hyphen"),
        pytest.param("user@example.com", id="userinfo"),
        pytest.param("example.com/admin", id="slash"),
        pytest.param("example.com\\admin", id="backslash"),
        pytest.param("ex%61mple.com", id="percent-encoded"),
        pytest.param("example.com..", id="two-trailing-dots"),
        pytest.param(".example.com", id="leading-empty-label"),
        pytest.param("a..b", id="inner-empty-label"),
        pytest.param("a" * 64 + ".com", id="64-char-label"),
        pytest.param(".".join(["a" * 60] * 5), id="name-over-253"),
        pytest.param("exa$mple.com", id="dollar"),
        pytest.param("example.com:80", id="port-in-host"),
        pytest.param("ａ／ｂ.com", id="fullwidth-slash-maps-to-slash"),
        pytest.param("ü" * 64 + ".com", id="idna-label-too-long"),
        pytest.param("[::1", id="unclosed-bracket"),
        pytest.param("[1.2.3.4]", id="bracketed-ipv4"),
        pytest.param("[example.com]", id="bracketed-name"),
        pytest.param("[fe80::1%eth0]", id="zone-id"),
        pytest.param("fe80::1%25eth0", id="encoded-zone-id"),
        pytest.param("::ffff:127.1", id="mapped-short-ipv4"),
        pytest.param("256.256.256.256", id="octet-over-255"),
        pytest.param("1.2.3.256", id="last-octet-over-255"),
        pytest.param("1.2.3.4.5", id="five-parts"),
        pytest.param("4294967296", id="decimal-over-32-bits"),
        pytest.param("0x100000000", id="hex-over-32-bits"),
        pytest.param("08.0.0.1", id="invalid-octal"),
        pytest.param("1.2..3", id="numeric-empty-part"),
        pytest.param("example.123", id="name-ending-in-digits"),
        pytest.param("example.0x1f", id="name-ending-in-hex"),
    ],
)
def test_unclear_host_is_refused(raw: str) -> None:
    assert _refused_code(normalize_host, raw) == "request.bad_host"


_HOST_ALPHABET = st.sampled_from(
    [*"abcxz019-_.:[]", "0x", "ü", "Ü", "ß", "。", "ｅ", "１", "::", "ffff", "7f", "%", "@", " "]
)


@given(st.lists(_HOST_ALPHABET, max_size=20).map("".join))
@example("bücher.example.")
@example("0x7f.1")
@example("[::ffff:7f00:1]")
def test_normalize_host_is_idempotent(raw: str) -> None:
    try:
        once = normalize_host(raw)
    except AmbiguousRequest:
        return
    assert normalize_host(once) == once


@given(st.ip_addresses())
def test_every_ip_literal_normalises_to_itself_or_its_mapped_ipv4(ip: IPv4Address | IPv6Address) -> None:
    once = normalize_host(str(ip))
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        assert once == str(ip.ipv4_mapped)
    else:
        assert once == ip.compressed
    assert normalize_host(once) == once


# -- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("/", "/", id="root"),
        pytest.param("/a/b", "/a/b", id="plain"),
        pytest.param("/a/b/", "/a/b/", id="trailing-slash-kept"),
        pytest.param("/Repos/Owner", "/Repos/Owner", id="case-kept"),
        pytest.param("/a/./b/../c", "/a/c", id="dot-segments-removed"),
        pytest.param("/a/b/..", "/a/", id="final-dotdot-leaves-slash"),
        pytest.param("/a/b/.", "/a/b/", id="final-dot-leaves-slash"),
        pytest.param("/a/..", "/", id="dotdot-back-to-root"),
        pytest.param("/.", "/", id="root-dot"),
        pytest.param("//a///b", "/a/b", id="slashes-collapsed"),
        pytest.param("/a//", "/a/", id="trailing-slashes-collapsed"),
        pytest.param("//", "/", id="double-root"),
        pytest.param("/a//../b", "/b", id="slashes-collapsed-before-dotdot"),
        pytest.param("/%7E/x", "/~/x", id="tilde-decoded"),
        pytest.param("/%41%62", "/Ab", id="letters-decoded"),
        pytest.param("/a/%2e/b", "/a/b", id="encoded-dot-segment-removed"),
        pytest.param("/a/%2E%2e/b", "/b", id="encoded-dotdot-segment-removed"),
        pytest.param("/a.%2e.b", "/a...b", id="encoded-dot-in-name-decoded"),
        pytest.param("/%c3%a9", "/%C3%A9", id="utf8-escape-upper-cased"),
        pytest.param("/%E2%82%AC", "/%E2%82%AC", id="three-byte-utf8"),
        pytest.param("/%f0%9f%98%80", "/%F0%9F%98%80", id="four-byte-utf8"),
        pytest.param("/a%20b", "/a%20b", id="encoded-space-inside-a-segment-kept"),
        pytest.param("/%3f", "/%3F", id="encoded-question-mark-kept"),
        pytest.param("/100%25", "/100%25", id="lone-encoded-percent-at-end"),
        pytest.param("/%25zz", "/%25zz", id="encoded-percent-before-non-hex"),
        pytest.param("/%25/41", "/%25/41", id="encoded-percent-before-slash"),
        pytest.param("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,=", id="pchar-sub-delims-kept"),
    ],
)
def test_path_is_normalised(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("*", id="asterisk-form"),
        pytest.param("", id="empty"),
        pytest.param("a/b", id="relative"),
        pytest.param("http://example.com/a", id="absolute-form"),
    ],
)
def test_path_that_is_not_origin_form_is_a_bad_target(raw: str) -> None:
    assert _refused_code(normalize_path, raw) == "request.bad_target"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("/a b", id="space"),
        pytest.param("/a\tb", id="tab"),
        pytest.param("/a\x00", id="raw-nul"),
        pytest.param("/é", id="raw-non-ascii"),
        *(pytest.param(f"/a{char}b", id=f"raw-{char}") for char in '"<>^`{|}?#[]'),
        pytest.param("/a\\b", id="backslash"),
        pytest.param("/a%5Cb", id="encoded-backslash"),
        pytest.param("/a%5cb", id="encoded-backslash-lower"),
        pytest.param("/a%00", id="encoded-nul"),
        pytest.param("/a%0a", id="encoded-newline"),
        pytest.param("/a%1F", id="encoded-unit-separator"),
        pytest.param("/a%7f", id="encoded-del"),
        pytest.param("/a%2Fb", id="encoded-slash"),
        pytest.param("/a%2fb", id="encoded-slash-lower"),
        pytest.param("/%252e", id="double-encoded-dot"),
        pytest.param("/%252F", id="double-encoded-slash"),
        pytest.param("/%25%32%65", id="double-encoding-revealed-by-decoding"),
        pytest.param("/a%", id="percent-at-end"),
        pytest.param("/a%4", id="percent-one-hex-digit"),
        pytest.param("/a%zz", id="percent-non-hex"),
        pytest.param("/a%u002e", id="iis-unicode-escape"),
        pytest.param("/a;b", id="semicolon"),
        pytest.param("/admin;jsessionid=1/x", id="matrix-parameter"),
        pytest.param("/a%3Bb", id="encoded-semicolon"),
        pytest.param("/%C0%AE", id="overlong-two-byte-dot"),
        pytest.param("/%E0%80%AE", id="overlong-three-byte-dot"),
        pytest.param("/%C3", id="truncated-utf8"),
        pytest.param("/%C3a", id="utf8-interrupted-by-raw-char"),
        pytest.param("/%C3%41", id="utf8-interrupted-by-unreserved-escape"),
        pytest.param("/%FF", id="invalid-utf8-byte"),
        pytest.param("/%ED%A0%80", id="encoded-surrogate"),
        pytest.param("/..", id="dotdot-above-root"),
        pytest.param("/a/../..", id="second-dotdot-above-root"),
        pytest.param("/../a", id="leading-dotdot"),
        pytest.param("/%2e%2e/a", id="encoded-dotdot-above-root"),
        pytest.param("/admin%20/x", id="segment-ending-in-encoded-space"),
        pytest.param("/%20admin/x", id="segment-starting-with-encoded-space"),
        pytest.param("/admin%09", id="path-ending-in-encoded-tab"),
        pytest.param("/%20", id="encoded-space-segment"),
    ],
)
def test_ambiguous_path_is_refused(raw: str) -> None:
    assert _refused_code(normalize_path, raw) == "request.ambiguous_path"


_PATH_PIECES = st.sampled_from(
    [
        *["/", "//", ".", "..", "a", "B", "~", "%", "%2e", "%2E", "%25", "%2F", "%41", "%c3", "%a9"],
        *["%7e", "2e", "41", "zz", ";", "\\", "%5C", "%00", "%3B", ":", "@", "+", " ", "é"],
    ]
)
_PATHS = st.lists(_PATH_PIECES, max_size=16).map(lambda pieces: "/" + "".join(pieces))


@given(_PATHS)
@example("/a/%2e%2E/b/")
@example("/%25%32%65")
@example("/a//../b/.")
def test_normalize_path_is_idempotent(raw: str) -> None:
    try:
        once = normalize_path(raw)
    except AmbiguousRequest:
        return
    assert normalize_path(once) == once


@given(_PATHS)
def test_accepted_path_has_no_ambiguous_part(raw: str) -> None:
    try:
        result = normalize_path(raw)
    except AmbiguousRequest:
        return
    assert result.startswith("/")
    for fragment in ("/../", "/./", "//", "%2F", "%2f", "\\", ";"):
        assert fragment not in result
    assert not re.search("%25[0-9A-Fa-f]{2}", result)
    assert not result.endswith(("/..", "/."))


# -- targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param("/a/b?x=1", ("/a/b", "x=1"), id="path-and-query"),
        pytest.param("/a", ("/a", ""), id="no-query"),
        pytest.param("/a?", ("/a", ""), id="empty-query"),
        pytest.param("", ("/", ""), id="empty-target-is-root"),
        pytest.param("?x=1", ("/", "x=1"), id="query-only"),
        pytest.param("/a?x=1?y=/..", ("/a", "x=1?y=/.."), id="query-kept-raw"),
    ],
)
def test_target_splits_into_raw_path_and_query(target: str, expected: tuple[str, str]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/a#frag", id="fragment-in-path"),
        pytest.param("/a?x=1#frag", id="fragment-in-query"),
        pytest.param("/a?x=1 HTTP/1.1", id="space-in-query"),
        pytest.param("/a?x=1\r\nHost: evil", id="crlf-in-query"),
    ],
)
def test_target_with_fragment_or_control_character_is_refused(target: str) -> None:
    assert _refused_code(split_target, target) == "request.bad_target"


# -- whole requests --------------------------------------------------------------------------


def test_build_request_normalises_every_part() -> None:
    request = build_request(
        method="post",
        scheme="HTTPS",
        host="API.Stripe.com.",
        port=None,
        target="/v1/./refunds/%7Ex?amount=100%2F",
        headers=[("Content-Type", "application/JSON"), ("X-Trace", "Ab")],
        body=b"{}",
        address="::ffff:10.0.0.1",
    )
    assert request.method == "POST"
    assert request.scheme == "https"
    assert request.host == "api.stripe.com"
    assert request.port == 443
    assert request.path == "/v1/refunds/~x"
    assert request.query == "amount=100%2F"
    assert request.headers == (("content-type", "application/JSON"), ("x-trace", "Ab"))
    assert request.body == b"{}"
    assert request.address == "10.0.0.1"
    assert request.url == "https://api.stripe.com/v1/refunds/~x?amount=100%2F"


@pytest.mark.parametrize(
    ("scheme", "port", "expected"),
    [
        pytest.param("http", None, 80, id="http-default"),
        pytest.param("https", None, 443, id="https-default"),
        pytest.param("http", 8080, 8080, id="explicit-port-kept"),
        pytest.param("https", 1, 1, id="lowest-port"),
        pytest.param("https", 65535, 65535, id="highest-port"),
    ],
)
def test_build_request_defaults_port_from_scheme(scheme: str, port: int | None, expected: int) -> None:
    request = build_request(method="GET", scheme=scheme, host="example.com", port=port, target="/")
    assert request.port == expected


def test_build_request_keeps_ipv6_host_without_brackets() -> None:
    request = build_request(method="GET", scheme="http", host="[2001:DB8::1]", port=8080, target="")
    assert request.host == "2001:db8::1"
    assert request.path == "/"
    assert request.url == "http://[2001:db8::1]:8080/"


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        pytest.param({"method": "GE T"}, "request.bad_method", id="bad-method"),
        pytest.param({"scheme": "ftp"}, "request.bad_target", id="bad-scheme"),
        pytest.param({"host": "user@example.com"}, "request.bad_host", id="bad-host"),
        pytest.param({"port": 0}, "request.bad_port", id="port-zero"),
        pytest.param({"port": 65536}, "request.bad_port", id="port-too-high"),
        pytest.param({"port": -1}, "request.bad_port", id="port-negative"),
        pytest.param({"port": True}, "request.bad_port", id="port-bool"),
        pytest.param({"target": "/a/../../etc"}, "request.ambiguous_path", id="path-above-root"),
        pytest.param({"target": "/a#b"}, "request.bad_target", id="fragment"),
        pytest.param({"target": "*"}, "request.bad_target", id="asterisk"),
        pytest.param({"address": "example.com"}, "request.bad_host", id="address-not-ip"),
    ],
)
def test_build_request_refuses_first_bad_part(overrides: dict[str, object], code: str) -> None:
    arguments: dict[str, object] = {
        "method": "GET",
        "scheme": "https",
        "host": "example.com",
        "port": None,
        "target": "/",
    }
    arguments.update(overrides)
    with pytest.raises(AmbiguousRequest) as caught:
        # One dict cannot type str, int and None overrides per key; the keywords are right.
        build_request(**arguments)  # type: ignore[arg-type]
    assert caught.value.code == code


def test_ambiguous_request_is_a_value_error_with_code_and_reason() -> None:
    error = AmbiguousRequest("request.bad_host", "host 'x' is bad")
    assert isinstance(error, ValueError)
    assert (error.code, error.reason, str(error)) == (
        "request.bad_host",
        "host 'x' is bad",
        "host 'x' is bad",
    )


@pytest.mark.parametrize(
    ("value", "scheme", "expected"),
    [
        pytest.param("Example.COM", "https", ("example.com", 443), id="default-https-port"),
        pytest.param("example.com.:8080", "http", ("example.com", 8080), id="trailing-dot-and-port"),
        pytest.param("[::1]:9", "http", ("::1", 9), id="ipv6-with-port"),
        pytest.param("127.1", "http", ("127.0.0.1", 80), id="short-ipv4"),
    ],
)
def test_an_authority_is_split_and_normalised(value: str, scheme: str, expected: tuple[str, int]) -> None:
    assert parse_authority(value, scheme) == expected


@pytest.mark.parametrize(
    ("value", "code"),
    [
        pytest.param("user@example.com", "request.host_mismatch", id="userinfo"),
        pytest.param("example.com/x", "request.host_mismatch", id="path"),
        pytest.param("example.com:0", "request.bad_port", id="port-zero"),
        pytest.param("example.com:99999", "request.bad_port", id="port-too-big"),
        pytest.param("[::1", "request.host_mismatch", id="unclosed-bracket"),
    ],
)
def test_a_bad_authority_is_refused(value: str, code: str) -> None:
    with pytest.raises(AmbiguousRequest) as raised:
        parse_authority(value, "http")
    assert raised.value.code == code
