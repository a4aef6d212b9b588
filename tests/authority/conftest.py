"""Fixtures for the authority tests: a real PostgreSQL (or a printed reason to skip), fresh stores."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.authority.postgres import fresh_database, postgres_server
from tests.integration.harness import Upstream

_FOUND: dict[str, str | None] = {}


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    with postgres_server() as (dsn, how):
        _FOUND["how"] = how
        print(f"\n[vienna tests] {how}", file=sys.stderr)
        if dsn is None:
            pytest.skip(how)
        yield dsn


@pytest.fixture
def pg_dsn(pg_admin: str) -> Iterator[str]:
    with fresh_database(pg_admin) as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same suite on both stores."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('authority')}/authority.db"
        return
    admin = request.getfixturevalue("pg_admin")
    with fresh_database(admin) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    yield server
    server.stop()
