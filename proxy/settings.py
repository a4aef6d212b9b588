"""`vienna run` flags and VIENNA_* environment variables → one frozen Settings value."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from policy.retention import Retention, parse_retention, parse_size

NO_RETENTION = Retention()

DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_MAX_RESPONSE = 0  # no limit: responses stream, memory is bounded by buffers


class SettingsError(ValueError):
    """A flag or environment value that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    policy: Path | None
    listen_host: str
    listen_port: int
    api_host: str
    api_port: int
    mode: str
    agent_id: str
    data_dir: Path
    warrant_key_file: Path | None
    operators: Path | None
    upstream_ca_file: Path | None
    enforcement: str
    max_body_bytes: int
    max_response_bytes: int
    upstream_timeout: float  # = response_timeout (the old name, kept as an alias)
    response_timeout: float
    idle_timeout: float
    connect_timeout: float
    upstream_proxy: str | None
    pending_ttl: float
    max_pending_requests: int
    ca_bundle_out: Path | None
    audit_key_file: Path | None
    audit_stdout: bool
    durable_audit: bool
    checkpoint_every: int
    checkpoint_seconds: float
    public_api_url: str | None
    demo: bool = False
    authority: str | None = None
    authority_token_file: Path | None = None
    notify_webhooks: tuple[str, ...] = ()
    notify_secret_file: Path | None = None
    notify_format: str = "json"
    secrets_dir: Path | None = None
    audit_retain: Retention = NO_RETENTION
    audit_min_free: int | None = None  # None: 5 % of the data dir's file system, at most 64 MiB

    @property
    def upstream_proxy_address(self) -> tuple[str, int] | None:
        if not self.upstream_proxy:
            return None
        return parse_upstream_proxy(self.upstream_proxy)

    @property
    def dryrun(self) -> bool:
        return self.enforcement == "dryrun"

    @property
    def api_base_url(self) -> str:
        if self.public_api_url:
            return self.public_api_url.rstrip("/")
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "") else self.api_host  # noqa: S104 -- comparing, not binding
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.api_port}"


# (flag, default, help) — every flag is also read from VIENNA_<FLAG> (upper-case, '-' → '_').
RUN_FLAGS: tuple[tuple[str, str | None, str], ...] = (
    ("policy", None, "policy file (default: the built-in safe policy)"),
    ("listen", "127.0.0.1:8080", "proxy address HOST:PORT"),
    ("api", "127.0.0.1:9090", "control API address HOST:PORT"),
    ("mode", "regular", "regular (HTTP_PROXY) or transparent (iptables redirect)"),
    ("agent-id", None, "the agent's id (default: the host name)"),
    ("data-dir", "./vienna-data", "audit db, CA and generated keys"),
    (
        "warrant-key-file",
        None,
        "HMAC secret for warrants (default: generated in the data dir, with a warning)",
    ),
    ("operators", None, "operators file (YAML: operators: [{name, token_sha256}])"),
    ("upstream-ca-file", None, "extra CA bundle trusted for upstream TLS"),
    ("enforcement", "enforce", "enforce, or dryrun (forward everything, mark would-deny)"),
    ("max-body-bytes", str(DEFAULT_MAX_BODY), "largest request body buffered for hashing; larger → 413"),
    (
        "max-response-bytes",
        str(DEFAULT_MAX_RESPONSE),
        "end a response after N bytes (0: no limit; audited response.too_large)",
    ),
    ("response-timeout", "300", "seconds from the request sent to the response headers; then 504"),
    ("upstream-timeout", None, "alias of --response-timeout"),
    ("idle-timeout", "300", "longest silence in either direction once an exchange started; then closed"),
    ("connect-timeout", "10", "seconds to wait for an upstream connection; then 504"),
    ("upstream-proxy", None, "forward through this HTTP proxy (http://HOST:PORT; CONNECT for every request)"),
    ("pending-ttl", "3600", "seconds a warrant request stays pending before it expires"),
    (
        "max-pending-requests",
        "100",
        "pending warrant requests one agent may have; beyond: 429 warrant_request.limit (0: no limit)",
    ),
    ("ca-bundle-out", None, "write system CAs + the interception CA here at start-up (for the agent)"),
    ("audit-key-file", None, "HMAC key for signed audit checkpoints (default: generated in the data dir)"),
    (
        "durable-audit",
        "true",
        "commit each decision before forwarding (false: group-commit it; a crash may lose ~20 ms)",
    ),
    ("audit-stdout", "true", "also write every audit event as a JSON line to stdout (true/false)"),
    ("checkpoint-every", "1000", "sign an audit checkpoint every N events"),
    (
        "audit-retain",
        "none",
        "keep audit events this long and/or this much (7d, 2GiB, 7d,2GiB); older ones are dropped only"
        " once exported or shipped; at the size limit with nothing droppable every request gets 503 audit.full",
    ),
    (
        "audit-min-free",
        "auto",
        "refuse every request (503 audit.full) when the data dir has less free space (auto: 5%% of it, at most 64MiB)",
    ),
    ("checkpoint-seconds", "60", "and at least every T seconds when events were added"),
    ("public-api-url", None, "API base URL to put in passback bodies (default: from --api)"),
    (
        "authority",
        None,
        "URL of `vienna authority`: warrant requests, warrants and single use there; audit shipped there",
    ),
    ("authority-token-file", None, "file holding this sidecar's token for --authority"),
    ("secrets-dir", None, "files named by {secret:NAME} in a rule's inject (mounted in the sidecar only)"),
    (
        "demo",
        "false",
        "start a throwaway upstream on loopback, name it in the policy, try every tier once (true/false)",
    ),
)


