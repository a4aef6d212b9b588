"""Warrant claims, signing and verification against a request (the only module that calls jwt)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from policy.approvals import WarrantRequest
from policy.mcp import McpAmbiguous, McpMessage, parse_mcp
from policy.model import Intent, Request, Tier
from policy.rules import WARRANT_TTL_CAPS, Rule

MIN_KEY_BYTES = 32
MAX_TOKEN_CHARS = 32768  # bounds the parsing work an agent can make us do; `mint` stays below it
ALGORITHM = "HS256"  # the standalone sidecar's own warrants (one HMAC secret)
EDDSA = "EdDSA"  # the fleet authority's warrants (Ed25519): sidecars hold the public key only
TOKEN_TYPE = "warrant+jwt"
ISSUER = "vienna"

# Used to mint only (verification checks the HMAC itself); HS256 is the one algorithm registered.
_JWS = jwt.PyJWS(algorithms=[ALGORITHM], options={"enforce_minimum_key_length": True})
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Header parameters we mint. Anything else (crit, b64, jku, x5u, ...) changes how a token is read,
# so it is refused rather than ignored.
_HEADER_KEYS = frozenset({"alg", "typ", "kid"})
_CONSTRAINT_KEYS = frozenset(
    {
        "method",
        "scheme",
        "host",
        "port",
        "path",
        "path_prefix",
        "query",
        "body_sha256",
        "content_type",
        "max_uses",
        "mcp_tool",
        "mcp_arguments_sha256",
    }
)


@dataclass(frozen=True, slots=True)
class WarrantKeys:
    """Keys that verify warrants, by key id: HMAC secrets (HS256, which also mint, with `active_kid`)
    and Ed25519 public keys (EdDSA, verify only). Each key id has one algorithm: a token naming a
    kid is checked with that key's algorithm and no other (no algorithm confusion)."""

    keys: Mapping[str, bytes] = field(repr=False)
    active_kid: str | None
    public_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.keys and not self.public_keys:
            raise ValueError("at least one warrant key is needed")
        for kid, secret in self.keys.items():
            if not isinstance(kid, str) or not kid:
                raise ValueError("warrant key ids must be non-empty strings")
            if not isinstance(secret, bytes) or len(secret) < MIN_KEY_BYTES:
                raise ValueError(f"warrant key {kid!r} must be at least {MIN_KEY_BYTES} bytes")
        for kid, public in self.public_keys.items():
            if not isinstance(kid, str) or not kid or kid in self.keys:
                raise ValueError("public key ids must be non-empty strings, distinct from HMAC key ids")
            if not isinstance(public, Ed25519PublicKey):
                raise ValueError(f"public key {kid!r} is not an Ed25519 key")
        if self.active_kid is not None and self.active_kid not in self.keys:
            raise ValueError(f"active key id {self.active_kid!r} is not among the warrant keys")
        # A private read-only copy: a caller mutating its dict must not change what verifies.
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))
        object.__setattr__(self, "public_keys", MappingProxyType(dict(self.public_keys)))

    @property
    def algorithms(self) -> tuple[str, ...]:
        return (*((ALGORITHM,) if self.keys else ()), *((EDDSA,) if self.public_keys else ()))

    def algorithm_of(self, kid: str) -> str | None:
        if kid in self.keys:
            return ALGORITHM
        if kid in self.public_keys:
            return EDDSA
        return None


def public_key_id(public: Ed25519PublicKey) -> str:
    """A stable key id for an Ed25519 key: derived from the key, so every replica holding it agrees."""
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "ed-" + hashlib.sha256(b"vienna-kid:" + raw).hexdigest()[:16]


def jwk_of(public: Ed25519PublicKey, kid: str) -> dict[str, str]:
    """RFC 8037: an Ed25519 public key as a JWK."""
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw), "kid": kid, "alg": EDDSA, "use": "sig"}


