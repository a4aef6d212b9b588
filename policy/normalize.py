"""Raw request parts to a normalised `Request`, refusing whatever cannot be read only one way."""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address

from policy.addresses import parse_ip
from policy.model import Request


class AmbiguousRequest(ValueError):
    """A request the proxy refuses with `bad_request`, under a stable dotted `code`."""

    code: str
    reason: str

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _bad_host(host: str, why: str) -> AmbiguousRequest:
    return AmbiguousRequest("request.bad_host", f"host {host!r} {why}")


def _ambiguous_path(path: str, why: str) -> AmbiguousRequest:
    return AmbiguousRequest("request.ambiguous_path", f"path {path!r} {why}")


# RFC 9110 §5.6.2 tchar, ASCII only (str.isalnum would admit any Unicode letter).
_TCHAR = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


def normalize_method(method: str) -> str:
    """The method upper-cased; it must be a non-empty RFC 9110 token."""
    if not method or not all(char in _TCHAR for char in method):
        raise AmbiguousRequest("request.bad_method", f"method {method!r} is not an HTTP token")
    return method.upper()


_SCHEME_PORTS = {"http": 80, "https": 443}


def default_port(scheme: str) -> int:
    """The port a URL of `scheme` implies; only http and https are proxied."""
    port = _SCHEME_PORTS.get(scheme.lower())
    if port is None:
        raise AmbiguousRequest("request.bad_target", f"scheme {scheme!r} is not http or https")
    return port


# -- hosts -----------------------------------------------------------------------------------

_HOST_FORBIDDEN = frozenset("@/\\%")
_LABEL_CHARS = frozenset(string.ascii_lowercase + string.digits + "-_")
_MAX_NAME = 253
_MAX_LABEL = 63


# Both are pure and agents call the same few hosts and paths again and again: cache the results
# (refusals raise, and exceptions are never cached).
@functools.lru_cache(maxsize=4096)
def normalize_host(host: str) -> str:
    """Lower-case ASCII name without trailing dot, or a canonical IP literal (IPv6 without brackets)."""
    for char in host:
        # Invisible and control characters would make the name we classify differ from the one shown.
        if char in _HOST_FORBIDDEN or unicodedata.category(char)[0] in "CZ":
            raise _bad_host(host, f"contains the forbidden character {char!r}")
    if not host:
        raise _bad_host(host, "is empty")
    if host.startswith("[") or ":" in host:
        return _canonical_ip_literal(host)
    name = _to_ascii(host).lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > _MAX_NAME:
        raise _bad_host(host, f"must have 1 to {_MAX_NAME} characters")
    labels = name.split(".")
    if _ends_in_number(labels[-1]):
        # WHATWG URL and inet_aton read such names as IPv4 addresses; so must we, or refuse them.
        return str(IPv4Address(_parse_ipv4(host, labels)))
    for label in labels:
        if not 1 <= len(label) <= _MAX_LABEL:
            raise _bad_host(host, f"has a label that is not 1 to {_MAX_LABEL} characters long")
        if not _LABEL_CHARS.issuperset(label):
            raise _bad_host(host, f"has a label with characters outside [a-z0-9-_]: {label!r}")
    return name


def _canonical_ip_literal(host: str) -> str:
    address = parse_ip(host)
    if not isinstance(address, IPv6Address):
        raise _bad_host(host, "is not a valid IPv6 literal")
    return _canonical_address(address)


