"""The three handler kinds, run: a process (argv, no shell, its own process group, killed on
timeout), an HTTP request (sent through this sidecar's own proxy listener, so the policy decides
it exactly as any request of the agent), a SQL statement (bound parameters, read-only unless
the handler says write: true). Output is bounded (64 KiB per stream) and redacted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import ssl
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import certifi

from policy.audit import redact
from policy.handlers import (
    MAX_OUTPUT_BYTES,
    Handler,
    exec_argv,
    fill,
    fill_json,
    sql_parameters,
    sql_to_pyformat,
)

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_SECRET_ENV = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "DSN")
REDACTED = "[redacted]"


@dataclass(slots=True)
class Outcome:
    """What one execution did: `status` is succeeded or failed; `result` is what the caller sees."""

    status: str
    result: dict[str, Any]
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    duration_ms: float = 0.0

    @property
    def digest(self) -> str:
        text = json.dumps(self.result, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def _secrets_in(env: Mapping[str, str]) -> list[str]:
    return [
        value
        for name, value in env.items()
        if any(word in name.upper() for word in _SECRET_ENV) and len(value) >= 4
    ]


def redact_text(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def _bounded_text(data: bytes, total: int, secrets: list[str]) -> tuple[str, bool]:
    truncated = total > len(data)
    return redact_text(data.decode("utf-8", "replace"), secrets), truncated


async def _drain(stream: asyncio.StreamReader, keep: int) -> tuple[bytes, int]:
    """Read a stream to its end, keeping the first `keep` bytes (the rest is counted, not held)."""
    kept = bytearray()
    total = 0
    while chunk := await stream.read(65536):
        total += len(chunk)
        room = keep - len(kept)
        if room > 0:
            kept += chunk[:room]
    return bytes(kept), total


async def run_exec(handler: Handler, values: Mapping[str, str]) -> Outcome:
    assert handler.exec is not None
    spec = handler.exec
    argv = exec_argv(handler, values)
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
    env.update({name: os.environ[name] for name in spec.env if name in os.environ})
    secrets = _secrets_in(env)
    outcome = Outcome(status="failed", result={})
    workdir = tempfile.mkdtemp(prefix="vienna-exec-")  # an empty working directory, not the sidecar's
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=workdir,
            start_new_session=True,  # its own process group: a timeout kills every child too
            close_fds=True,
        )
    except OSError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        outcome.result = {
            "exit_code": None,
            "stdout": "",
            "stderr": "",
            "error": f"cannot start {argv[0]!r}: {exc.strerror}",
        }
        outcome.error = "exec.not_started"
        return _done(outcome)
    assert process.stdout is not None and process.stderr is not None
    readers = asyncio.gather(
        _drain(process.stdout, MAX_OUTPUT_BYTES), _drain(process.stderr, MAX_OUTPUT_BYTES)
    )
    timed_out = False
    out = err = b""
    out_total = err_total = 0
    try:
        try:
            (out, out_total), (err, err_total) = await asyncio.wait_for(asyncio.shield(readers), spec.timeout)
            await asyncio.wait_for(process.wait(), max(0.1, spec.timeout))
        except TimeoutError:
            timed_out = True
    finally:
        # Always: on a timeout, on cancellation (shutdown), and after a normal exit (a background
        # child it left behind dies with the group).
        _kill_group(process.pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5.0)
        shutil.rmtree(workdir, ignore_errors=True)
    if timed_out:
        try:
            (out, out_total), (err, err_total) = await asyncio.wait_for(readers, 5.0)
        except TimeoutError:  # a grandchild in another session holds the pipes: stop reading
            readers.cancel()
    stdout, stdout_cut = _bounded_text(out, out_total, secrets)
    stderr, stderr_cut = _bounded_text(err, err_total, secrets)
    outcome.result = {
        "exit_code": None if timed_out else process.returncode,
        "stdout": stdout,
        "stderr": stderr,
        "stdout_truncated": stdout_cut,
        "stderr_truncated": stderr_cut,
        "timed_out": timed_out,
    }
    if timed_out:
        outcome.error = "exec.timeout"
    elif process.returncode == 0:
        outcome.status = "succeeded"
    else:
        outcome.error = "exec.exit_code"
    return _done(outcome)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _done(outcome: Outcome) -> Outcome:
    outcome.duration_ms = round((time.monotonic() - outcome.started) * 1000, 3)
    outcome.result["duration_ms"] = outcome.duration_ms
    return outcome


async def run_http(
    handler: Handler, values: Mapping[str, str], *, proxy_url: str, ca_file: Path | None
) -> Outcome:
    """Through this sidecar's own proxy: internal destinations, tiers, audit and all apply as to the agent."""
    assert handler.http is not None
    spec = handler.http
    url = fill_url(spec.url, values)
    headers = {name: fill(value, values) for name, value in spec.headers}
    data: bytes | None = None
    if spec.json is not None:
        data = json.dumps(fill_json(spec.json, values), separators=(",", ":")).encode()
        headers.setdefault("Content-Type", "application/json")
    elif spec.body is not None:
        data = fill(spec.body, values).encode()
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_file is not None:
        with contextlib.suppress(OSError):  # (no CA yet: https through the proxy then fails, closed)
            context.load_verify_locations(cafile=str(ca_file))
    outcome = Outcome(status="failed", result={})
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False) as http,
            http.request(
                spec.method,
                url,
                headers=headers,
                data=data,
                proxy=proxy_url,
                ssl=context,
                allow_redirects=False,
            ) as answer,
        ):
            body = await answer.content.read(MAX_OUTPUT_BYTES + 1)
            refused = answer.headers.get("Vienna-Decision") == "deny"
            shown_headers = redact(
                {
                    k: v
                    for k, v in answer.headers.items()
                    if k.lower() in ("content-type", "vienna-decision", "vienna-decision-id", "location")
                }
            )
            try:
                text: str | None = body[:MAX_OUTPUT_BYTES].decode("utf-8")
            except UnicodeDecodeError:
                text = None
            outcome.result = {
                "status": answer.status,
                "headers": shown_headers,
                "body": text if text is not None else base64.b64encode(body[:MAX_OUTPUT_BYTES]).decode(),
                "body_encoding": "utf-8" if text is not None else "base64",
                "body_truncated": len(body) > MAX_OUTPUT_BYTES,
                "url": url,
                "method": spec.method,
            }
            if refused:
                outcome.error = "http.refused_by_policy"
            elif 200 <= answer.status < 400:
                outcome.status = "succeeded"
            else:
                outcome.error = "http.status"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        outcome.result = {
            "status": None,
            "error": f"{type(exc).__name__}: {exc}"[:500],
            "url": url,
            "method": spec.method,
        }
        outcome.error = "http.timeout" if isinstance(exc, TimeoutError) else "http.unreachable"
    return _done(outcome)


