"""The golden cases of tests/policy/golden.yaml: example policy, request and expected decision."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ruamel.yaml import YAML

from policy.model import Request
from policy.normalize import build_request
from policy.rules import RuleSet, load_rules

ROOT = Path(__file__).parents[2]
GOLDEN = Path(__file__).with_name("golden.yaml")
EXPECT_KEYS = frozenset({"action", "target", "tier", "rule", "decision", "reason_code"})


@dataclass(frozen=True, slots=True, kw_only=True)
class GoldenCase:
    name: str
    policy: str
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    address: str | None
    expect: dict[str, str | None]
    classified: str | None

    def request(self) -> Request:
        parts = urlsplit(self.url)
        return build_request(
            method=self.method,
            scheme=parts.scheme,
            host=parts.hostname or "",
            port=parts.port,
            target=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            headers=self.headers,
            body=self.body,
            address=self.address,
        )

    def rules(self) -> RuleSet:
        return policy_rules(self.policy)


@cache
def policy_rules(policy: str) -> RuleSet:
    return load_rules((ROOT / policy).read_text(), file=policy)


def _case(raw: dict[str, Any]) -> GoldenCase:
    expect = {key: None if value is None else str(value) for key, value in raw["expect"].items()}
    if set(expect) != EXPECT_KEYS:
        raise ValueError(f"{raw['name']}: expect needs exactly {sorted(EXPECT_KEYS)}")
    headers = raw.get("headers") or {}
    return GoldenCase(
        name=str(raw["name"]),
        policy=str(raw["policy"]),
        method=str(raw["method"]),
        url=str(raw["url"]),
        headers=tuple((str(key), str(value)) for key, value in headers.items()),
        body=str(raw.get("body", "")).encode(),
        address=raw.get("address"),
        expect=expect,
        classified=raw.get("classified"),
    )


def load_cases() -> list[GoldenCase]:
    raw = YAML(typ="safe", pure=True).load(GOLDEN.read_text())
    return [_case(item) for item in raw]
