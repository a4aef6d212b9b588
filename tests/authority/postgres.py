"""A real PostgreSQL for the tests: the one this machine runs on 127.0.0.1:5432 (or $VIENNA_TEST_PG_DSN),
else a throwaway cluster started from Debian's packages in a temporary directory, else none (the
tests that need it skip, saying why). Each test gets a database of its own, dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

MACHINE_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _reachable(dsn: str) -> str | None:
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class TemporaryCluster:
    """initdb + postgres from /usr/lib/postgresql/*/bin, as the `postgres` user when we are root."""

    def __init__(self) -> None:
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not binaries:
            raise RuntimeError("no PostgreSQL server binaries (Debian package postgresql) on this machine")
        self.bin = Path(binaries[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="vienna-pg-"))
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def start(self) -> str:
        data = self.dir / "data"
        subprocess.run(
            self._as_owner([str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
            check=True,
            capture_output=True,
        )
        self.process = subprocess.Popen(
            self._as_owner(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(data),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.dir),
                    "-c",
                    "fsync=off",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _reachable(dsn) is None:
                return dsn
            time.sleep(0.2)
        raise RuntimeError("the temporary PostgreSQL did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str | None, str]]:
    """(admin DSN or None, how it was found or why there is none)."""
    dsn = os.environ.get("VIENNA_TEST_PG_DSN") or MACHINE_DSN
    problem = _reachable(dsn)
    if problem is None:
        yield dsn, f"PostgreSQL at {dsn}"
        return
    try:
        cluster = TemporaryCluster()
        started = cluster.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        yield None, f"no PostgreSQL: {dsn} is not reachable ({problem}) and none could be started ({exc})"
        return
    try:
        yield started, f"a temporary PostgreSQL started from {cluster.bin}"
    finally:
        cluster.stop()


@contextlib.contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    name = "vienna_" + secrets.token_hex(6)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_dsn.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