def public_key_from_jwk(jwk: Mapping[str, object]) -> tuple[str, Ed25519PublicKey]:
    """(kid, key) from an RFC 8037 JWK; raises ValueError for anything but an Ed25519 signing key."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ValueError("only OKP / Ed25519 keys are accepted")
    if jwk.get("alg", EDDSA) != EDDSA or jwk.get("use", "sig") != "sig":
        raise ValueError("the key is not an EdDSA signing key")
    kid, x = jwk.get("kid"), jwk.get("x")
    if not isinstance(kid, str) or not kid or not isinstance(x, str):
        raise ValueError("a JWK needs 'kid' and 'x'")
    try:
        raw = _segment(x, "x")
    except _Malformed as exc:
        raise ValueError(str(exc)) from None
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return kid, Ed25519PublicKey.from_public_bytes(raw)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class Bind(StrEnum):
    """How tightly a warrant is bound to the request that asked for it."""

    EXACT = "exact"
    PATH = "path"
    HOST = "host"
    MCP = "mcp"  # the endpoint, the tool name and the arguments' digest; never the JSON-RPC id


@dataclass(frozen=True, slots=True, kw_only=True)
class Constraints:
    """What a request must look like to be covered by a warrant; None means "any"."""

    method: str
    scheme: str
    host: str
    port: int
    path: str | None
    path_prefix: str | None
    query: str | None
    body_sha256: str | None
    max_uses: int = 1
    # The body's media type as sent ("" = no Content-Type): the same bytes mean another thing as a form.
    content_type: str | None = None
    mcp_tool: str | None = None
    mcp_arguments_sha256: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        if self.max_uses < 1:
            raise ValueError("max_uses must be at least 1")
        if self.body_sha256 is not None and not _SHA256_HEX.fullmatch(self.body_sha256):
            raise ValueError("body_sha256 must be 64 lower-case hex digits")
        if (self.mcp_tool is None) != (self.mcp_arguments_sha256 is None):
            raise ValueError("mcp_tool and mcp_arguments_sha256 go together")
        if self.mcp_arguments_sha256 is not None and not _SHA256_HEX.fullmatch(self.mcp_arguments_sha256):
            raise ValueError("mcp_arguments_sha256 must be 64 lower-case hex digits")

    def as_claim(self) -> dict[str, object]:
        claim: dict[str, object] = {
            "method": self.method,
            "scheme": self.scheme,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "path_prefix": self.path_prefix,
            "query": self.query,
            "body_sha256": self.body_sha256,
            "content_type": self.content_type,
            "max_uses": self.max_uses,
            "mcp_tool": self.mcp_tool,
            "mcp_arguments_sha256": self.mcp_arguments_sha256,
        }
        return {key: value for key, value in claim.items() if value is not None}


def constraints_for(
    request: Request, *, bind: Bind = Bind.EXACT, max_uses: int = 1, mcp: tuple[str, str] | None = None
) -> Constraints:
    """`mcp` is (tool, arguments digest) when already known; otherwise it is read from the body."""
    if bind is Bind.MCP:
        if mcp is None:
            call = single_call(request)
            if call is None:
                raise ValueError("bind: mcp needs a request holding exactly one tools/call")
            mcp = (str(call.tool), call.arguments_sha256)
        return Constraints(
            method=request.method,
            scheme=request.scheme,
            host=request.host,
            port=request.port,
            path=request.path,
            path_prefix=None,
            query=request.query,
            body_sha256=None,
            content_type=None,
            max_uses=max_uses,
            mcp_tool=mcp[0],
            mcp_arguments_sha256=mcp[1],
        )
    exact = bind is Bind.EXACT
    return Constraints(
        method=request.method,
        scheme=request.scheme,
        host=request.host,
        port=request.port,
        path=None if bind is Bind.HOST else request.path,
        path_prefix=None,
        query=request.query if exact else None,
        body_sha256=request.body_sha256 if exact else None,
        content_type=content_type_of(request) if exact else None,
        max_uses=max_uses,
    )


def single_call(request: Request) -> McpMessage | None:
    """The one tools/call of a request that holds exactly one and nothing else (None otherwise)."""
    try:
        body = parse_mcp(request.body, request.header("content-type"))
    except McpAmbiguous:
        return None
    if body is None or body.batch or len(body.messages) != 1 or not body.calls:
        return None
    return body.calls[0]


def content_type_of(request: Request) -> str:
    """The Content-Type as bound by a warrant: the type and parameter names lower-cased, space around
    `;` and `=` dropped, parameter values byte for byte (a multipart boundary is case-sensitive)."""
    value = request.header("content-type") or ""
    media, *params = value.split(";")
    parts = [media.strip().lower()]
    for param in params:
        name, sep, rest = param.partition("=")
        if name.strip() or rest.strip():
            parts.append(name.strip().lower() + sep + rest.strip())
    return ";".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Approval:
    who: str
    at: float
    justification: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WarrantClaims:
    iss: str
    sub: str
    jti: str
    iat: int
    nbf: int
    exp: int
    tier: Tier
    intent: Intent
    approvals: tuple[Approval, ...]
    con: Constraints
    wrq: str | None = None
    # The minting sidecar instance (its data dir): a warrant is used up in one single-use store only,
    # so another sidecar sharing the agent id and key must not accept it again.
    sid: str | None = None

    def as_payload(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "iss": self.iss,
            "sub": self.sub,
            "jti": self.jti,
            "iat": self.iat,
            "nbf": self.nbf,
            "exp": self.exp,
            "tier": self.tier.value,
            "intent": self.intent.as_dict(),
            "approvals": [
                {"who": a.who, "at": a.at, "justification": a.justification} for a in self.approvals
            ],
            "con": self.con.as_claim(),
        }
        if self.wrq is not None:
            payload["wrq"] = self.wrq
        if self.sid is not None:
            payload["sid"] = self.sid
        return payload


def _claims_json(claims: WarrantClaims) -> bytes:
    return json.dumps(
        claims.as_payload(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def approved_claims(
    request: WarrantRequest,
    constraints: Constraints,
    *,
    ttl_seconds: int,
    now: float,
    jti: str,
    sid: str | None = None,
) -> WarrantClaims:
    """The claims of the warrant an approved request gets: its agent, tier, intent, the operators who
    approved it, the constraints; valid from `now` for `ttl_seconds` (the caller chose the `jti`)."""
    issued = int(now)
    return WarrantClaims(
        iss=ISSUER,
        sub=request.agent,
        jti=jti,
        iat=issued,
        nbf=issued,
        exp=issued + ttl_seconds,
        tier=request.tier,
        intent=request.intent,
        approvals=tuple(
            Approval(who=v.operator, at=v.at, justification=v.justification)
            for v in request.votes
            if v.approve
        ),
        con=constraints,
        wrq=request.id,
        sid=sid,
    )


def mint(claims: WarrantClaims, keys: WarrantKeys) -> str:
    if keys.active_kid is None:
        raise ValueError("these keys verify only: no HMAC key to mint with")
    token = _JWS.encode(
        _claims_json(claims),
        keys.keys[keys.active_kid],
        algorithm=ALGORITHM,
        headers={"typ": TOKEN_TYPE, "kid": keys.active_kid},
    )
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"warrant would be {len(token)} characters, more than verify accepts")
    return token


def mint_eddsa(claims: WarrantClaims, private: Ed25519PrivateKey, kid: str) -> str:
    """An EdDSA warrant (the authority's): header and payload in one canonical form, Ed25519-signed."""
    header = json.dumps({"alg": EDDSA, "kid": kid, "typ": TOKEN_TYPE}, sort_keys=True, separators=(",", ":"))
    signing_input = _b64(header.encode("utf-8")) + "." + _b64(_claims_json(claims))
    token = signing_input + "." + _b64(private.sign(signing_input.encode("ascii")))
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(f"warrant would be {len(token)} characters, more than verify accepts")
    return token


@dataclass(frozen=True, slots=True)
class WarrantValid:
    claims: WarrantClaims


@dataclass(frozen=True, slots=True)
class WarrantRefused:
    code: str
    reason: str


def verify(
    token: str,
    request: Request,
    *,
    agent: str,
    keys: WarrantKeys,
    now: float,
    required_tier: Tier,
    issuer: str = ISSUER,
    leeway: int = 0,
    sidecar: str | None = None,
) -> WarrantValid | WarrantRefused:
    """Check `token` for `request`; every failure is a refusal with a stable code, never an exception."""
    try:
        header, payload = _split(token)
        claims, unknown_constraints = _parse_claims(payload)
    except _Malformed as exc:
        return WarrantRefused("warrant.malformed", str(exc))

    refused = check_signature(token, header, keys)
    if refused is not None:
        return refused

    # Written as `not (...)` so that a NaN clock fails closed.
    if not now < claims.exp + leeway:
        return WarrantRefused("warrant.expired", f"warrant expired (exp {claims.exp})")
    if not now >= claims.nbf - leeway:
        return WarrantRefused("warrant.not_yet_valid", f"warrant is not yet valid (nbf {claims.nbf})")
    if claims.iss != issuer:
        return WarrantRefused("warrant.issuer", f"issuer {_shown(claims.iss)} is not {issuer!r}")
    if claims.sid is not None and sidecar is not None and claims.sid != sidecar:
        return WarrantRefused(
            "warrant.wrong_sidecar",
            f"warrant was minted by sidecar {_shown(claims.sid)} and is used up only there; this is {sidecar!r}",
        )
    if claims.sub != agent:
        return WarrantRefused(
            "warrant.wrong_agent",
            f"wrong agent: warrant sub is {_shown(claims.sub)}, this agent is {agent!r}",
        )
    if not (
        claims.tier.needs_warrant and required_tier.needs_warrant and claims.tier.rank >= required_tier.rank
    ):
        return WarrantRefused(
            "warrant.tier", f"a {claims.tier} warrant does not cover a {required_tier} request"
        )
    if unknown_constraints:
        return WarrantRefused(
            "warrant.unknown_constraint",
            f"unknown constraint(s): {', '.join(sorted(unknown_constraints))}",
        )
    mismatch = _first_mismatch(claims.con, request)
    if mismatch is not None:
        return WarrantRefused(
            f"warrant.mismatch.{mismatch}",
            f"constraint mismatch: the request's {mismatch} is not what the warrant covers",
        )
    return WarrantValid(claims)


def read_warrant(
    token: str, *, keys: WarrantKeys, now: float, issuer: str = ISSUER, leeway: int = 0
) -> WarrantValid | WarrantRefused:
    """A warrant's claims when `keys` signed it and it is within its lifetime, with no request to
    check it against (the authority consuming a use; the request was checked by the sidecar)."""
    try:
        header, payload = _split(token)
        claims, _ = _parse_claims(payload)
    except _Malformed as exc:
        return WarrantRefused("warrant.malformed", str(exc))
    refused = check_signature(token, header, keys)
    if refused is not None:
        return refused
    if not now < claims.exp + leeway:
        return WarrantRefused("warrant.expired", f"warrant expired (exp {claims.exp})")
    if not now >= claims.nbf - leeway:
        return WarrantRefused("warrant.not_yet_valid", f"warrant is not yet valid (nbf {claims.nbf})")
    if claims.iss != issuer:
        return WarrantRefused("warrant.issuer", f"issuer {_shown(claims.iss)} is not {issuer!r}")
    return WarrantValid(claims)


def check_signature(token: str, header: Mapping[str, object], keys: WarrantKeys) -> WarrantRefused | None:
    """The header checks and the signature; None when the token was signed by one of `keys`.

    The header is checked before any key is touched, so `none`, RS256-with-our-secret and HS256
    signed with a public key (algorithm confusion) never reach signature code: each key id has one
    algorithm, and a token is checked with that one only."""
    alg = header.get("alg")
    accepted = keys.algorithms
    if alg not in accepted:
        return WarrantRefused(
            "warrant.algorithm", f"algorithm {_shown(alg)} is not accepted, only {', '.join(accepted)}"
        )
    if header.get("typ") != TOKEN_TYPE:
        return WarrantRefused("warrant.type", f"token type {_shown(header.get('typ'))} is not {TOKEN_TYPE}")
    # A token without `kid` is checked against the active HMAC key; a `kid` we do not hold is
    # refused (never tried against another key).
    kid = header.get("kid", keys.active_kid)
    key_alg = keys.algorithm_of(kid) if isinstance(kid, str) else None
    if key_alg is None:
        return WarrantRefused("warrant.unknown_key", f"unknown key id (kid) {_shown(kid)}")
    assert isinstance(kid, str)
    if alg != key_alg:
        return WarrantRefused(
            "warrant.algorithm", f"key {_shown(kid)} verifies {key_alg} only, not {_shown(alg)}"
        )
    signing_input, _, signature = token.rpartition(".")
    raw_signature = _segment(signature, "signature")
    if key_alg == ALGORITHM:
        # HS256 is pinned and the segments were already checked to be canonical base64url, so the
        # signature is checked here directly (PyJWS would parse the whole token a second time).
        expected = hmac.new(keys.keys[kid], signing_input.encode("ascii"), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, raw_signature):
            return WarrantRefused("warrant.bad_signature", "signature does not verify")
        return None
    try:
        keys.public_keys[kid].verify(raw_signature, signing_input.encode("ascii"))
    except InvalidSignature:
        return WarrantRefused("warrant.bad_signature", "signature does not verify")
    return None


def _first_mismatch(con: Constraints, request: Request) -> str | None:
    checks: tuple[tuple[str, bool], ...] = (
        ("method", con.method == request.method),
        ("scheme", con.scheme == request.scheme),
        ("host", con.host == request.host),
        ("port", con.port == request.port),
        (
            "path",
            (con.path is None or con.path == request.path)
            and (con.path_prefix is None or _under_prefix(request.path, con.path_prefix)),
        ),
        ("query", con.query is None or con.query == request.query),
        (
            "body",
            con.body_sha256 is None
            or hmac.compare_digest(con.body_sha256.encode(), request.body_sha256.encode()),
        ),
        ("content_type", con.content_type is None or con.content_type == content_type_of(request)),
        ("mcp", con.mcp_tool is None or _mcp_matches(con, request)),
    )
    return next((name for name, ok in checks if not ok), None)


def _mcp_matches(con: Constraints, request: Request) -> bool:
    call = single_call(request)
    return (
        call is not None
        and call.tool == con.mcp_tool
        and con.mcp_arguments_sha256 is not None
        and hmac.compare_digest(call.arguments_sha256.encode(), con.mcp_arguments_sha256.encode())
    )


def _under_prefix(path: str, prefix: str) -> bool:
    # Segment-wise: a prefix of /v1/refunds must not cover /v1/refunds-all.
    boundary = prefix if prefix.endswith("/") else prefix + "/"
    return path == prefix or path.startswith(boundary)


class _Malformed(Exception):
    """Raised only while parsing; `verify` turns it into a `warrant.malformed` refusal."""


def _split(token: object) -> tuple[dict[str, object], dict[str, object]]:
    if not isinstance(token, str):
        raise _Malformed("token is not a string")
    if len(token) > MAX_TOKEN_CHARS:
        raise _Malformed(f"token is longer than {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise _Malformed("token does not have three parts")
    header = _json_object(_segment(parts[0], "header"), "header")
    payload = _json_object(_segment(parts[1], "payload"), "payload")
    _segment(parts[2], "signature")
    extra = set(header) - _HEADER_KEYS
    if extra:
        raise _Malformed(f"unsupported header parameter(s): {', '.join(sorted(extra))}")
    return header, payload


def _segment(text: str, what: str) -> bytes:
    if not _SEGMENT.fullmatch(text) or len(text) % 4 == 1:
        raise _Malformed(f"{what} is not base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Unused trailing bits would let two spellings carry the same bytes; only one is accepted.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
        raise _Malformed(f"{what} is not canonical base64url")
    return raw


def _json_object(raw: bytes, what: str) -> dict[str, object]:
    try:
        value = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise _Malformed(f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise _Malformed(f"{what} is not a JSON object")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Duplicate keys are read differently by different parsers; refuse rather than pick one.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_claims(payload: Mapping[str, object]) -> tuple[WarrantClaims, frozenset[str]]:
    tier_text = _str(payload, "tier")
    try:
        tier = Tier.parse(tier_text)
    except ValueError as exc:
        raise _Malformed(f"claim 'tier' is not a tier: {_shown(tier_text)}") from exc
    intent = _obj(payload, "intent")
    raw_approvals = payload.get("approvals")
    if not isinstance(raw_approvals, list) or not all(isinstance(a, dict) for a in raw_approvals):
        raise _Malformed("claim 'approvals' must be a list of objects")
    approvals = tuple(
        Approval(
            who=_str(a, "who", "approvals."),
            at=_number(a, "at", "approvals."),
            justification=_str(a, "justification", "approvals."),
        )
        for a in raw_approvals
    )
    con = _obj(payload, "con")
    constraints = _constraints(con)
    claims = WarrantClaims(
        iss=_str(payload, "iss"),
        sub=_str(payload, "sub"),
        jti=_str(payload, "jti"),
        iat=_int(payload, "iat"),
        nbf=_int(payload, "nbf"),
        exp=_int(payload, "exp"),
        tier=tier,
        intent=Intent(
            action=_str(intent, "action", "intent."),
            target=_str(intent, "target", "intent."),
            rule=_opt_str(intent, "rule", "intent."),
        ),
        approvals=approvals,
        con=constraints,
        wrq=_opt_str(payload, "wrq"),
        sid=_opt_str(payload, "sid"),
    )
    return claims, frozenset(con) - _CONSTRAINT_KEYS


def _constraints(con: Mapping[str, object]) -> Constraints:
    try:
        return Constraints(
            method=_str(con, "method", "con."),
            scheme=_str(con, "scheme", "con."),
            host=_str(con, "host", "con."),
            port=_int(con, "port", "con."),
            path=_opt_str(con, "path", "con."),
            path_prefix=_opt_str(con, "path_prefix", "con."),
            query=_opt_str(con, "query", "con."),
            body_sha256=_opt_str(con, "body_sha256", "con."),
            content_type=_opt_str(con, "content_type", "con."),
            max_uses=_int(con, "max_uses", "con.") if "max_uses" in con else 1,
            mcp_tool=_opt_str(con, "mcp_tool", "con."),
            mcp_arguments_sha256=_opt_str(con, "mcp_arguments_sha256", "con."),
        )
    except ValueError as exc:
        raise _Malformed(f"claim 'con' is invalid: {exc}") from exc


def constraints_from_claim(con: Mapping[str, object]) -> Constraints:
    """Constraints from their claim form (`as_claim`); raises ValueError for anything else."""
    unknown = set(con) - _CONSTRAINT_KEYS
    if unknown:
        raise ValueError(f"unknown constraint(s): {', '.join(sorted(unknown))}")
    try:
        return _constraints(con)
    except _Malformed as exc:
        raise ValueError(str(exc)) from None


def _shown(value: object) -> str:
    # Reasons echo what the token said, but never at length: a nested or huge value is only named.
    if value is None:
        return "(missing)"
    return repr(value[:40]) if isinstance(value, str) else f"(a JSON {type(value).__name__})"


def _str(obj: Mapping[str, object], key: str, where: str = "") -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Malformed(f"claim '{where}{key}' must be a string")
    return value


def _opt_str(obj: Mapping[str, object], key: str, where: str = "") -> str | None:
    return None if obj.get(key) is None else _str(obj, key, where)


def _int(obj: Mapping[str, object], key: str, where: str = "") -> int:
    value = obj.get(key)
    # bool is an int subclass; `true` is not a time or a port.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Malformed(f"claim '{where}{key}' must be an integer")
    return value


def _number(obj: Mapping[str, object], key: str, where: str = "") -> float:
    value = obj.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Malformed(f"claim '{where}{key}' must be a number")
    # 1e999 parses as inf and a 400-digit integer does not fit a float: neither is a time.
    if (isinstance(value, int) and abs(value) > 2**53) or not math.isfinite(value):
        raise _Malformed(f"claim '{where}{key}' is out of range")
    return float(value)


def _obj(obj: Mapping[str, object], key: str) -> dict[str, object]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise _Malformed(f"claim '{key}' must be an object")
    return value


# Issue terms when the rule says nothing (or more): T2 warrants live 15 minutes, T3 five.
DEFAULT_TTL_SECONDS = MappingProxyType(dict(WARRANT_TTL_CAPS))


@dataclass(frozen=True, slots=True, kw_only=True)
class WarrantTerms:
    """How a warrant for one rule is issued: lifetime, uses and how tightly it binds."""

    ttl_seconds: int
    max_uses: int
    bind: Bind


def terms_for(tier: Tier, rule: Rule | None) -> WarrantTerms:
    """The rule's `warrant:` settings; its ttl may shorten the tier's default, never lengthen it."""
    ttl = DEFAULT_TTL_SECONDS.get(tier, DEFAULT_TTL_SECONDS[Tier.T3])
    if rule is None:
        return WarrantTerms(ttl_seconds=ttl, max_uses=1, bind=Bind.EXACT)
    settings = rule.warrant
    if settings.ttl_seconds is not None:
        ttl = min(ttl, settings.ttl_seconds)
    return WarrantTerms(ttl_seconds=ttl, max_uses=settings.max_uses, bind=Bind(settings.bind))
