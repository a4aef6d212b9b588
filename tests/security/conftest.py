"""Fixtures for the attack suite (two sidecars, recording upstreams) and the per-family summary it prints."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.direct_support import (  # noqa: F401 -- the Vienna Direct fixtures, shared
    direct,
    direct_upstream,
    pg_admin_dsn,
    pg_items,
    reports_db,
)
from tests.security.support import FUZZ_EXAMPLES, MAX_BODY, FamilyCounts, Sidecar, Upstream

# The attack families of issue 6, by test module; the summary counts cases in this order.
FAMILIES: dict[str, str] = {
    "test_path_disguises": "path disguises",
    "test_host_disguises": "host disguises",
    "test_internal_destinations": "internal destinations",
    "test_smuggling": "request smuggling",
    "test_warrant_forgery": "warrant forgery",
    "test_resource_abuse": "resource abuse",
    "test_classified_is_forwarded": "classified = forwarded",
    "test_fleet_trust": "fleet trust (authority)",
    "test_handler_abuse": "handler abuse (Vienna Direct)",
    "test_mcp_smuggling": "MCP smuggling",
    "test_audit_tampering": "audit tampering (retention)",
    "test_fuzz": "fuzzing (properties)",
}
_COUNTS: dict[str, FamilyCounts] = {}

# Hosts the policies name. 127.0.0.1 is where the upstreams listen; naming it is what opens that
# internal address (wildcards never do). blocked.test and bücher.example never resolve: a deny rule
# decides them before any lookup matters.
MAIN_POLICY = """\
version: 1
default_tier: T3
rules:
  - id: admin-deny
    match: {hosts: ["127.0.0.1"], paths: ["/admin/**"]}
    action: demo.admin
    tier: deny
  - id: blocked-hosts
    match: {hosts: ["blocked.test", "bücher.example", "169.254.169.254"]}
    action: demo.blocked
    tier: deny
  - id: refund-large
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/refunds/**"]}
    when: 'request.form.amount > 100000'
    action: demo.refund
    tier: T3
  - id: refund
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/refunds/**"]}
    action: demo.refund
    tier: T1
  - id: order-large
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/orders/**"]}
    when: 'request.json.amount > 100'
    action: demo.order
    tier: T3
  - id: order
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/orders/**"]}
    action: demo.order
    tier: T1
  - id: export-large
    match: {hosts: ["127.0.0.1"], methods: [GET], paths: ["/exports/**"]}
    when: 'request.query.limit > 1000'
    action: demo.export
    tier: T3
  - id: deploy-dry-run
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/deploy/**"]}
    when: 'request.headers["x-dry-run"] == "true"'
    action: demo.deploy_dry_run
    tier: T0
  - id: deploy
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/deploy/**"]}
    action: demo.deploy
    tier: T3
  - id: read
    match: {hosts: ["127.0.0.1"], methods: [GET, HEAD]}
    action: demo.read
    tier: T0
  - id: notes
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/notes/**"]}
    action: demo.note
    tier: T1
  - id: limited
    match: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/limited/**"]}
    action: demo.limited
    tier: T1
    limits: {rate: 3/m}
  - id: files-write
    match: {hosts: ["127.0.0.1"], methods: [PUT], paths: ["/files/**"]}
    action: demo.files_write
    tier: T2
  - id: delete-repo
    match: {hosts: ["127.0.0.1"], methods: [DELETE], paths: ["/repos/{owner}/{repo}"]}
    action: demo.delete_repo
    target: "{owner}/{repo}"
    tier: T3
"""

# Only wildcard and any-host rules: no internal address is named, so every one stays closed.
OPEN_POLICY = """\
version: 1
default_tier: T0
rules:
  - id: internal-names
    match: {hosts: ["*.google.internal", "*.cluster.local"]}
    action: cloud.metadata
    tier: deny
  - id: read-anything
    match: {methods: [GET, HEAD]}
    action: http.read
    tier: T0
  - id: write-anything
    match: {methods: [POST, PUT, PATCH, DELETE]}
    action: http.write
    tier: T1
"""


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_upstream(tls_ca: trustme.CA) -> Iterator[Upstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    server = Upstream(ssl_context=context)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sidecars(
    tmp_path_factory: pytest.TempPathFactory, tls_ca: trustme.CA, upstream: Upstream, tls_upstream: Upstream
) -> Iterator[dict[str, Sidecar]]:
    """Both sidecars, started together (start-up dominates the suite's time) and shared by every module."""
    root = tmp_path_factory.mktemp("security")
    ca_file = root / "upstream-ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    common = ["--upstream-ca-file", str(ca_file), "--upstream-timeout", "3", "--connect-timeout", "2"]
    running = {
        "main": Sidecar(root / "main", policy=MAIN_POLICY, args=[*common, "--max-body-bytes", str(MAX_BODY)]),
        "open": Sidecar(root / "open", policy=OPEN_POLICY, args=common),
    }
    try:
        for sidecar in running.values():
            sidecar.launch()
        for sidecar in running.values():
            sidecar.wait_ready()
        yield running
    finally:
        for sidecar in running.values():
            sidecar.stop()


@pytest.fixture(scope="session")
def main(sidecars: dict[str, Sidecar]) -> Sidecar:
    """Names 127.0.0.1 (the upstreams) in its rules; max body 4096 bytes; a 3/m rate-limited T1 rule."""
    return sidecars["main"]


@pytest.fixture(scope="session")
def open_sidecar(sidecars: dict[str, Sidecar]) -> Sidecar:
    """Wildcard and any-host rules only: every internal destination must stay closed."""
    return sidecars["open"]


# --- the per-family summary -------------------------------------------------------------------------


def _family(nodeid: str) -> str | None:
    module = Path(nodeid.split("::", 1)[0]).stem
    return FAMILIES.get(module)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    family = _family(report.nodeid)
    if family is None:
        return
    counts = _COUNTS.setdefault(family, FamilyCounts())
    if report.when == "call":
        if report.passed:
            counts.passed += 1
        elif report.skipped:
            counts.skipped += 1
        else:
            counts.failed += 1
            counts.names.append(report.nodeid)
    elif report.skipped and report.when == "setup":
        counts.skipped += 1
    elif report.failed:  # a setup or teardown error
        counts.failed += 1
        counts.names.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _COUNTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("Vienna security suite: cases per attack family")
    total = FamilyCounts()
    for family in FAMILIES.values():
        counts = _COUNTS.get(family)
        if counts is None:
            continue
        total.passed += counts.passed
        total.failed += counts.failed
        total.skipped += counts.skipped
        write(
            f"  {family:<24} {counts.passed + counts.failed + counts.skipped:>4} cases: "
            f"{counts.passed} passed, {counts.failed} failed, {counts.skipped} skipped"
        )
    write(
        f"  {'all families':<24} {total.passed + total.failed + total.skipped:>4} cases: "
        f"{total.passed} passed, {total.failed} failed, {total.skipped} skipped"
    )
    for name, examples in FUZZ_EXAMPLES.items():
        write(f"  fuzz examples run: {name:<40} {examples}")
    for counts in _COUNTS.values():
        for name in counts.names:
            write(f"  FAILED {name}")
