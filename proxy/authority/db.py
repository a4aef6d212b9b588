"""One SQL layer over SQLite (the embedded default) and PostgreSQL (several replicas), with versioned migrations.

Queries are written once, with `%s` placeholders and `FOR UPDATE` row locks; on SQLite the placeholders
become `?` and the row lock is the whole-database write lock that `BEGIN IMMEDIATE` takes, which gives
the same serialisation (one writer at a time) for a single replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

DEFAULT_STORE = "sqlite:///./vienna-authority/authority.db"

# Each entry is applied once, in order, in one transaction, and recorded in schema_migrations.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "warrant requests, votes, warrant uses, audit chains, signing keys",
        (
            """CREATE TABLE warrant_requests (
                id TEXT PRIMARY KEY,
                sidecar TEXT NOT NULL,
                agent TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                tier TEXT NOT NULL,
                intent TEXT NOT NULL,
                request TEXT NOT NULL,
                rule_id TEXT,
                terms TEXT NOT NULL,
                constraints TEXT NOT NULL,
                status TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                warrant TEXT,
                warrant_id TEXT,
                warrant_expires_at DOUBLE PRECISION
            )""",
            "CREATE INDEX warrant_requests_open ON warrant_requests (agent, fingerprint, status)",
            "CREATE INDEX warrant_requests_by_status ON warrant_requests (status, created_at)",
            """CREATE TABLE votes (
                request_id TEXT NOT NULL,
                operator TEXT NOT NULL,
                approve INTEGER NOT NULL,
                justification TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (request_id, operator)
            )""",
            """CREATE TABLE warrant_uses (
                jti TEXT PRIMARY KEY,
                uses INTEGER NOT NULL,
                max_uses INTEGER NOT NULL,
                first_used_at DOUBLE PRECISION NOT NULL,
                last_sidecar TEXT NOT NULL
            )""",
            """CREATE TABLE chains (
                chain TEXT PRIMARY KEY,
                sidecar TEXT NOT NULL,
                head_seq BIGINT NOT NULL,
                head_hash TEXT NOT NULL,
                problems INTEGER NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE audit_events (
                chain TEXT NOT NULL,
                seq BIGINT NOT NULL,
                ts DOUBLE PRECISION NOT NULL,
                type TEXT NOT NULL,
                agent TEXT NOT NULL,
                policy_revision TEXT NOT NULL,
                payload TEXT NOT NULL,
                prev_hash TEXT NOT NULL,
                hash TEXT NOT NULL,
                PRIMARY KEY (chain, seq)
            )""",
            """CREATE TABLE audit_problems (
                id TEXT PRIMARY KEY,
                chain TEXT NOT NULL,
                seq BIGINT NOT NULL,
                kind TEXT NOT NULL,
                detail TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX audit_problems_by_chain ON audit_problems (chain, at)",
            """CREATE TABLE signing_keys (
                kid TEXT PRIMARY KEY,
                jwk TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                seen_at DOUBLE PRECISION NOT NULL,
                last_exp DOUBLE PRECISION NOT NULL
            )""",
        ),
    ),
    # () means: the notification outbox and its delivery leases (proxy/notify.py's OUTBOX_DDL)
    (2, "notification outbox", ()),
)


def _outbox_ddl() -> tuple[str, ...]:
    from proxy.notify import OUTBOX_DDL

    return OUTBOX_DDL


class StoreError(RuntimeError):
    """The store cannot be reached or refused a statement: callers answer 503, never guess."""


class Tx(Protocol):
    dialect: str

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None: ...

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


class Database(Protocol):
    dialect: str
    where: str

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Tx]: ...

    async def close(self) -> None: ...


# --- SQLite -------------------------------------------------------------------------------------


def _sqlite_sql(sql: str) -> str:
    return sql.replace(" FOR UPDATE", "").replace("%s", "?")


class _SqliteTx:
    dialect = "sqlite"

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(_sqlite_sql(sql), tuple(params)).rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(_sqlite_sql(sql), [tuple(row) for row in rows])

    async def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self._db.execute(_sqlite_sql(sql), tuple(params)).fetchone()
        return tuple(row) if row is not None else None

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._db.execute(_sqlite_sql(sql), tuple(params)).fetchall()]


