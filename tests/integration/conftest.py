"""Fixtures for the real-parts tests: loopback upstreams (plain and TLS) and the shared enforcing sidecar."""

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
from tests.integration.harness import Sidecar, Upstream, running_sidecar


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
def upstream_ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trustme CA that signed the TLS upstream's certificate, for --upstream-ca-file."""
    path = tmp_path_factory.mktemp("upstream-ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def tls_upstream(tls_ca: trustme.CA) -> Iterator[Upstream]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(context)
    server = Upstream(ssl_context=context)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def untrusted_tls_upstream() -> Iterator[Upstream]:
    """A TLS upstream whose certificate comes from a CA the sidecar was not told to trust."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost", "127.0.0.1", "::1").configure_cert(context)
    server = Upstream(ssl_context=context)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sidecar_ca_file(sidecar: Sidecar, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main sidecar's interception CA, as an agent gets it from GET /v1/ca.pem."""
    response = sidecar.http.get(sidecar.api_url + "/v1/ca.pem", timeout=10)
    assert response.status_code == 200, (response.status_code, response.text, sidecar.log_text()[-3000:])
    path = tmp_path_factory.mktemp("sidecar-ca") / "ca.pem"
    path.write_bytes(response.content)
    return path


@pytest.fixture(scope="session")
def sidecar(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: Upstream,
    tls_upstream: Upstream,
    upstream_ca_file: Path,
) -> Iterator[Sidecar]:
    """The shared enforcing sidecar. Tests keep out of each other's way by using their own paths."""
    with running_sidecar(
        tmp_path_factory.mktemp("sidecar"),
        args=[
            "--upstream-ca-file",
            str(upstream_ca_file),
            "--upstream-timeout",
            "1",
            "--connect-timeout",
            "2",
            "--max-body-bytes",
            "4096",
            "--max-response-bytes",
            "65536",
        ],
    ) as running:
        yield running
