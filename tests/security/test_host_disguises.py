"""Host disguises: a denied host spelled another way, or a request that names two hosts at once.

`blocked.test` and `bücher.example` are tier deny; `/admin/**` on 127.0.0.1 is tier deny. Each spelling
must be recognised as the same host (refused by the deny rule, not by some other rule's accident), or
refused as malformed. When two names disagree (absolute URI vs Host, CONNECT vs Host vs SNI) the request
is refused: the sidecar never picks one of them.
"""

from __future__ import annotations

import pytest

from tests.security.support import (
    RawResponse,
    Sidecar,
    Upstream,
    assert_refused,
    connect_tunnel,
    h2_exchange,
    one,
    raw_request,
    read_responses,
    unique,
)


def _absolute_get(sidecar: Sidecar, authority: str, path: str = "/", host: str | None = None) -> RawResponse:
    return one(sidecar.exchange(raw_request("GET", authority, path, host=host)))


@pytest.mark.parametrize(
    "authority",
    [
        pytest.param("BLOCKED.test", id="upper-case"),
        pytest.param("Blocked.Test", id="mixed-case"),
        pytest.param("blocked.test.", id="trailing-dot"),
        pytest.param("blocked.test:80", id="explicit-default-port"),
        pytest.param("BLOCKED.TEST.:80", id="case-dot-and-port"),
        pytest.param("xn--bcher-kva.example", id="punycode-of-idn-rule"),
        pytest.param("XN--BCHER-KVA.example", id="punycode-upper-case"),
    ],
)
def test_denied_host_spelled_differently_is_still_denied(main: Sidecar, authority: str) -> None:
    body = assert_refused(_absolute_get(main, authority), 403, "policy.deny", "denied")
    assert body["intent"]["rule"] == "blocked-hosts"


@pytest.mark.parametrize(
    "host_header",
    [
        pytest.param("bücher.example", id="utf8-idn"),
        pytest.param("BÜCHER.example", id="utf8-idn-upper"),
        pytest.param("ｂｌｏｃｋｅｄ.test", id="fullwidth-letters"),
        pytest.param("blocked。test", id="ideographic-full-stop"),
    ],
)
def test_unicode_spellings_in_the_host_header_map_to_the_denied_name(main: Sidecar, host_header: str) -> None:
    """Origin-form: the Host header is the target; IDNA (with nameprep) maps each to the denied name."""
    request = f"GET / HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode()
    body = assert_refused(one(main.exchange(request)), 403, "policy.deny", "denied")
    assert body["intent"]["rule"] == "blocked-hosts"


@pytest.mark.parametrize(
    "authority",
    [
        pytest.param("bücher.example", id="utf8-idn"),
        pytest.param("ｂｌｏｃｋｅｄ.test", id="fullwidth"),
        pytest.param("blo%63ked.test", id="percent-encoded-host"),
        pytest.param("blocked.test%00.good.example", id="encoded-nul"),
    ],
)
def test_non_ascii_or_encoded_hosts_in_the_request_line_are_refused(main: Sidecar, authority: str) -> None:
    request = f"GET http://{authority}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    assert_refused(one(main.exchange(request)), 400, "request.bad_target", "bad_request")


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("2130706433", id="decimal"),
        pytest.param("0x7f000001", id="hex"),
        pytest.param("017700000001", id="octal"),
        pytest.param("0177.0.0.1", id="octal-dotted"),
        pytest.param("0x7f.0.0.1", id="hex-dotted"),
        pytest.param("127.1", id="two-part"),
        pytest.param("127.0.1", id="three-part"),
        pytest.param("[::ffff:127.0.0.1]", id="ipv4-mapped-ipv6"),
        pytest.param("[::ffff:7f00:1]", id="ipv4-mapped-ipv6-hex"),
        pytest.param("[0:0:0:0:0:ffff:127.0.0.1]", id="ipv4-mapped-ipv6-long"),
    ],
)
def test_alternate_ipv4_forms_are_the_same_host_for_the_deny_rule(
    main: Sidecar, upstream: Upstream, host: str
) -> None:
    marker = unique("h")
    answer = _absolute_get(main, f"{host}:{upstream.port}", f"/admin/{marker}")
    body = assert_refused(answer, 403, "policy.deny", "denied")
    assert body["intent"]["rule"] == "admin-deny"
    assert not upstream.seen_containing(marker)