def _canonical_address(address: IPv4Address | IPv6Address) -> str:
    """The one spelling of an address: IPv4-mapped IPv6 becomes dotted IPv4, IPv6 is compressed."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _to_ascii(host: str) -> str:
    if host.isascii():
        return host
    try:
        # Python's codec is IDNA 2003 with nameprep: it case-folds and maps look-alikes (fullwidth
        # digits and dots) to ASCII, which is why the result is validated again afterwards.
        return host.encode("idna").decode("ascii")
    except UnicodeError as error:
        raise _bad_host(host, f"is not a valid internationalised name ({error})") from None


def _ipv4_number(part: str) -> int | None:
    """WHATWG "IPv4 number parser": decimal, 0x-hex or 0-prefixed octal; None when it is none of them."""
    radix = 10
    if part[:2] in ("0x", "0X"):
        part, radix = part[2:], 16
    elif len(part) >= 2 and part[0] == "0":
        part, radix = part[1:], 8
    if not part:
        return 0
    digits = string.hexdigits if radix == 16 else string.digits[:radix]
    if not all(char in digits for char in part):
        return None
    return int(part, radix)


def _ends_in_number(label: str) -> bool:
    return bool(label) and (label.isdigit() or _ipv4_number(label) is not None)


def _parse_ipv4(host: str, parts: list[str]) -> int:
    if len(parts) > 4:
        raise _bad_host(host, "looks numeric but has more than four parts")
    numbers: list[int] = []
    for part in parts:
        number = _ipv4_number(part) if part else None
        if number is None:
            raise _bad_host(host, f"looks numeric but {part!r} is not an IPv4 number")
        numbers.append(number)
    *leading, last = numbers
    # The last number fills every byte the earlier parts did not: 127.1 is 127.0.0.1.
    if any(number > 255 for number in leading) or last >= 256 ** (5 - len(numbers)):
        raise _bad_host(host, "looks numeric but is out of the IPv4 range")
    value = last
    for index, number in enumerate(leading):
        value += number << (8 * (3 - index))
    return value


# -- paths -----------------------------------------------------------------------------------

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 3986 pchar plus '/', minus ';' which Tomcat and Spring strip as matrix parameters.
_PATH_RAW = _UNRESERVED | frozenset("!$&'()*+,=:@/")
_HEXDIGITS = frozenset(string.hexdigits)
# A server that decodes twice would read %252e as '.', so whatever we forward must not hold one.
_DOUBLE_ENCODED = re.compile(r"%25[0-9A-Fa-f]{2}")

_REFUSED_ESCAPES = {
    0x2F: "has an encoded slash",
    0x5C: "has an encoded backslash",
    0x3B: "has an encoded semicolon",  # some frameworks strip matrix parameters after decoding
}


@functools.lru_cache(maxsize=4096)
def normalize_path(path: str) -> str:
    """The path with unreserved escapes decoded, dot-segments removed and slashes collapsed.

    Everything a server could read more than one way is refused rather than guessed.
    """
    if path == "*":
        raise AmbiguousRequest("request.bad_target", "the asterisk-form request target is not supported")
    if not path.startswith("/"):
        raise AmbiguousRequest("request.bad_target", f"path {path!r} does not start with '/'")
    result = _remove_dot_segments(path, _decode_unreserved(path))
    if _DOUBLE_ENCODED.search(result):
        raise _ambiguous_path(path, "is percent-encoded twice")
    if _EDGE_WHITESPACE.search(result):
        # Some servers trim whitespace around segments (Spring, CVE-2016-5007): `/admin%20/x`
        # would be `/admin/x` to them while no `/admin/**` rule matches it here.
        raise _ambiguous_path(path, "has a segment that starts or ends with encoded whitespace")
    return result


# an encoded space or tab right after a '/' or right before a '/' or the end of the path
_EDGE_WHITESPACE = re.compile(r"/%(?:20|09)|%(?:20|09)(?:/|$)")


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    escaped = bytearray()  # the current run of consecutive escapes: multi-byte UTF-8 lives in one run
    index = 0
    while index < len(path):
        char = path[index]
        if char == "%":
            hex_pair = path[index + 1 : index + 3]
            if len(hex_pair) != 2 or not _HEXDIGITS.issuperset(hex_pair):
                raise _ambiguous_path(path, "has a '%' that is not followed by two hex digits")
            byte = int(hex_pair, 16)
            escaped.append(byte)
            out.append(_decode_escape(path, byte))
            index += 3
            continue
        _check_utf8(path, escaped)
        escaped.clear()
        if char == ";":
            raise _ambiguous_path(path, "has a ';' (matrix parameters)")
        if char == "\\":
            raise _ambiguous_path(path, "has a backslash")
        if char not in _PATH_RAW:
            raise _ambiguous_path(path, f"has the character {char!r}, which must be percent-encoded")
        out.append(char)
        index += 1
    _check_utf8(path, escaped)
    return "".join(out)


def _decode_escape(path: str, byte: int) -> str:
    if byte < 0x20 or byte == 0x7F:
        raise _ambiguous_path(path, "has a percent-encoded control character")
    refusal = _REFUSED_ESCAPES.get(byte)
    if refusal is not None:
        raise _ambiguous_path(path, refusal)
    char = chr(byte)
    return char if char in _UNRESERVED else f"%{byte:02X}"


def _check_utf8(path: str, escaped: bytearray) -> None:
    try:
        # Strict UTF-8 refuses overlong forms (%C0%AE for '.') and surrogates.
        escaped.decode("utf-8")
    except UnicodeDecodeError:
        raise _ambiguous_path(path, "has percent-encoded bytes that are not valid UTF-8") from None


def _remove_dot_segments(path: str, decoded: str) -> str:
    segments = decoded.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment in ("", "."):
            # Empty segments are collapsed before '..' is applied, as servers that merge slashes do.
            continue
        if segment == "..":
            if not kept:
                raise _ambiguous_path(path, "climbs above the root with '..'")
            kept.pop()
            continue
        kept.append(segment)
    # RFC 3986 §5.2.4: a final '.' or '..' leaves the path ending in '/'.
    trailing_slash = bool(kept) and segments[-1] in ("", ".", "..")
    return "/" + "/".join(kept) + ("/" if trailing_slash else "")


# -- targets and requests --------------------------------------------------------------------


def split_target(target: str) -> tuple[str, str]:
    """Origin-form target to (raw path, raw query without '?'); an empty path is '/'."""
    if "#" in target:
        raise AmbiguousRequest("request.bad_target", "the request target has a fragment ('#')")
    path, _, query = target.partition("?")
    # No valid request line carries these; a parser that let them through must not be second-guessed.
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in query):
        raise AmbiguousRequest("request.bad_target", "the query has whitespace or control characters")
    return path or "/", query


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise AmbiguousRequest("request.bad_port", f"port {port!r} is not between 1 and 65535")
    return port


# A header value may hold visible ASCII, spaces, tabs and obs-text (RFC 9110 §5.5); CR, LF, NUL and the
# other controls are refused: re-serialised upstream they would start a header (or a request) of their own.
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _check_header(name: str, value: str) -> tuple[str, str]:
    if not name or not all(char in _TCHAR for char in name):
        raise AmbiguousRequest("request.bad_header", f"header name {name[:40]!r} is not an HTTP token")
    if _HEADER_VALUE_FORBIDDEN.search(value):
        raise AmbiguousRequest(
            "request.bad_header",
            f"header {name[:40]!r} has a control character (CR, LF, NUL...) in its value",
        )
    return name.lower(), value


def _canonical_resolved(address: str) -> str:
    parsed = parse_ip(address)
    if parsed is None:
        raise AmbiguousRequest("request.bad_host", f"resolved address {address!r} is not an IP address")
    return _canonical_address(parsed)


def build_request(
    *,
    method: str,
    scheme: str,
    host: str,
    port: int | None,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    address: str | None = None,
) -> Request:
    """A `Request` whose every part is normalised, or AmbiguousRequest naming the first bad part."""
    scheme = scheme.lower()
    implied_port = default_port(scheme)
    path, query = split_target(target)
    return Request(
        method=normalize_method(method),
        scheme=scheme,
        host=normalize_host(host),
        port=implied_port if port is None else _check_port(port),
        path=normalize_path(path),
        query=query,
        headers=tuple(_check_header(name, value) for name, value in headers),
        body=body,
        address=None if address is None else _canonical_resolved(address),
    )


def parse_authority(value: str, scheme: str) -> tuple[str, int]:
    """A Host header (or `:authority`) as (normalised host, port); the default port for `scheme`."""
    text = value.strip()
    if not text or any(c in text for c in "/@?#\\ ") or text != value.strip(" "):
        raise AmbiguousRequest("request.host_mismatch", f"Host header {value!r} is not a host[:port]")
    port_text = ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise AmbiguousRequest("request.host_mismatch", f"Host header {value!r} is not a host[:port]")
        host, rest = text[: close + 1], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise AmbiguousRequest("request.host_mismatch", f"Host header {value!r} is not a host[:port]")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise AmbiguousRequest("request.bad_port", f"Host header {value!r} has a bad port")
    port = int(port_text) if port_text else default_port(scheme)
    return normalize_host(host), port


# Hop-by-hop headers (RFC 9110 §7.6.1) never reach the upstream, so they are removed before the request
# is classified: a header the policy read must be a header the upstream sees. Upgrade and the framing
# headers (Transfer-Encoding, Content-Length) are the data plane's to handle, not dropped here.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "proxy-connection"})


def hop_by_hop_names(headers: Iterable[tuple[str, str]], *, keep: frozenset[str] = frozenset()) -> set[str]:
    """Lower-case names of the headers to drop before classifying: the fixed hop-by-hop set, every
    `Proxy-*` header and every header `Connection` names — except the framing headers and `keep`."""
    listed = [(name.lower(), value) for name, value in headers]
    names = {name for name, _ in listed if name in HOP_BY_HOP or name.startswith("proxy-")}
    for name, value in listed:
        if name == "connection":
            names.update(token.strip().lower() for token in value.split(",") if token.strip())
    names -= {"transfer-encoding", "content-length", "host"}
    return names - keep


# Frameworks with method-override middleware run the method these name instead of the one sent.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")


def overridden_method(
    headers: Iterable[tuple[str, str]], *, query: str = "", form: str | None = None
) -> str | None:
    """The method the override headers name — or a `_method` parameter in the query or a form body
    (Rails, Laravel, Symfony) — None without them; disagreeing ones are refused. Header names are
    compared as WSGI/CGI upstreams see them (`_` and `-` alike)."""
    from urllib.parse import parse_qsl

    named = {
        normalize_method(value.strip())
        for name, value in headers
        if name.lower().replace("_", "-") in METHOD_OVERRIDE_HEADERS and value.strip()
    }
    for text in (query, form or ""):
        named.update(
            normalize_method(value.strip())
            for key, value in parse_qsl(text, keep_blank_values=True)
            if key == "_method" and value.strip()
        )
    if len(named) > 1:
        raise AmbiguousRequest(
            "request.ambiguous_method", f"method-override headers name {len(named)} different methods"
        )
    return next(iter(named)) if named else None