def _retention(text: str) -> Retention:
    try:
        return parse_retention(text)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _min_free(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    if text.strip() == "0":
        return 0
    try:
        return parse_size(text)
    except ValueError as exc:
        raise SettingsError(f"--audit-min-free: {exc}") from None


def add_notify_flags(parser: argparse.ArgumentParser) -> None:
    from proxy.notify import NOTIFY_FLAGS

    for flag, default, text in NOTIFY_FLAGS:
        env = "VIENNA_" + flag.upper().replace("-", "_")
        shown = f" [env {env}; default {default}]" if default is not None else f" [env {env}]"
        action = "append" if flag == "notify-webhook" else "store"
        parser.add_argument(f"--{flag}", default=None, action=action, help=text + shown)


def resolve_notify(
    args: argparse.Namespace, env: Mapping[str, str]
) -> tuple[tuple[str, ...], Path | None, str]:
    from proxy.notify import webhooks_of

    try:
        webhooks = webhooks_of(getattr(args, "notify_webhook", None), env)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    secret = getattr(args, "notify_secret_file", None) or env.get("VIENNA_NOTIFY_SECRET_FILE") or None
    fmt = getattr(args, "notify_format", None) or env.get("VIENNA_NOTIFY_FORMAT") or "json"
    return webhooks, Path(secret) if secret else None, _choice(fmt, "notify-format", ("json", "slack"))


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    add_notify_flags(parser)
    for flag, default, text in RUN_FLAGS:
        env = "VIENNA_" + flag.upper().replace("-", "_")
        shown = f" [env {env}; default {default}]" if default is not None else f" [env {env}]"
        if flag == "demo":  # a switch: `--demo` alone means true
            parser.add_argument(f"--{flag}", default=None, nargs="?", const="true", help=text + shown)
        else:
            parser.add_argument(f"--{flag}", default=None, help=text + shown)


def parse_upstream_proxy(text: str) -> tuple[str, int]:
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "http" or not rest:
        raise SettingsError(f"--upstream-proxy: {text!r} must be http://HOST:PORT")
    host, port = _address(rest.rstrip("/"), "upstream-proxy")
    return host, port


def _address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"--{flag}: {text!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def _number(text: str, flag: str, *, minimum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"--{flag}: {text!r} is not a number") from None
    if value < minimum:
        raise SettingsError(f"--{flag}: must be at least {minimum}")
    return value


def _choice(text: str, flag: str, allowed: tuple[str, ...]) -> str:
    if text not in allowed:
        raise SettingsError(f"--{flag}: {text!r} is not one of {', '.join(allowed)}")
    return text


def _flag_bool(text: str, flag: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"--{flag}: {text!r} is not true or false")


def resolve_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Flags win over VIENNA_* variables, which win over defaults."""
    raw: dict[str, str | None] = {}
    for flag, default, _ in RUN_FLAGS:
        value = getattr(args, flag.replace("-", "_"), None)
        if value is None:
            value = env.get("VIENNA_" + flag.upper().replace("-", "_")) or None
        raw[flag] = value if value is not None else default

    def path(flag: str) -> Path | None:
        value = raw[flag]
        return Path(value) if value else None

    listen_host, listen_port = _address(str(raw["listen"]), "listen")
    if (
        raw["upstream-timeout"] is not None
        and raw["response-timeout"] == "300"
        and not (getattr(args, "response_timeout", None) or env.get("VIENNA_RESPONSE_TIMEOUT"))
    ):
        raw["response-timeout"] = raw["upstream-timeout"]  # the old name, given alone
    response_timeout = _number(str(raw["response-timeout"]), "response-timeout", minimum=0.01)
    if raw["upstream-proxy"]:
        parse_upstream_proxy(str(raw["upstream-proxy"]))
    api_host, api_port = _address(str(raw["api"]), "api")
    authority = raw["authority"]
    if authority:
        if not authority.startswith(("http://", "https://")):
            raise SettingsError(f"--authority: {authority!r} must be an http:// or https:// URL")
        if not raw["authority-token-file"]:
            raise SettingsError("--authority needs --authority-token-file (this sidecar's token)")
    webhooks, notify_secret, notify_format = resolve_notify(args, env)
    return Settings(
        notify_webhooks=webhooks,
        notify_secret_file=notify_secret,
        notify_format=notify_format,
        policy=path("policy"),
        listen_host=listen_host,
        listen_port=listen_port,
        api_host=api_host,
        api_port=api_port,
        mode=_choice(str(raw["mode"]), "mode", ("regular", "transparent")),
        agent_id=raw["agent-id"] or socket.gethostname(),
        data_dir=Path(str(raw["data-dir"])),
        warrant_key_file=path("warrant-key-file"),
        operators=path("operators"),
        upstream_ca_file=path("upstream-ca-file"),
        enforcement=_choice(str(raw["enforcement"]), "enforcement", ("enforce", "dryrun")),
        max_body_bytes=int(_number(str(raw["max-body-bytes"]), "max-body-bytes", minimum=0)),
        max_response_bytes=int(_number(str(raw["max-response-bytes"]), "max-response-bytes", minimum=0)),
        upstream_timeout=response_timeout,
        response_timeout=response_timeout,
        idle_timeout=_number(str(raw["idle-timeout"]), "idle-timeout", minimum=0.01),
        upstream_proxy=raw["upstream-proxy"],
        connect_timeout=_number(str(raw["connect-timeout"]), "connect-timeout", minimum=0.01),
        pending_ttl=_number(str(raw["pending-ttl"]), "pending-ttl", minimum=1),
        max_pending_requests=int(
            _number(str(raw["max-pending-requests"]), "max-pending-requests", minimum=0)
        ),
        ca_bundle_out=path("ca-bundle-out"),
        audit_key_file=path("audit-key-file"),
        audit_stdout=_flag_bool(str(raw["audit-stdout"]), "audit-stdout"),
        durable_audit=_flag_bool(str(raw["durable-audit"]), "durable-audit"),
        checkpoint_every=int(_number(str(raw["checkpoint-every"]), "checkpoint-every", minimum=1)),
        checkpoint_seconds=_number(str(raw["checkpoint-seconds"]), "checkpoint-seconds", minimum=0.1),
        public_api_url=raw["public-api-url"],
        demo=_flag_bool(str(raw["demo"]), "demo"),
        authority=authority.rstrip("/") if authority else None,
        authority_token_file=path("authority-token-file"),
        secrets_dir=path("secrets-dir"),
        audit_retain=_retention(str(raw["audit-retain"])),
        audit_min_free=_min_free(str(raw["audit-min-free"])),
    )