class SqliteDatabase:
    """One connection, one transaction at a time (an asyncio lock), each `BEGIN IMMEDIATE`."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            path.parent.chmod(0o700)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite store: {exc}") from exc
            try:
                yield _SqliteTx(self._db)
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StoreError(f"sqlite store: {exc}") from exc
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise StoreError(f"sqlite store: {exc}") from exc

    async def close(self) -> None:
        async with self._lock:
            self._db.close()


# --- PostgreSQL ---------------------------------------------------------------------------------


class _PgTx:
    dialect = "postgresql"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self._conn.execute(sql, tuple(params))
        return int(cursor.rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._conn.cursor() as cursor:
            await cursor.executemany(sql, [tuple(row) for row in rows])

    async def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        cursor = await self._conn.execute(sql, tuple(params))
        row = await cursor.fetchone()
        return tuple(row) if row is not None else None

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = await self._conn.execute(sql, tuple(params))
        return [tuple(row) for row in await cursor.fetchall()]


class PostgresDatabase:
    """A psycopg 3 connection pool; each transaction on one pooled connection, READ COMMITTED, with
    row locks (SELECT … FOR UPDATE) and conditional updates where replicas could race."""

    dialect = "postgresql"

    def __init__(self, pool: Any, where: str) -> None:
        self._pool = pool
        self.where = where

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 2, max_size: int = 10) -> PostgresDatabase:
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(
            dsn, min_size=min_size, max_size=max_size, open=False, timeout=5.0, kwargs={"connect_timeout": 5}
        )
        try:
            await pool.open(wait=True, timeout=10.0)
        except Exception as exc:
            await pool.close()
            raise StoreError(f"cannot connect to PostgreSQL at {_shown_dsn(dsn)}: {exc}") from exc
        return cls(pool, _shown_dsn(dsn))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        import psycopg

        try:
            async with self._pool.connection() as conn, conn.transaction():
                yield _PgTx(conn)
        except psycopg.Error as exc:
            raise StoreError(f"postgresql store: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("psycopg_pool"):
                raise StoreError(f"postgresql store: {exc}") from exc
            raise

    async def close(self) -> None:
        await self._pool.close()


def _shown_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return dsn


# --- opening and migrating ----------------------------------------------------------------------


async def open_database(url: str) -> Database:
    """`sqlite:///relative/path.db`, `sqlite:////absolute/path.db` or `postgresql://…`."""
    scheme = url.partition("://")[0].lower()
    database: Database
    if scheme == "sqlite":
        path = url.partition("://")[2]
        if not path.startswith("/") or path == "/":
            raise StoreError(f"--store {url!r}: expected sqlite:///PATH")
        database = SqliteDatabase(Path(path[1:]))  # sqlite:///rel → rel, sqlite:////abs → /abs
    elif scheme in ("postgresql", "postgres"):
        database = await PostgresDatabase.open(url)
    else:
        raise StoreError(f"--store {url!r}: expected sqlite:///PATH or postgresql://…")
    await migrate(database)
    return database


async def migrate(database: Database) -> int:
    """Apply the migrations this store has not seen; returns the schema version. Replicas starting
    together on PostgreSQL take an advisory lock, so each migration runs exactly once."""
    async with database.transaction() as tx:
        if tx.dialect == "postgresql":
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (0x7669656E6E61,))  # "vienna"
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
        row = await tx.one("SELECT MAX(version) FROM schema_migrations")
        current = int(row[0]) if row and row[0] is not None else 0
        newest = MIGRATIONS[-1][0]
        if current > newest:
            raise StoreError(
                f"the store's schema is version {current}, newer than this vienna ({newest}): upgrade vienna"
            )
        import time

        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements if statements else _outbox_ddl():
                await tx.execute(statement)
            await tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (%s, %s, %s)",
                (version, description, time.time()),
            )
        return newest