@pytest.mark.parametrize("host", ["127.1", "0x7f.1", "2130706433", "[::ffff:127.0.0.1]"])
def test_alternate_ipv4_form_is_forwarded_under_its_canonical_name(
    main: Sidecar, upstream: Upstream, host: str
) -> None:
    marker = unique("h")
    answer = _absolute_get(main, f"{host}:{upstream.port}", f"/ok/{marker}")
    assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
    [seen] = upstream.seen_containing(marker)
    assert seen.header("host") == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize(
    ("port", "status", "code"),
    [
        pytest.param("0PORT", 403, "policy.deny", id="leading-zero-same-port"),
        pytest.param("PORT0", 400, "request.bad_target", id="out-of-range"),
        pytest.param("", 400, "request.bad_target", id="empty-port"),
        pytest.param("+PORT", 400, "request.bad_target", id="plus-sign"),
        pytest.param("-1", 400, "request.bad_target", id="negative"),
    ],
)
def test_port_spellings(main: Sidecar, upstream: Upstream, port: str, status: int, code: str) -> None:
    marker = unique("h")
    authority = f"127.0.0.1:{port.replace('PORT', str(upstream.port))}"
    request = (
        f"GET http://{authority}/admin/{marker} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    assert_refused(one(main.exchange(request.encode())), status, code)
    assert not upstream.seen_containing(marker)


@pytest.mark.parametrize(
    "authority",
    [
        pytest.param("127.0.0.1:PORT@blocked.test", id="allowed-host-as-userinfo"),
        pytest.param("blocked.test@127.0.0.1:PORT", id="denied-host-as-userinfo"),
        pytest.param("user:secret@127.0.0.1:PORT", id="credentials"),
        pytest.param("blocked.test%40127.0.0.1:PORT", id="encoded-at"),
        pytest.param("blocked.test\\@127.0.0.1:PORT", id="backslash-at"),
    ],
)
def test_userinfo_in_the_target_is_refused(main: Sidecar, upstream: Upstream, authority: str) -> None:
    marker = unique("h")
    target = authority.replace("PORT", str(upstream.port))
    request = f"GET http://{target}/{marker} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    assert_refused(one(main.exchange(request.encode())), 400, "request.bad_target", "bad_request")
    assert not upstream.seen_containing(marker)


@pytest.mark.parametrize(
    "host_header",
    [
        pytest.param("blocked.test", id="other-name"),
        pytest.param("127.0.0.1", id="same-host-default-port"),
        pytest.param("127.0.0.1:1", id="same-host-other-port"),
        pytest.param("localhost:PORT", id="alias-of-same-address"),
        pytest.param("127.0.0.1:PORT@blocked.test", id="userinfo-in-host"),
        pytest.param("127.0.0.1:PORT/admin", id="path-in-host"),
    ],
)
def test_host_header_disagreeing_with_the_absolute_uri_is_refused(
    main: Sidecar, upstream: Upstream, host_header: str
) -> None:
    marker = unique("h")
    request = raw_request(
        "GET", upstream.authority, f"/ok/{marker}", host=host_header.replace("PORT", str(upstream.port))
    )
    assert_refused(one(main.exchange(request)), 400, "request.host_mismatch", "bad_request")
    assert not upstream.seen_containing(marker)


def test_two_host_headers_are_refused(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("h")
    request = raw_request("GET", upstream.authority, f"/ok/{marker}", headers=[("Host", "blocked.test")])
    assert_refused(one(main.exchange(request)), 400, "request.host_mismatch", "bad_request")
    assert not upstream.seen_containing(marker)


def test_origin_form_request_is_classified_by_its_host_header(main: Sidecar) -> None:
    """Without an absolute URI the Host header is the destination, and the deny rule applies to it."""
    request = b"GET /anything HTTP/1.1\r\nHost: Blocked.Test.\r\nConnection: close\r\n\r\n"
    assert_refused(one(main.exchange(request)), 403, "policy.deny", "denied")


# --- CONNECT target, inner Host and TLS server name ------------------------------------------------


def _inner(tls_upstream: Upstream, host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("connect", "sni", "host"),
    [
        pytest.param("127.0.0.1:PORT", "blocked.test", "127.0.0.1:PORT", id="sni-differs"),
        pytest.param("127.0.0.1:PORT", "localhost", "localhost:PORT", id="connect-differs"),
        pytest.param("127.0.0.1:PORT", None, "blocked.test", id="host-differs-no-sni"),
        pytest.param("127.0.0.1:PORT", "localhost", "127.0.0.1:PORT", id="sni-alias-of-address"),
        pytest.param("localhost:PORT", "localhost", "127.0.0.1:PORT", id="host-is-address-of-connect-name"),
        pytest.param("127.0.0.1:PORT", "blocked.test", "blocked.test", id="sni-and-host-agree-not-connect"),
    ],
)
def test_connect_target_inner_host_and_sni_must_agree(
    main: Sidecar, tls_upstream: Upstream, connect: str, sni: str | None, host: str
) -> None:
    port = str(tls_upstream.port)
    marker = unique("t")
    tunnel, refusal = connect_tunnel(
        main.proxy_port, connect.replace("PORT", port), ca_file=main.ca_file, server_name=sni
    )
    assert tunnel is not None, refusal
    with tunnel:
        tunnel.sendall(_inner(tls_upstream, host.replace("PORT", port), f"/ok/{marker}"))
        answer = one(read_responses(tunnel, expect=1, timeout=5))
    assert_refused(answer, 400, "request.host_mismatch", "bad_request")
    assert not tls_upstream.seen_containing(marker)


def test_connect_target_inner_host_and_sni_agreeing_is_forwarded(
    main: Sidecar, tls_upstream: Upstream
) -> None:
    """The control for the cases above: same name three times goes through, TLS to the upstream verified."""
    marker = unique("t")
    tunnel, refusal = connect_tunnel(
        main.proxy_port, tls_upstream.authority, ca_file=main.ca_file, server_name=None
    )
    assert tunnel is not None, refusal
    with tunnel:
        tunnel.sendall(_inner(tls_upstream, tls_upstream.authority, f"/ok/{marker}"))
        answer = one(read_responses(tunnel, expect=1, timeout=5))
    assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
    assert [s.path for s in tls_upstream.seen_containing(marker)] == [f"/ok/{marker}"]


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        pytest.param("127.0.0.1:PORT@blocked.test:443", 400, "request.bad_target", id="userinfo"),
        pytest.param("blocked.test", 400, "request.bad_target", id="no-port"),
        pytest.param("127.0.0.2:PORT", 403, "destination.internal", id="unnamed-loopback"),
        pytest.param("0x7f000002:PORT", 403, "destination.internal", id="unnamed-loopback-hex"),
    ],
)
def test_bad_connect_targets_are_refused_before_any_tunnel(
    main: Sidecar, tls_upstream: Upstream, target: str, status: int, code: str
) -> None:
    tunnel, refusal = connect_tunnel(
        main.proxy_port,
        target.replace("PORT", str(tls_upstream.port)),
        ca_file=main.ca_file,
        server_name=None,
    )
    assert tunnel is None
    assert refusal is not None
    assert_refused(refusal, status, code)