def fill_url(template: str, values: Mapping[str, str]) -> str:
    """Params go into the path and query percent-encoded: a value never adds a segment or a parameter."""
    from urllib.parse import quote

    return fill(template, {name: quote(value, safe="") for name, value in values.items()})


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


async def run_sql(handler: Handler, values: Mapping[str, str]) -> Outcome:
    assert handler.sql is not None
    spec = handler.sql
    dsn = os.environ.get(spec.dsn_env, "")
    parameters = sql_parameters(handler, values)
    outcome = Outcome(status="failed", result={})
    if not dsn:
        outcome.result = {"error": f"${spec.dsn_env} is not set in the sidecar's environment"}
        outcome.error = "sql.no_dsn"
        return _done(outcome)
    try:
        if dsn.startswith("sqlite:"):
            columns, rows, truncated = await asyncio.to_thread(
                _sqlite_query, dsn, spec.query, parameters, spec.write, spec.max_rows, spec.timeout
            )
        elif dsn.startswith(("postgresql://", "postgres://")):
            columns, rows, truncated = await _postgres_query(
                dsn, spec.query, parameters, spec.write, spec.max_rows, spec.timeout
            )
        else:
            raise ValueError(f"${spec.dsn_env} must be sqlite:///PATH or postgresql://…")
    except TimeoutError:
        outcome.result = {"error": f"the query ran longer than {spec.timeout:g}s and was cancelled"}
        outcome.error = "sql.timeout"
        return _done(outcome)
    except Exception as exc:  # the database's refusal (read-only, syntax, permissions) is the result
        message = redact_text(str(exc), [dsn])
        outcome.result = {"error": f"{type(exc).__name__}: {message}"[:1000]}
        outcome.error = "sql.error"
        return _done(outcome)
    outcome.status = "succeeded"
    outcome.result = {
        # secret-named columns (password, token, …) redacted like every other output
        "rows": [redact(dict(zip(columns, (_json_safe(v) for v in row), strict=True))) for row in rows],
        "row_count": len(rows),
        "rows_truncated": truncated,
    }
    encoded = json.dumps(outcome.result["rows"]).encode()
    if len(encoded) > MAX_OUTPUT_BYTES:  # bounded like every other output
        kept: list[dict[str, Any]] = []
        size = 2
        for row in outcome.result["rows"]:
            size += len(json.dumps(row)) + 1
            if size > MAX_OUTPUT_BYTES:
                break
            kept.append(row)
        outcome.result.update(rows=kept, row_count=len(kept), rows_truncated=True)
    return _done(outcome)


def _sqlite_query(
    dsn: str, query: str, parameters: Mapping[str, str], write: bool, max_rows: int, timeout: float
) -> tuple[list[str], list[tuple[Any, ...]], bool]:
    path = dsn.split("://", 1)[1][1:] if "://" in dsn else dsn.removeprefix("sqlite:")
    mode = "rw" if write else "ro"
    db = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=min(timeout, 5.0))
    deadline = time.monotonic() + timeout
    timed_out = False

    def check() -> int:
        nonlocal timed_out
        if time.monotonic() > deadline:
            timed_out = True
            return 1  # interrupts the statement
        return 0

    db.set_progress_handler(check, 1000)
    try:
        if not write:
            db.execute("PRAGMA query_only = ON")
        try:
            cursor = db.execute(query, dict(parameters))
            rows = cursor.fetchmany(max_rows + 1)
        except sqlite3.OperationalError:
            if timed_out:
                raise TimeoutError from None
            raise
        columns = [c[0] for c in cursor.description or ()]
        if write:
            db.commit()
        return columns, rows[:max_rows], len(rows) > max_rows
    finally:
        db.close()


async def _postgres_query(
    dsn: str, query: str, parameters: Mapping[str, str], write: bool, max_rows: int, seconds: float
) -> tuple[list[str], list[tuple[Any, ...]], bool]:
    import psycopg

    converted = sql_to_pyformat(query)
    try:
        async with (
            await psycopg.AsyncConnection.connect(dsn, connect_timeout=max(1, int(seconds))) as conn,
            conn.transaction(),
        ):
            await conn.execute("SET TRANSACTION READ WRITE" if write else "SET TRANSACTION READ ONLY")
            await conn.execute(f"SET LOCAL statement_timeout = {int(seconds * 1000)}")
            cursor = await conn.execute(converted, dict(parameters))
            rows = await cursor.fetchmany(max_rows + 1) if cursor.description else []
            columns = [c.name for c in cursor.description or ()]
    except psycopg.errors.QueryCanceled:
        raise TimeoutError from None
    return columns, [tuple(r) for r in rows[:max_rows]], len(rows) > max_rows
