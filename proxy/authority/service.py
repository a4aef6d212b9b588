"""`vienna authority`: flags, start-up (store, migrations, signing key), serving and shutdown."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.authority.app import Authority, make_authority_app
from proxy.authority.db import DEFAULT_STORE, StoreError, open_database
from proxy.authority.sidecars import load_sidecars
from proxy.authority.signing import load_signing_key
from proxy.authority.store import AuthorityStore
from proxy.keys import KeyError_, load_notify_secret, load_operators
from proxy.notify import Notifier, NotifyConfig
from proxy.settings import SettingsError, _address, _number, add_notify_flags, resolve_notify

log = logging.getLogger("vienna.authority")
KEY_HEARTBEAT_SECONDS = 30.0

# (flag, default, help) — each also read from VIENNA_<FLAG>.
AUTHORITY_FLAGS: tuple[tuple[str, str | None, str], ...] = (
    ("listen", "127.0.0.1:9700", "API address HOST:PORT"),
    ("store", DEFAULT_STORE, "sqlite:///PATH (one replica) or postgresql://… (several replicas)"),
    ("operators", None, "operators file (YAML: operators: [{name, token_sha256}])"),
    ("sidecars", None, "sidecars file (YAML: sidecars: [{name, token_sha256, agents: [id | '*']}])"),
    (
        "signing-key-file",
        None,
        "Ed25519 private key, PEM (default: generated beside the store, with a warning)",
    ),
    ("public-url", None, "base URL operators and sidecars reach this authority at (default: from --listen)"),
    ("pending-ttl", "3600", "seconds a warrant request stays pending before it expires"),
    ("max-pending-requests", "100", "pending warrant requests one agent may have (0: no limit)"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthoritySettings:
    listen_host: str
    listen_port: int
    store: str
    operators: Path | None
    sidecars: Path | None
    signing_key_file: Path | None
    public_url: str
    pending_ttl: float
    max_pending: int
    notify_webhooks: tuple[str, ...] = ()
    notify_secret_file: Path | None = None
    notify_format: str = "json"

    @property
    def key_dir(self) -> Path:
        """Where a generated signing key goes: beside a SQLite store, else ./vienna-authority."""
        if self.store.startswith("sqlite://"):
            return Path(self.store.partition("://")[2][1:]).parent
        return Path("vienna-authority")


def add_authority_flags(parser: argparse.ArgumentParser) -> None:
    add_notify_flags(parser)
    for flag, default, text in AUTHORITY_FLAGS:
        env = "VIENNA_" + flag.upper().replace("-", "_")
        shown = f" [env {env}; default {default}]" if default is not None else f" [env {env}]"
        parser.add_argument(f"--{flag}", default=None, help=text + shown)


def resolve_authority_settings(args: argparse.Namespace, env: Mapping[str, str]) -> AuthoritySettings:
    raw: dict[str, str | None] = {}
    for flag, default, _ in AUTHORITY_FLAGS:
        value = getattr(args, flag.replace("-", "_"), None)
        if value is None:
            value = env.get("VIENNA_" + flag.upper().replace("-", "_")) or None
        raw[flag] = value if value is not None else default
    host, port = _address(str(raw["listen"]), "listen")
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 -- comparing, not binding
    shown_host = f"[{shown_host}]" if ":" in shown_host else shown_host
    store = str(raw["store"])
    if not (store.startswith("sqlite:///") or store.startswith(("postgresql://", "postgres://"))):
        raise SettingsError(f"--store: {store!r} must be sqlite:///PATH or postgresql://…")
    webhooks, notify_secret, notify_format = resolve_notify(args, env)
    return AuthoritySettings(
        notify_webhooks=webhooks,
        notify_secret_file=notify_secret,
        notify_format=notify_format,
        listen_host=host,
        listen_port=port,
        store=store,
        operators=Path(raw["operators"]) if raw["operators"] else None,
        sidecars=Path(raw["sidecars"]) if raw["sidecars"] else None,
        signing_key_file=Path(raw["signing-key-file"]) if raw["signing-key-file"] else None,
        public_url=(raw["public-url"] or f"http://{shown_host}:{port}").rstrip("/"),
        pending_ttl=_number(str(raw["pending-ttl"]), "pending-ttl", minimum=1),
        max_pending=int(_number(str(raw["max-pending-requests"]), "max-pending-requests", minimum=0)),
    )


async def serve_authority(settings: AuthoritySettings) -> int:
    operators = load_operators(settings.operators)
    sidecars = load_sidecars(settings.sidecars)
    if not operators.names:
        log.warning("no --operators given: nobody can approve warrant requests")
    if not sidecars.names:
        log.warning("no --sidecars given: no sidecar can open warrant requests or ship audit events")
    try:
        database = await open_database(settings.store)
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    store = AuthorityStore(database)
    try:
        signing = load_signing_key(settings.signing_key_file, settings.key_dir)
        loop = asyncio.get_running_loop()
        await store.register_key(signing.kid, signing.jwk, _now())
    except (KeyError_, StoreError):
        await store.close()
        raise
    authority = Authority(
        store=store,
        operators=operators,
        sidecars=sidecars,
        signing=signing,
        public_url=settings.public_url,
        pending_ttl=settings.pending_ttl,
        max_pending=settings.max_pending,
    )
    runner = web.AppRunner(
        make_authority_app(authority), access_log=None, handle_signals=False, shutdown_timeout=5.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.listen_host, settings.listen_port, reuse_address=True).start()
    except OSError as exc:
        log.error(
            "the authority could not listen on %s:%d (%s); choose another with --listen HOST:PORT",
            settings.listen_host,
            settings.listen_port,
            exc.strerror,
        )
        await runner.cleanup()
        await store.close()
        return 1
    authority.listening = True
    notifier: Notifier | None = None
    tasks = [asyncio.create_task(_expire(authority))]
    if settings.notify_webhooks:
        authority.notify = NotifyConfig(
            webhooks=settings.notify_webhooks,
            secret=load_notify_secret(settings.notify_secret_file, settings.key_dir),
            format=settings.notify_format,
            console_url=settings.public_url + "/console",
        )
        notifier = Notifier(database, authority.notify, authority.metrics.notifications)
        authority.wake = notifier.wake.set
        tasks.append(asyncio.create_task(notifier.run()))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    heartbeat = asyncio.create_task(_heartbeat(authority))
    log.info(
        "vienna authority ready: %s (store %s, %s), signing key %s, %d operators, %d sidecars",
        settings.public_url,
        database.dialect,
        database.where,
        signing.kid,
        len(operators.names),
        len(sidecars.names),
    )
    await stop.wait()
    log.info("stopping")
    authority.listening = False
    heartbeat.cancel()
    for task in tasks:
        task.cancel()
    if notifier is not None:
        await notifier.close()
    await runner.cleanup()
    await store.close()
    return 0


def _now() -> float:
    import time

    return time.time()


async def _expire(authority: Authority) -> None:
    """Pending requests past their deadline become expired, announced once (any replica)."""
    while True:
        await asyncio.sleep(2.0)
        with contextlib.suppress(StoreError):
            await authority.store.expire_due(authority.clock(), authority.announce)


async def _heartbeat(authority: Authority) -> None:
    """Keep this replica's key listed in the JWKS while it signs with it."""
    while True:
        await asyncio.sleep(KEY_HEARTBEAT_SECONDS)
        with contextlib.suppress(StoreError):
            await authority.store.register_key(
                authority.signing.kid, authority.signing.jwk, authority.clock()
            )
