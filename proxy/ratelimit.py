"""Token buckets for T1 rules' `limits: {rate: N/unit}`, one per (agent, rule)."""

from __future__ import annotations

from dataclasses import dataclass

from policy.rules import RateLimit


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, max_buckets: int = 10_000) -> None:
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._max = max_buckets

    def take(self, key: tuple[str, str], limit: RateLimit, now: float, cost: int = 1) -> float:
        """Spend `cost` tokens (one per call: a batch of N tool calls costs N): 0.0 when allowed, else
        the seconds until enough are available (never, for more than the rule allows at once)."""
        rate = limit.count / limit.per_seconds
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._buckets.clear()  # bounded memory; clearing only ever makes limits looser for a moment
            bucket = self._buckets[key] = _Bucket(tokens=float(limit.count), updated=now)
        bucket.tokens = min(float(limit.count), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        if cost > limit.count:
            return float(limit.per_seconds)
        return (cost - bucket.tokens) / rate
