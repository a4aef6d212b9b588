"""`vienna run`: the sidecar's state, mitmproxy and the control API on one event loop, reload and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from mitmproxy import options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from policy.rules import PolicyError, PolicyIssue, RuleSet, load_rules
from policy.warrants import WarrantKeys
from proxy.audit_keeper import NOTHING_SHIPPED, AuditKeeper, exported_release
from proxy.audit_log import CHECKPOINT_FILE, Recorder, stdout_stream
from proxy.authority.db import SqliteDatabase
from proxy.authority_client import AuthorityClient, AuthorityUnavailable
from proxy.control.app import make_app
from proxy.dataplane.addon import EnforcementAddon
from proxy.dataplane.destinations import DestinationResolver, OwnListeners, upstream_ca_bundle
from proxy.demo import Demo, start_demo_upstream, try_every_tier
from proxy.keys import (
    KeyError_,
    Operators,
    load_audit_key,
    load_notify_secret,
    load_operators,
    load_sidecar_id,
    load_warrant_keys,
    write_ca_bundle,
)
from proxy.metrics import Metrics
from proxy.notify import Notifier, NotifyConfig
from proxy.passbacks import LocalPassbacks, Passbacks, RemotePassbacks
from proxy.ratelimit import RateLimiter
from proxy.secrets import SecretStore
from proxy.settings import Settings
from proxy.shipping import AuditShipper
from proxy.store import Store, StoreUnavailable
from proxy.warrant_requests import WarrantRequests

log = logging.getLogger("vienna")
BUILTIN_POLICY_NAME = "<built-in policy>"
_RELOAD_SWITCH_INTERVAL = 0.0002  # seconds; Python's default is 0.005


def builtin_policy_text() -> str:
    return resources.files("proxy").joinpath("builtin_policy.yaml").read_text()


def read_policy(path: Path | None) -> RuleSet:
    text, name = (
        (builtin_policy_text(), BUILTIN_POLICY_NAME) if path is None else (path.read_text(), str(path))
    )
    # A big policy allocates a few hundred thousand short-lived objects; the collector walking them
    # (and everything else) more than doubles the load time, so it waits until the load is done.
    paused = gc.isenabled()
    gc.disable()
    try:
        rules = load_rules(text, file=name)
        # The new rules live until the next reload: moved out of the collector's reach now, they are
        # not walked (on the event loop's thread, whichever allocates next) when it runs again.
        gc.freeze()
        return rules
    finally:
        if paused:
            gc.enable()


@dataclass
class Sidecar:
    """Everything a running sidecar holds; the addon and the API both read it."""

    settings: Settings
    rules: RuleSet
    keys: WarrantKeys | None
    operators: Operators
    store: Store
    metrics: Metrics
    recorder: Recorder
    warrant_requests: WarrantRequests
    destinations: DestinationResolver
    listeners: OwnListeners
    passbacks: Passbacks
    secrets: SecretStore
    authority: AuthorityClient | None = None
    sidecar_id: str = ""
    data_dir_lock: int = -1
    instance: str = field(default_factory=lambda: "vienna-" + secrets.token_hex(6))
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    proxy_listening: bool = False
    api_listening: bool = False
    stopping: bool = False
    inflight: int = 0
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock)

    @staticmethod
    def clock() -> float:
        return time.time()

    @property
    def ready(self) -> bool:
        return self.proxy_listening and self.api_listening and not self.stopping

    async def reload_policy(self) -> bool:
        """Parse, validate and lint the whole file off the event loop (requests keep flowing on the old
        policy), then swap atomically on the loop; a bad file keeps the last good policy."""
        async with self._reloading:
            # While a thread parses, every time the event loop gives the GIL up (each socket call) it
            # waits up to the switch interval to get it back: 5 ms, dozens of times per request. A short
            # interval for the reload's duration keeps requests flowing at nearly their usual latency.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(_RELOAD_SWITCH_INTERVAL)
            try:
                new_rules = await asyncio.to_thread(read_policy, self.settings.policy)
                check_secrets(new_rules, self.secrets)
            except (PolicyError, OSError, UnicodeDecodeError) as exc:
                self.metrics.policy_reloads.labels(result="error").inc()
                log.error("policy reload failed, keeping revision %s: %s", self.rules.revision[:12], exc)
                return False
            finally:
                sys.setswitchinterval(interval)
            return self._swap_policy(new_rules)

    def _swap_policy(self, new_rules: RuleSet) -> bool:
        if new_rules.revision == self.rules.revision:
            return True
        old = self.rules.revision
        self.rules = new_rules
        self.metrics.policy_rules.set(len(new_rules.rules))
        self.metrics.policy_reloads.labels(result="success").inc()
        with contextlib.suppress(Exception):
            self.recorder.record(
                "policy",
                agent=self.settings.agent_id,
                policy_revision=new_rules.revision,
                payload={"event": "reloaded", "previous_revision": old, "rules": len(new_rules.rules)},
            )
        log.info("policy reloaded: revision %s (%d rules)", new_rules.revision[:12], len(new_rules.rules))
        return True


def check_secrets(rules: RuleSet, secrets: SecretStore) -> None:
    """Every {secret:NAME} the policy injects must be in the secrets dir: a policy that names one that
    is not is refused at start and on reload (the running policy stays)."""
    missing = secrets.missing(rules.secret_names)
    if missing:
        where = secrets.directory or "(no --secrets-dir)"
        raise PolicyError(
            [PolicyIssue(rules.source, 1, "inject", f"secret(s) {', '.join(missing)} not in {where}")]
        )


def notify_config(settings: Settings) -> NotifyConfig | None:
    if not settings.notify_webhooks:
        return None
    if settings.authority:
        log.warning("--notify-webhook is ignored with --authority: the authority sends the notifications")
        return None
    secret = load_notify_secret(settings.notify_secret_file, settings.data_dir)
    return NotifyConfig(
        webhooks=settings.notify_webhooks,
        secret=secret,
        format=settings.notify_format,
        console_url=settings.api_base_url + "/console",
    )


def lock_data_dir(data_dir: Path) -> int:
    """One sidecar per data dir: two would interleave one audit chain and one single-use store."""
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise KeyError_(
            f"{data_dir} is in use by another vienna process; give each sidecar its own --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd  # held (and the lock with it) until the process exits


def build_sidecar(settings: Settings, *, demo: Demo | None = None) -> Sidecar:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        settings.data_dir.chmod(0o700)
    data_dir_lock = lock_data_dir(settings.data_dir)
    if demo is not None and settings.policy is None:
        rules = load_rules(demo.policy, file="<demo policy>")
    else:
        if settings.policy is None:
            log.warning(
                "no --policy given: using the built-in safe policy (reads T0, writes T2, cloud metadata denied)"
            )
        rules = read_policy(settings.policy)
    authority: AuthorityClient | None = None
    keys: WarrantKeys | None
    if settings.authority:
        # Authority mode: this sidecar holds public keys only (fetched from the authority), so code
        # running here cannot mint a warrant.
        assert settings.authority_token_file is not None
        try:
            token = settings.authority_token_file.read_text().strip()
        except OSError as exc:
            raise KeyError_(f"{settings.authority_token_file}: cannot read: {exc.strerror}") from None
        if not token:
            raise KeyError_(f"{settings.authority_token_file}: the authority token file is empty")
        ca = str(settings.upstream_ca_file) if settings.upstream_ca_file else None
        authority_host = urlsplit(settings.authority).hostname or ""
        if settings.authority.startswith("http://") and authority_host not in (
            "127.0.0.1",
            "localhost",
            "::1",
        ):
            log.warning(
                "--authority %s is plain HTTP: whoever sits on the path can answer for the authority "
                "(keys, consumes); use https:// outside a mesh that encrypts pod traffic",
                settings.authority,
            )
        authority = AuthorityClient(settings.authority, token, ca_file=ca)
        keys = None
    else:
        keys = load_warrant_keys(settings.warrant_key_file, settings.data_dir)
    sidecar_id = load_sidecar_id(settings.data_dir)
    operators = load_operators(settings.operators)
    if demo is not None and settings.operators is None:
        operators = demo.operators
    if not operators.names:
        log.warning("no --operators given: nobody can approve warrant requests")
    metrics = Metrics()
    metrics.policy_rules.set(len(rules.rules))
    metrics.policy_reloads.labels(result="success").inc()
    store = Store(settings.data_dir / "audit.db", autocheckpoint=False)
    audit_key = load_audit_key(settings.audit_key_file, settings.data_dir)
    recorder = Recorder(
        store,
        metrics,
        audit_key=audit_key,
        checkpoint_path=settings.data_dir / CHECKPOINT_FILE,
        checkpoint_every=settings.checkpoint_every,
        stdout=stdout_stream(settings.audit_stdout),
    )
    state_db = settings.data_dir / "state.db"
    recorder.keeper = AuditKeeper(
        store.path,
        audit_key=audit_key,
        checkpoint_path=settings.data_dir / CHECKPOINT_FILE,
        retention=settings.audit_retain,
        min_free_bytes=settings.audit_min_free,
        # In authority mode only what the authority confirmed is released (set once shipping runs).
        released=(lambda: NOTHING_SHIPPED) if settings.authority else (lambda: exported_release(state_db)),
        metrics=metrics,
    )
    holder: dict[str, Sidecar] = {}
    notify = notify_config(settings)
    warrant_requests = WarrantRequests(
        store,
        recorder,
        metrics,
        keys=keys,
        rules=lambda: holder["sidecar"].rules,
        api_base_url=settings.api_base_url,
        pending_ttl=settings.pending_ttl,
        max_pending=settings.max_pending_requests,
        sidecar_id=sidecar_id,
        notify=notify,
    )
    secrets = SecretStore(settings.secrets_dir)
    check_secrets(rules, secrets)
    passbacks: Passbacks
    if authority is not None:
        passbacks = RemotePassbacks(
            authority, recorder, rules=lambda: holder["sidecar"].rules, api_base_url=settings.api_base_url
        )
    else:
        passbacks = LocalPassbacks(warrant_requests, store, Sidecar.clock)
    sidecar = Sidecar(
        settings=settings,
        rules=rules,
        keys=keys,
        passbacks=passbacks,
        secrets=secrets,
        authority=authority,
        operators=operators,
        store=store,
        metrics=metrics,
        recorder=recorder,
        warrant_requests=warrant_requests,
        destinations=DestinationResolver(),
        sidecar_id=sidecar_id,
        data_dir_lock=data_dir_lock,
        listeners=OwnListeners(
            [(settings.listen_host, settings.listen_port), (settings.api_host, settings.api_port)]
        ),
    )
    holder["sidecar"] = sidecar
    warrant_requests.refresh_pending()
    return sidecar


def _mitm_options(settings: Settings) -> options.Options:
    confdir = settings.data_dir / "ca"
    confdir.mkdir(parents=True, exist_ok=True)
    mode = "transparent" if settings.mode == "transparent" else "regular"
    return options.Options(
        listen_host=settings.listen_host, listen_port=settings.listen_port, mode=[mode], confdir=str(confdir)
    )


def ca_cert_path(settings: Settings) -> Path:
    return settings.data_dir / "ca" / "mitmproxy-ca-cert.pem"


async def _watch_policy(sidecar: Sidecar, interval: float = 1.0) -> None:
    """Poll the policy file; a ConfigMap update swaps a symlink, so compare resolved path and mtime too."""
    path = sidecar.settings.policy
    if path is None:
        return

    def stamp() -> tuple[str, float, int] | None:
        try:
            real = path.resolve()
            info = real.stat()
            return str(real), info.st_mtime, info.st_size
        except OSError:
            return None

    last = stamp()
    while True:
        await asyncio.sleep(interval)
        current = stamp()
        if current != last and current is not None:
            last = current
            await sidecar.reload_policy()


async def _checkpoints(sidecar: Sidecar) -> None:
    while True:
        await asyncio.sleep(sidecar.settings.checkpoint_seconds)
        if sidecar.recorder.dirty:
            try:
                sidecar.recorder.checkpoint()
            except (OSError, StoreUnavailable) as exc:  # anything else uncaught would end this task for good
                log.error("audit checkpoint failed: %s", exc)


KEYS_REFRESH_SECONDS = 60.0
EXPIRY_SWEEP_SECONDS = 2.0


async def _expire_requests(sidecar: Sidecar) -> None:
    """Pending requests past their deadline become expired (and are announced): off the request path."""
    while True:
        await asyncio.sleep(EXPIRY_SWEEP_SECONDS)
        if sidecar.authority is not None:
            continue  # the authority owns the requests
        try:
            sidecar.warrant_requests.expire_due()
        except StoreUnavailable as exc:
            log.error("cannot mark expired warrant requests: %s", exc)


async def _keys_from_authority(sidecar: Sidecar) -> None:
    """The authority's public keys: fetched at start (retried until it answers), then every minute,
    so a rotated-in key is known before its first warrant arrives (an unknown kid also refetches)."""
    assert sidecar.authority is not None
    delay = 0.5
    while True:
        try:
            sidecar.keys = await sidecar.authority.refresh_keys(force=True)
            delay = KEYS_REFRESH_SECONDS
        except AuthorityUnavailable as exc:
            log.warning("cannot fetch the authority's keys yet (T2/T3 refused meanwhile): %s", exc)
            delay = min(max(delay * 2, 0.5), 10.0)
        await asyncio.sleep(delay)


async def serve(settings: Settings) -> int:
    demo = await start_demo_upstream() if settings.demo else None
    sidecar = build_sidecar(settings, demo=demo)
    loop = asyncio.get_running_loop()
    master = Master(_mitm_options(settings), event_loop=loop)
    enforcement = EnforcementAddon(sidecar)
    sidecar.recorder.others_in_flight = lambda: sidecar.inflight > 1 or bool(enforcement.watch.live)
    master.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(),
        enforcement,
    )
    master.options.update(
        connection_strategy="lazy",
        rawtcp=False,
        http3=False,
        http2=True,
        websocket=True,
        # a connection silent both ways this long is closed (keep-alive, WebSocket, tunnels)
        # (a margin above --idle-timeout, so that the exchange watch cuts and audits an idle exchange first)
        tcp_timeout=int(settings.idle_timeout + 0.999) + 5,
        store_streamed_bodies=False,
    )
    bundle = upstream_ca_bundle(settings.upstream_ca_file, settings.data_dir)
    if bundle is not None:
        master.options.update(ssl_verify_upstream_trusted_ca=str(bundle))

    keeper = sidecar.recorder.keeper
    if keeper is not None:
        keeper.start()  # measures once first: a full audit refuses from the first request
    app = make_app(sidecar, ca_cert=ca_cert_path(settings))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.api_host, settings.api_port)
    await site.start()
    sidecar.api_listening = True

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reload_on_signal() -> None:
        task = loop.create_task(sidecar.reload_policy())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_signal)

    master_task = asyncio.create_task(master.run(), name="mitmproxy")
    proxy_server = master.addons.get("proxyserver")
    for _ in range(200):
        if master_task.done():
            break
        if proxy_server is not None and proxy_server.is_running and proxy_server.listen_addrs():
            break
        await asyncio.sleep(0.05)
    listening = proxy_server is not None and bool(proxy_server.listen_addrs())
    if master_task.done() or not listening:
        # mitmproxy logs a bind failure and keeps running without a listener: never run like that.
        failure = master_task.exception() if master_task.done() else None
        if not master_task.done():
            master.shutdown()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(master_task, 10)
        await runner.cleanup()
        if keeper is not None:
            keeper.stop()
        sidecar.store.close()
        if failure is None or "in use" in str(failure).lower():
            log.error(
                "the proxy could not listen on %s:%d (in use, or not an address of this machine); "
                "choose another with --listen HOST:PORT",
                settings.listen_host,
                settings.listen_port,
            )
        else:
            log.error("the proxy could not start: %s", failure)
        return 1
    if settings.ca_bundle_out is not None:
        write_ca_bundle(settings.ca_bundle_out, ca_cert_path(settings))
    sidecar.proxy_listening = True
    gc.collect()
    gc.freeze()  # mitmproxy's latency spikes come from the collector walking start-up objects
    background = [
        asyncio.create_task(_watch_policy(sidecar)),
        asyncio.create_task(_checkpoints(sidecar)),
        asyncio.create_task(_expire_requests(sidecar)),
    ]
    notifier: Notifier | None = None
    if sidecar.warrant_requests.notify is not None:
        notifier = Notifier(
            SqliteDatabase(settings.data_dir / "state.db"),
            sidecar.warrant_requests.notify,
            sidecar.metrics.notifications,
        )
        sidecar.warrant_requests.wake = notifier.wake.set
        background.append(asyncio.create_task(notifier.run()))
    shipper: AuditShipper | None = None
    if sidecar.authority is not None:
        shipper = AuditShipper(
            sidecar.store, sidecar.authority, chain=sidecar.sidecar_id, metrics=sidecar.metrics
        )
        if keeper is not None:
            shipped = shipper
            keeper.released = lambda: shipped.confirmed or NOTHING_SHIPPED
        background += [asyncio.create_task(shipper.run()), asyncio.create_task(_keys_from_authority(sidecar))]
    if demo is not None:
        proxy_url = f"http://{settings.listen_host}:{settings.listen_port}"
        lines = await asyncio.to_thread(try_every_tier, proxy_url, settings.api_base_url, demo)
        print("\n".join(lines), file=sys.stderr, flush=True)
    log.info(
        "vienna sidecar ready: proxy %s:%d (%s), api %s, agent %s, policy %s (%s), enforcement %s, %s",
        settings.listen_host,
        settings.listen_port,
        settings.mode,
        settings.api_base_url,
        settings.agent_id,
        settings.policy or ("<demo policy>" if demo is not None else BUILTIN_POLICY_NAME),
        sidecar.rules.revision[:12],
        settings.enforcement,
        f"authority {settings.authority} (chain {sidecar.sidecar_id})"
        if settings.authority
        else "standalone",
    )

    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, master_task}, return_when=asyncio.FIRST_COMPLETED)
    sidecar.stopping = True
    log.info("stopping: no new connections, finishing in-flight requests")
    await _drain(sidecar, master, live=enforcement.watch.live)
    master.shutdown()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(master_task, 10)
    if shipper is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(shipper.ship_once(), 5)  # what was recorded last, while it can still go
    for task in background:
        task.cancel()
    if shipper is not None:
        shipper.close()
    if notifier is not None:
        await notifier.close()
    if sidecar.authority is not None:
        await sidecar.authority.close()
    await runner.cleanup()
    if demo is not None:
        await demo.runner.cleanup()
    if keeper is not None:
        keeper.stop()
        sidecar.recorder.keeper = None  # the last checkpoint is signed here, inline
    with contextlib.suppress(Exception):
        if sidecar.recorder.dirty:
            sidecar.recorder.checkpoint()
    sidecar.store.close()
    return 0


async def _drain(
    sidecar: Sidecar, master: Master, *, live: Mapping[str, object], grace: float = 10.0
) -> None:
    proxy_server = master.addons.get("proxyserver")
    with contextlib.suppress(Exception):
        # stop listening: setting no modes closes the listeners but keeps live connections
        await proxy_server.servers.update([])
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if sidecar.inflight == 0 and not live:  # no hook running, no exchange still streaming
            break
        await asyncio.sleep(0.05)


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("VIENNA_LOG_LEVEL", "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("mitmproxy").setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_our_flags_in_mitmproxy_hints)


def _our_flags_in_mitmproxy_hints(record: logging.LogRecord) -> bool:
    """mitmproxy's bind errors advise its own flag (`--mode regular@8082`); the hint names ours."""
    message = record.getMessage()
    if record.name.startswith("mitmproxy") and "--mode" in message:
        record.msg = message.split("\nTry specifying", 1)[0].split(" Try specifying", 1)[0]
        record.msg += "; choose other ports with vienna run --listen HOST:PORT (and --api HOST:PORT)"
        record.args = ()
    return True
