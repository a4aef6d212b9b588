"""Values the policy core trades in: requests, intents, tiers, verdicts and decisions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum


class Tier(StrEnum):
    """Risk tier of an intent; `deny` never passes."""

    T0 = "T0"
    T1 = "T1"
    T2 = "T2"
    T3 = "T3"
    DENY = "deny"

    @property
    def rank(self) -> int:
        return _TIER_RANK[self]

    @property
    def needs_warrant(self) -> bool:
        return self in (Tier.T2, Tier.T3)

    @classmethod
    def parse(cls, text: str) -> Tier:
        for tier in cls:
            if tier.value == text:
                return tier
        raise ValueError(f"{text!r} is not one of {', '.join(t.value for t in cls)}")


_TIER_RANK = {Tier.T0: 0, Tier.T1: 1, Tier.T2: 2, Tier.T3: 3, Tier.DENY: 4}


def highest_tier(tiers: list[Tier] | tuple[Tier, ...]) -> Tier:
    return max(tiers, key=lambda t: t.rank)


class Verdict(StrEnum):
    """What the data plane does with a request. The values are the `error` field of a deny body."""

    ALLOW = "allow"
    WARRANT_REQUIRED = "warrant_required"
    WARRANT_INVALID = "warrant_invalid"
    DENIED = "denied"
    BAD_REQUEST = "bad_request"

    @property
    def forwards(self) -> bool:
        return self is Verdict.ALLOW

    @property
    def http_status(self) -> int:
        return 400 if self is Verdict.BAD_REQUEST else 403


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A normalised request: what is classified is exactly what is forwarded.

    `host` is lower-case, without trailing dot, IDNA-encoded (or a canonical IP literal, IPv6
    without brackets). `path` is the normalised, still percent-encoded path. `query` is the raw
    query string without `?` ('' when absent). Header names are lower-case.
    `address` is the resolved IP address the proxy will connect to, when known.
    """

    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    body_sha256: str = field(default="")
    address: str | None = None
    # The method on the wire when a method-override header names another (then `method` is the named one).
    wire_method: str | None = None

    def __post_init__(self) -> None:
        if not self.body_sha256:
            object.__setattr__(self, "body_sha256", hashlib.sha256(self.body).hexdigest())

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    @property
    def default_port(self) -> bool:
        return (self.scheme, self.port) in (("http", 80), ("https", 443))

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.default_port else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.authority}{self.path}{query}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Intent:
    """What the agent is trying to do, in the policy's words."""

    action: str
    target: str
    rule: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {"action": self.action, "target": self.target, "rule": self.rule}


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The outcome of `engine.decide`: a value with a fixed, dotted reason code."""

    verdict: Verdict
    tier: Tier
    intent: Intent
    reason_code: str
    reason: str
    policy_revision: str
    warrant_id: str | None = None
    warrant_max_uses: int = 0
    would_deny: bool = False

    @property
    def rule_id(self) -> str | None:
        return self.intent.rule

    @property
    def forwards(self) -> bool:
        return self.verdict.forwards
