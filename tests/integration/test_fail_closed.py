"""Nothing fails open: broken `when`, a raising addon, internal destinations, CONNECT; and dryrun only marks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    Sidecar,
    Upstream,
    assert_refused,
    raw_connect,
    running_sidecar,
    unique,
)

# Every rule opens any host or a wildcard; none names a loopback host, so loopback stays closed.
WILDCARD_POLICY = """\
version: 1
default_tier: T0
rules:
  - id: example-reads
    match: {hosts: ["*.example.com"], methods: [GET]}
    action: example.read
    tier: T0
  - id: anything
    match: {methods: [GET, POST, PUT, DELETE]}
    action: http.any
    tier: T0
"""


@pytest.fixture(scope="module")
def wildcard_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with running_sidecar(tmp_path_factory.mktemp("wildcard"), policy=WILDCARD_POLICY) as sidecar:
        yield sidecar


@pytest.fixture(scope="module")
def faulty_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with running_sidecar(
        tmp_path_factory.mktemp("faulty"), env={"VIENNA_TEST_FAULT": "addon"}, audit_stdout=False
    ) as sidecar:
        yield sidecar


@pytest.fixture(scope="module")
def dryrun_sidecar(tmp_path_factory: pytest.TempPathFactory, upstream_ca_file: Path) -> Iterator[Sidecar]:
    with running_sidecar(
        tmp_path_factory.mktemp("dryrun"),
        args=["--enforcement", "dryrun", "--upstream-ca-file", str(upstream_ca_file)],
        audit_stdout=False,
    ) as sidecar:
        yield sidecar


def test_when_that_cannot_be_evaluated_fails_closed(sidecar: Sidecar, upstream: Upstream) -> None:
    """The rule would make this read T0; its `when` errors, so it counts at T2 and needs a warrant."""
    path = "/guarded/" + unique("when")
    refused = sidecar.request("GET", upstream.url(path))
    body = assert_refused(refused, 403, "warrant_required", "warrant.required")
    assert (body["tier"], body["intent"]["rule"]) == ("T2", "guarded-read")
    assert "when could not be evaluated" in body["reason"]
    assert upstream.seen(path) == []


def test_exception_inside_the_addon_refuses_instead_of_forwarding(
    faulty_sidecar: Sidecar, upstream: Upstream
) -> None:
    path = "/" + unique("fault")
    refused = faulty_sidecar.request("GET", upstream.url(path))
    assert_refused(refused, 403, "denied", "internal.error")
    assert upstream.seen(path) == []
    assert "injected fault" in faulty_sidecar.log_text()


def test_exception_inside_the_addon_refuses_a_warranted_request_too(
    faulty_sidecar: Sidecar, upstream: Upstream
) -> None:
    path = "/items/" + unique("fault-warrant")
    warrant = faulty_sidecar.obtain_warrant("PUT", upstream.url(path), data=b"x")
    refused = faulty_sidecar.request("PUT", upstream.url(path), data=b"x", warrant=warrant)
    assert_refused(refused, 403, "denied", "internal.error")
    assert upstream.seen(path) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_is_refused_when_only_wildcard_and_any_host_rules_exist(
    wildcard_sidecar: Sidecar, upstream: Upstream, host: str
) -> None:
    path = "/" + unique("internal")
    refused = wildcard_sidecar.request("GET", upstream.url(path, host=host))
    body = assert_refused(refused, 403, "denied", "destination.internal")
    assert body["tier"] == "deny"
    assert "warrant_request" not in body
    assert upstream.seen(path) == []


def test_connect_to_loopback_not_named_by_a_rule_is_refused_before_any_tunnel(
    wildcard_sidecar: Sidecar, tls_upstream: Upstream
) -> None:
    answer = raw_connect(wildcard_sidecar.proxy_port, f"127.0.0.1:{tls_upstream.port}")
    assert_refused(answer, 403, "denied", "destination.internal")
    assert tls_upstream.seen() == []


@pytest.mark.parametrize("authority", ["127.0.0.2:443", "[::1]:443", "10.0.0.1:443", "169.254.169.254:443"])
def test_connect_to_an_internal_address_the_policy_does_not_name_is_refused(
    sidecar: Sidecar, authority: str
) -> None:
    answer = raw_connect(sidecar.proxy_port, authority)
    assert_refused(answer, 403, "denied", "destination.internal")


def test_dryrun_forwards_a_t3_request_marked_would_deny(dryrun_sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/repos/acme/" + unique("dryrun")
    response = dryrun_sidecar.request("DELETE", upstream.url(path))
    assert response.status_code == 200
    assert response.headers["Vienna-Decision"] == "would-deny"
    assert len(upstream.seen(path)) == 1


def test_dryrun_forwards_a_deny_tier_request_marked_would_deny(
    dryrun_sidecar: Sidecar, upstream: Upstream
) -> None:
    path = "/forbidden/" + unique("dryrun")
    response = dryrun_sidecar.request("GET", upstream.url(path))
    assert (response.status_code, response.headers["Vienna-Decision"]) == (200, "would-deny")
    assert len(upstream.seen(path)) == 1


def test_dryrun_marks_what_enforce_allows_as_allow(dryrun_sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/" + unique("dryrun-read")
    response = dryrun_sidecar.request("GET", upstream.url(path))
    assert (response.status_code, response.headers["Vienna-Decision"]) == (200, "allow")


def test_dryrun_still_refuses_an_ambiguous_request(dryrun_sidecar: Sidecar, upstream: Upstream) -> None:
    path = "/" + unique("dryrun-ambiguous")
    refused = dryrun_sidecar.request("GET", upstream.url(path), headers={"Host": "localhost:1"})
    assert_refused(refused, 400, "bad_request", "request.host_mismatch")
    assert upstream.seen(path) == []
