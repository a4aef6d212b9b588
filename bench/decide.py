"""decide() latency (p50/p99, µs) for generated policies of 10, 1,000 and 10,000 rules.

Run by hand: `python bench/decide.py [--quick]`. Prints a markdown table; asserts nothing.
Each policy has many distinct hosts with a few rules each (one with a CEL `when`) and a handful of
any-host rules; requests go to a host in the middle of the index.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policy.engine import decide
from policy.model import Decision, Intent, Request, Tier, Verdict
from policy.rules import RuleSet, load_rules
from policy.warrants import Approval, WarrantClaims, WarrantKeys, constraints_for, mint

AGENT = "bench-agent"
NOW = 1_700_000_000.0
KEYS = WarrantKeys({"bench": b"b" * 32}, "bench")
SIZES = (10, 1_000, 10_000)
ANY_HOST_RULES_BEFORE = 2
ANY_HOST_RULES_AFTER = 3
RULES_PER_HOST = 4


def policy_text(size: int) -> str:
    """A policy of exactly `size` rules (at least ANY_HOST_RULES_BEFORE + ANY_HOST_RULES_AFTER + 4)."""
    before: list[dict[str, object]] = [
        {
            "id": "no-trace",
            "match": {"methods": ["TRACE", "CONNECT"]},
            "action": "http.trace",
            "tier": "deny",
        },
        {"id": "no-admin", "match": {"paths": ["/admin/**"]}, "action": "http.admin", "tier": "deny"},
    ]
    after: list[dict[str, object]] = [
        {"id": "read-only", "match": {"methods": ["GET", "HEAD"]}, "action": "http.read", "tier": "T0"},
        {"id": "options", "match": {"methods": ["OPTIONS"]}, "action": "http.options", "tier": "T0"},
        {
            "id": "write",
            "match": {"methods": ["POST", "PUT", "PATCH", "DELETE"]},
            "action": "http.write",
            "tier": "T2",
        },
    ]
    per_host: list[dict[str, object]] = []
    host_count = (size - len(before) - len(after)) // RULES_PER_HOST
    for number in range(host_count):
        host = f"svc{number}.example.com"
        per_host += [
            {
                "id": f"svc{number}-read",
                "match": {"hosts": [host], "methods": ["GET", "HEAD"]},
                "action": "svc.read",
                "tier": "T0",
            },
            {
                "id": f"svc{number}-delete",
                "match": {"hosts": [host], "methods": ["DELETE"], "paths": ["/items/{item}"]},
                "action": "svc.delete",
                "target": "{item}",
                "tier": "T3",
            },
            {
                "id": f"svc{number}-pay-large",
                "match": {"hosts": [host], "methods": ["POST"], "paths": ["/pay"]},
                "when": "request.form.amount > 100000",
                "action": "svc.pay",
                "tier": "T3",
            },
            {
                "id": f"svc{number}-write",
                "match": {"hosts": [host], "methods": ["POST", "PUT", "PATCH"]},
                "action": "svc.write",
                "tier": "T2",
            },
        ]
    filler = size - len(before) - len(after) - len(per_host)
    per_host += [
        {
            "id": f"extra-{number}",
            "match": {"hosts": [f"extra{number}.example.org"]},
            "action": "extra.any",
            "tier": "T1",
        }
        for number in range(filler)
    ]
    return json.dumps({"version": 1, "default_tier": "T3", "rules": before + per_host + after}, indent=1)


def middle_host(size: int) -> str:
    host_count = (size - ANY_HOST_RULES_BEFORE - ANY_HOST_RULES_AFTER) // RULES_PER_HOST
    return f"svc{host_count // 2}.example.com"


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    request: Request
    warrant: str | None
    expect: Verdict


def scenarios(host: str) -> list[Scenario]:
    form = (("content-type", "application/x-www-form-urlencoded"),)
    read = Request(method="GET", scheme="https", host=host, port=443, path="/items/42")
    delete = Request(method="DELETE", scheme="https", host=host, port=443, path="/items/42")
    pay = Request(
        method="POST", scheme="https", host=host, port=443, path="/pay", headers=form, body=b"amount=250000"
    )
    small_pay = Request(
        method="POST", scheme="https", host=host, port=443, path="/pay", headers=form, body=b"amount=50"
    )
    unmatched = Request(method="DELETE", scheme="https", host="elsewhere.example.net", port=443, path="/x")
    return [
        Scenario(name="T0 read", request=read, warrant=None, expect=Verdict.ALLOW),
        Scenario(name="T3, no warrant", request=delete, warrant=None, expect=Verdict.WARRANT_REQUIRED),
        Scenario(
            name="T3 + warrant verified", request=delete, warrant=_warrant(delete), expect=Verdict.ALLOW
        ),
        Scenario(name="CEL when true (T3)", request=pay, warrant=None, expect=Verdict.WARRANT_REQUIRED),
        Scenario(name="CEL when true + warrant", request=pay, warrant=_warrant(pay), expect=Verdict.ALLOW),
        Scenario(
            name="CEL when false (T2)", request=small_pay, warrant=None, expect=Verdict.WARRANT_REQUIRED
        ),
        Scenario(
            name="other host, any-host rule", request=unmatched, warrant=None, expect=Verdict.WARRANT_REQUIRED
        ),
    ]


def _warrant(request: Request) -> str:
    claims = WarrantClaims(
        iss="vienna",
        sub=AGENT,
        jti=f"bench-{request.method}-{request.path}",
        iat=int(NOW) - 60,
        nbf=int(NOW) - 60,
        exp=int(NOW) + 3600,
        tier=Tier.T3,
        intent=Intent(action="bench", target="bench", rule=None),
        approvals=(
            Approval(who="alice", at=NOW - 30, justification="bench"),
            Approval(who="bob", at=NOW - 20, justification="bench"),
        ),
        con=constraints_for(request),
    )
    return mint(claims, KEYS)


def _run(rules: RuleSet, scenario: Scenario) -> Decision:
    return decide(scenario.request, rules=rules, warrant=scenario.warrant, agent=AGENT, keys=KEYS, now=NOW)


def measure(call: Callable[[], object], iterations: int) -> tuple[float, float]:
    """(p50, p99) in microseconds."""
    for _ in range(min(1000, iterations)):
        call()
    samples: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        call()
        samples.append(clock() - start)
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49] / 1000, cuts[98] / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--iterations", type=int, default=0, help="calls per measurement")
    args = parser.parse_args()
    iterations = args.iterations or (2_000 if args.quick else 20_000)

    print(f"Python {sys.version.split()[0]}; {iterations} calls per row; times in µs\n")
    print("| rules | scenario | verdict | tier | p50 µs | p99 µs |")
    print("|---:|---|---|---|---:|---:|")
    loads: list[str] = []
    for size in SIZES:
        text = policy_text(size)
        started = time.perf_counter()
        rules = load_rules(text, file=f"bench-{size}.yaml")
        loads.append(f"{size:,} rules: load_rules {time.perf_counter() - started:.2f} s")
        gc.collect()  # the YAML parser's garbage is not decide()'s to pay for
        if len(rules.rules) != size:
            print(f"generated {len(rules.rules)} rules, wanted {size}", file=sys.stderr)
            return 1
        for scenario in scenarios(middle_host(size)):
            decision = _run(rules, scenario)
            if decision.verdict is not scenario.expect:
                print(f"{scenario.name}: got {decision.verdict} ({decision.reason})", file=sys.stderr)
                return 1
            p50, p99 = measure(partial(_run, rules, scenario), iterations)
            print(
                f"| {size:,} | {scenario.name} | {decision.verdict} | {decision.tier} | {p50:.1f} | {p99:.1f} |"
            )
    print()
    for line in loads:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