# --- HTTP/2 inside the tunnel: :authority plays the Host header's part ------------------------------


def _h2(
    main: Sidecar, tls_upstream: Upstream, authority: str, path: str, *extra: tuple[str, str]
) -> RawResponse:
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path), *extra]
    return h2_exchange(main.proxy_port, tls_upstream.authority, headers, ca_file=main.ca_file)


def test_http2_request_whose_authority_matches_the_tunnel_is_forwarded(
    main: Sidecar, tls_upstream: Upstream
) -> None:
    marker = unique("h2")
    answer = _h2(main, tls_upstream, tls_upstream.authority, f"/ok/{marker}")
    assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
    assert [s.path for s in tls_upstream.seen_containing(marker)] == [f"/ok/{marker}"]


@pytest.mark.parametrize(
    ("authority", "extra"),
    [
        pytest.param("blocked.test", (), id="authority-other-name"),
        pytest.param("localhost:PORT", (), id="authority-alias-of-address"),
        pytest.param("127.0.0.1:1", (), id="authority-other-port"),
    ],
)
def test_http2_authority_disagreeing_with_the_tunnel_is_refused(
    main: Sidecar, tls_upstream: Upstream, authority: str, extra: tuple[str, ...]
) -> None:
    marker = unique("h2")
    more = [(extra[0], extra[1])] if extra else []
    answer = _h2(
        main, tls_upstream, authority.replace("PORT", str(tls_upstream.port)), f"/ok/{marker}", *more
    )
    assert_refused(answer, 400, "request.host_mismatch", "bad_request")
    assert not tls_upstream.seen_containing(marker)


def test_http2_path_disguise_still_hits_the_deny_rule(main: Sidecar, tls_upstream: Upstream) -> None:
    marker = unique("h2")
    answer = _h2(main, tls_upstream, tls_upstream.authority, f"/public/%2e%2e/ADMIN/{marker}")
    assert_refused(answer, 403, "policy.deny", "denied")
    assert not tls_upstream.seen_containing(marker)


def test_http2_host_header_contradicting_authority_ends_the_connection(
    main: Sidecar, tls_upstream: Upstream
) -> None:
    """mitmproxy's HTTP/2 stack treats it as a protocol error (RFC 9113 §8.3.1): GOAWAY, nothing forwarded."""
    marker = unique("h2")
    answer = _h2(main, tls_upstream, tls_upstream.authority, f"/ok/{marker}", ("host", "blocked.test"))
    assert answer.status == 0 and ("x-connection-terminated", "1") in answer.headers, answer
    assert not tls_upstream.seen_containing(marker)
