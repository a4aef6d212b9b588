"""The `vienna` command: run, policy check/explain, audit verify/export, approvals list/approve/deny."""

from __future__ import annotations

import argparse
import asyncio
import errno
import io
import json
import os
import stat
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlencode, urlsplit

from policy import engine
from policy.audit import (
    GENESIS_HASH,
    AuditEvent,
    chain_hash,
    checkpoint_payload,
    cut_payload,
    verify_chain,
    verify_checkpoint,
)
from policy.classify import classify
from policy.normalize import AmbiguousRequest, build_request
from policy.rules import PolicyError, RuleSet, load_rules
from proxy.settings import SettingsError, add_run_flags, resolve_settings

if TYPE_CHECKING:
    from proxy.audit_keeper import Release


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vienna-sidecar")
    except PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vienna",
        description="Vienna sidecar: an enforcement proxy for AI agents (risk tiers, warrants, audit).",
    )
    parser.add_argument("--version", action="version", version=f"vienna {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start the sidecar (proxy + control API)")
    add_run_flags(run)

    from proxy.authority.service import add_authority_flags

    authority = commands.add_parser(
        "authority", help="start the fleet authority (approvals, EdDSA warrants, central audit)"
    )
    add_authority_flags(authority)

    policy = commands.add_parser("policy", help="validate a policy or explain how it treats a request")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    check = policy_commands.add_parser("check", help="validate and lint; exit 0 ok, 1 invalid")
    check.add_argument("path", type=Path)
    check.add_argument(
        "--secrets-dir", type=Path, help="also check that every {secret:NAME} the policy injects is there"
    )
    explain = policy_commands.add_parser(
        "explain", help="print the intent, tier and matching rule of a request"
    )
    explain.add_argument("path", type=Path)
    explain.add_argument("method", nargs="?")
    explain.add_argument("url", nargs="?")
    explain.add_argument("--action", help="explain an intent named by its action (POST /v1/intents) instead")
    explain.add_argument("--target", default="", help="the intent's target, with --action")
    explain.add_argument("--body", type=Path, help="file holding the request body")
    explain.add_argument(
        "--header", action="append", default=[], metavar="K:V", help="a request header (repeatable)"
    )
    explain.add_argument("--agent", default="agent", help="agent id for `when` conditions")
    explain.add_argument("--json", action="store_true", help="print JSON")

    audit = commands.add_parser("audit", help="verify or export the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    verify = audit_commands.add_parser("verify", help="check the hash chain; exit 0 intact, 1 tampered")
    verify.add_argument("db", type=Path, nargs="?", help="the audit database (or --authority URL)")
    verify.add_argument("--authority", metavar="URL", help="check every chain the authority holds instead")
    verify.add_argument(
        "--token", default=os.environ.get("VIENNA_TOKEN"), help="operator token [env VIENNA_TOKEN]"
    )
    verify.add_argument("--checkpoints", type=Path, help="signed checkpoints file (default: next to the db)")
    verify.add_argument(
        "--audit-key-file", type=Path, help="key that signed the checkpoints (default: next to the db)"
    )
    export = audit_commands.add_parser("export", help="JSON Lines to stdout")
    export.add_argument("db", type=Path)
    export.add_argument("--since", type=int, default=0, metavar="SEQ", help="only events after SEQ")
    export.add_argument(
        "--no-mark",
        dest="mark",
        action="store_false",
        help="do not record in the data dir's state.db that these events were exported (retention drops"
        " only exported events)",
    )

    notify = commands.add_parser("notify", help="helpers for webhook receivers")
    notify_commands = notify.add_subparsers(dest="notify_command", required=True, metavar="SUBCOMMAND")
    check_signature = notify_commands.add_parser(
        "verify", help="check a Vienna-Signature header against a body; exit 0 valid, 1 not"
    )
    check_signature.add_argument("--secret-file", type=Path, required=True, help="the --notify-secret-file")
    check_signature.add_argument("--signature", required=True, help="the Vienna-Signature header's value")
    check_signature.add_argument("--body", type=Path, help="file holding the exact body (default: stdin)")
    check_signature.add_argument(
        "--tolerance", type=float, default=300, help="seconds a signature stays fresh"
    )

    approvals = commands.add_parser("approvals", help="operator commands against a running sidecar")
    approval_commands = approvals.add_subparsers(
        dest="approvals_command", required=True, metavar="SUBCOMMAND"
    )
    for name, text in (("list", "list warrant requests"), ("approve", "approve one"), ("deny", "deny one")):
        sub = approval_commands.add_parser(name, help=text)
        if name != "list":
            sub.add_argument("id")
            sub.add_argument("--justification", default="", help="why (required to approve T3)")
        else:
            sub.add_argument("--status", default="pending", help="pending|approved|denied|expired|all")
            sub.add_argument("--json", action="store_true", help="print JSON")
        sub.add_argument(
            "--api", default=os.environ.get("VIENNA_API_URL", "http://127.0.0.1:9090"), help="API base URL"
        )
        sub.add_argument(
            "--token", default=os.environ.get("VIENNA_TOKEN"), help="operator token [env VIENNA_TOKEN]"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "authority":
            return _authority(args)
        if args.command == "notify":
            return _notify_verify(args)
        if args.command == "policy":
            return _policy_check(args) if args.policy_command == "check" else _policy_explain(args)
        if args.command == "audit":
            return _audit_verify(args) if args.audit_command == "verify" else _audit_export(args)
        return _approvals(args)
    except BrokenPipeError:
        return 0


def _run(args: argparse.Namespace) -> int:
    from proxy.keys import KeyError_
    from proxy.runtime import configure_logging, serve

    configure_logging()
    try:
        settings = resolve_settings(args, os.environ)
        return asyncio.run(serve(settings))
    except SettingsError as exc:
        print(f"vienna run: {exc}", file=sys.stderr)
        return 2
    except (PolicyError, KeyError_) as exc:
        print(f"vienna run: cannot start:\n{exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"vienna run: cannot start: {exc.filename}: no such file", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"vienna run: cannot start: an address is already in use ({exc.strerror}); "
                "choose other ports with --listen HOST:PORT and --api HOST:PORT",
                file=sys.stderr,
            )
            return 1
        print(f"vienna run: cannot start: {exc}", file=sys.stderr)
        return 1


def _load(path: Path, out: TextIO) -> RuleSet | None:
    try:
        return load_rules(path.read_text(), file=str(path))
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror}", file=out)
    except UnicodeDecodeError:
        print(f"{path}:1: the file is not UTF-8 text", file=out)
    except PolicyError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=out)
    return None


def _policy_check(args: argparse.Namespace) -> int:
    rules = _load(args.path, sys.stderr)
    if rules is None:
        return 1
    for warning in rules.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.secrets_dir is not None:
        from proxy.secrets import SecretStore

        missing = SecretStore(args.secrets_dir).missing(rules.secret_names)
        lines = {name: rule.line for rule in rules.rules for name in rule.secret_names}
        for name in missing:
            print(
                f"error: {args.path}:{lines[name]}: inject: secret {name!r} is not in {args.secrets_dir}",
                file=sys.stderr,
            )
        if missing:
            return 1
    print(
        f"{args.path}: ok: {len(rules.rules)} rules, default_tier {rules.default_tier}, revision {rules.revision[:12]}"
    )
    return 0


def _resolve_for_explain(host: str, port: int) -> str | None:
    import socket

    from proxy.dataplane.destinations import DestinationResolver

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    addresses = [str(info[4][0]) for info in infos]
    return DestinationResolver.choose(addresses) if addresses else None


def _explain_action(rules: RuleSet, args: argparse.Namespace) -> int:
    decision = engine.decide_action(args.action, args.target, rules=rules)
    handler = rules.handler(args.action)
    result = {
        "action": args.action,
        "target": args.target,
        "tier": decision.tier.value,
        "rule": decision.intent.rule,
        "decision": decision.verdict.value,
        "reason": decision.reason,
        "handler": f"{handler.id}: {handler.describe()}"
        if handler
        else "(none: POST /v1/intents answers allowed, nothing runs)",
        "params": ", ".join(handler.params) if handler and handler.params else "-",
        "policy_revision": rules.revision,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key + ':':<{width + 2}}{value if value not in (None, '') else '-'}")
    return 0


def _policy_explain(args: argparse.Namespace) -> int:
    rules = _load(args.path, sys.stderr)
    if rules is None:
        return 1
    if args.action:
        return _explain_action(rules, args)
    if not args.method or not args.url:
        print("give METHOD URL, or --action NAME [--target T]", file=sys.stderr)
        return 2
    headers: list[tuple[str, str]] = []
    for item in args.header:
        key, sep, value = item.partition(":")
        if not sep:
            print(f"--header {item!r}: expected K:V", file=sys.stderr)
            return 2
        headers.append((key.strip(), value.strip()))
    body = args.body.read_bytes() if args.body else b""
    parts = urlsplit(args.url)
    try:
        request = build_request(
            method=args.method,
            scheme=parts.scheme or "https",
            host=parts.hostname or "",
            port=parts.port,
            target=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            headers=headers,
            body=body,
        )
    except (AmbiguousRequest, ValueError) as exc:
        reason = getattr(exc, "reason", str(exc))
        code = getattr(exc, "code", "request.bad_target")
        print(f"decision: bad_request\nreason:   {code}: {reason}")
        return 0
    # Resolved as the proxy would: a name that resolves to an internal address is refused there too.
    resolved = _resolve_for_explain(request.host, request.port)
    if resolved is not None:
        request = replace(request, address=resolved)
    found = classify(request, rules, agent=args.agent)
    decision = engine.decide(request, rules=rules, warrant=None, agent=args.agent, keys=None, now=time.time())
    result = {
        "request": {"method": request.method, "url": request.url},
        "action": found.intent.action,
        "target": found.intent.target,
        "tier": found.tier.value,
        "rule": found.intent.rule,
        "decision": decision.verdict.value,
        "reason_code": decision.reason_code,
        "reason": decision.reason,
        "policy_revision": rules.revision,
        "address": resolved
        or f"(not resolved: {request.host} has no address here; the proxy would answer 502)",
    }
    handler = rules.handler(found.intent.action)
    if handler is not None:
        result["handler"] = f"{handler.id}: {handler.describe()} (for POST /v1/intents)"
    if found.rule is not None and found.rule.inject_headers:
        # the names only: a secret's value is never printed
        result["inject"] = ", ".join(f"{name}: [injected]" for name, _ in found.rule.inject_headers)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    width = max(len(k) for k in result)
    for key in (
        "request",
        "address",
        "action",
        "target",
        "tier",
        "rule",
        "decision",
        "reason_code",
        "reason",
        "handler",
        "inject",
    ):
        if key not in result:
            continue
        value = result[key]
        if key == "request":
            value = f"{request.method} {request.url}"
        print(f"{key + ':':<{width + 2}}{value if value is not None else '-'}")
    return 0


def _notify_verify(args: argparse.Namespace) -> int:
    from proxy.keys import KeyError_, _read_secret
    from proxy.notify import verify_signature

    try:
        secret = _read_secret(args.secret_file)
    except KeyError_ as exc:
        print(exc, file=sys.stderr)
        return 2
    body = args.body.read_bytes() if args.body else sys.stdin.buffer.read()
    if verify_signature(secret, args.signature, body, now=time.time(), tolerance=args.tolerance):
        print("ok: signature valid")
        return 0
    print("INVALID: the signature does not match this body and secret, or it is older than the tolerance")
    return 1


def _authority(args: argparse.Namespace) -> int:
    from proxy.authority.db import StoreError
    from proxy.authority.service import resolve_authority_settings, serve_authority
    from proxy.keys import KeyError_
    from proxy.runtime import configure_logging

    configure_logging()
    try:
        settings = resolve_authority_settings(args, os.environ)
        return asyncio.run(serve_authority(settings))
    except SettingsError as exc:
        print(f"vienna authority: {exc}", file=sys.stderr)
        return 2
    except (KeyError_, StoreError) as exc:
        print(f"vienna authority: cannot start:\n{exc}", file=sys.stderr)
        return 1


def _audit_verify_authority(args: argparse.Namespace) -> int:
    """Every chain the authority holds, each checked link by link here, plus the problems it saw on arrival."""
    base = args.authority.rstrip("/")
    if "://" not in base:
        base = "http://" + base
    if not args.token:
        print("an operator token is required: --token or VIENNA_TOKEN", file=sys.stderr)
        return 2
    try:
        status, body = _call("GET", base + "/v1/audit/chains", args.token)
        if status != 200:
            return _fail(status, body)
        bad = 0
        for chain in body.get("chains", []):
            name = chain["chain"]
            events: list[AuditEvent] = []
            after = 0
            while True:
                query = urlencode({"sidecar": name, "after": after, "limit": 10000})
                status, page = _call("GET", f"{base}/v1/audit?{query}", args.token)
                if status != 200:
                    return _fail(status, page)
                batch = [
                    AuditEvent.from_dict(item) for item in page.get("events", []) if item.get("chain") == name
                ]
                if not batch:
                    break
                events.extend(batch)
                after = batch[-1].seq
            report = verify_chain(events)
            problems = int(chain.get("problems", 0))
            if not report.ok:
                bad += 1
                print(f"TAMPERED: chain {name}: event seq {report.first_bad_seq}: {report.problem}")
            elif report.count != int(chain.get("head_seq", -1)):
                bad += 1
                print(
                    f"TAMPERED: chain {name}: {report.count} events served, head says {chain.get('head_seq')}"
                )
            elif problems:
                bad += 1
                latest = (chain.get("recent_problems") or [{}])[0]
                print(
                    f"PROBLEM: chain {name}: intact ({report.count} events) but {problems} shipped batch(es) were"
                    f" refused on arrival; latest: seq {latest.get('seq')}: {latest.get('kind')}: {latest.get('detail')}"
                )
            else:
                print(f"ok: chain {name}: {report.count} events, chain intact, head {report.head_hash[:16]}")
        return 1 if bad else 0
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach the authority at {base}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1


def _audit_verify(args: argparse.Namespace) -> int:
    from proxy.audit_keeper import Cut
    from proxy.store import audit_snapshot

    if args.authority:
        return _audit_verify_authority(args)
    if args.db is None:
        print("give the audit database, or --authority URL --token TOKEN", file=sys.stderr)
        return 2
    db: Path = args.db
    if not db.exists():
        print(f"{db}: no such file", file=sys.stderr)
        return 1
    if db.is_dir():
        hint = db / "audit.db"
        print(f"{db}: is a directory; give the audit database itself, e.g. {hint}", file=sys.stderr)
        return 1
    checkpoints_file = args.checkpoints or db.with_name("checkpoints.jsonl")
    # Checkpoints first, then the log as of one moment: the sidecar may be writing, signing and
    # cutting meanwhile, and a checkpoint only ever signs what is already committed.
    checkpoint_lines = checkpoints_file.read_text().splitlines() if checkpoints_file.exists() else None
    try:
        with audit_snapshot(db) as (cut_rows, rows):
            events = list(rows)
        cuts = [Cut(*row) for row in cut_rows]
    except Exception as exc:  # sqlite errors, malformed rows: all mean "cannot vouch for it"
        print(f"{db}: cannot read the audit log: {exc}")
        return 1
    key_file = args.audit_key_file or db.with_name("audit.key")
    key: bytes | None = key_file.read_bytes().strip() if key_file.exists() else None

    # Where the chain starts: seq 1 after genesis, or — once retention dropped the oldest events —
    # right after a signed cut, whose (first_seq, prev_hash) anchors what is left.
    newest = cuts[-1] if cuts else None
    start = newest.first_seq if newest is not None else 1  # where the kept chain must begin
    first = events[0].seq if events else start
    anchor: Cut | None = None
    if not events and newest is not None:
        # Retention never drops the newest event: an empty log after a cut was emptied by hand.
        print(
            f"TAMPERED: event seq {start}: truncated: every event from the signed retention cut on is missing"
        )
        return 1
    if first > start:
        print(
            f"TAMPERED: event seq {start}: sequence_gap: {_missing(start, first - 1)}"
            + (
                " (retention dropped only the events before it)"
                if start > 1
                else " (no signed retention cut)"
            )
        )
        return 1
    if first < start:
        print(
            f"TAMPERED: event seq {first}: reinserted: the signed retention cut says the chain starts at"
            f" seq {start}, yet earlier events are present"
        )
        return 1
    if first > 1:
        anchor = newest
        assert anchor is not None
        if key is None:
            print(
                f"{db}: cannot check the signed retention cut at seq {first} without the audit key ({key_file})"
            )
            return 1
        signed = cut_payload(anchor.first_seq, anchor.prev_hash, anchor.ts, anchor.reason)
        if not verify_checkpoint(signed, anchor.sig, key):
            print(
                f"TAMPERED: event seq {first}: the retention cut's signature does not verify (forged or wrong key)"
            )
            return 1
    start_hash = anchor.prev_hash if anchor is not None else GENESIS_HASH
    report = verify_chain(events, start_prev_hash=start_hash, start_seq=first)
    if not report.ok:
        explained = {
            "edited": "its hash does not match its content",
            "sequence_gap": _missing(first + report.count, (report.first_bad_seq or 0) - 1),
            "reordered": "out of order",
            "broken_link": "its prev_hash is not the hash of the event before it"
            + (" (the signed retention cut)" if anchor is not None and report.count == 0 else ""),
        }.get(report.problem or "", "")
        print(
            f"TAMPERED: event seq {report.first_bad_seq}: {report.problem}: {explained}"
            f" ({report.count} events verified before it)"
        )
        return 1
    last = events[-1].seq if events else first - 1
    checked = 0
    if checkpoint_lines is not None:
        if key is None:
            print(f"{checkpoints_file}: cannot check checkpoints without the audit key ({key_file})")
            return 1
        hashes = {event.seq: event.hash for event in events}
        if anchor is not None:
            hashes[first - 1] = anchor.prev_hash
        for number, line in enumerate(checkpoint_lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                payload = checkpoint_payload(int(entry["size"]), str(entry["head_hash"]), float(entry["ts"]))
                signed_ok = verify_checkpoint(payload, str(entry["sig"]), key)
            except (ValueError, KeyError, TypeError):
                print(f"{checkpoints_file}:{number}: malformed checkpoint")
                return 1
            if not signed_ok:
                print(
                    f"{checkpoints_file}:{number}: checkpoint signature does not verify (forged or wrong key)"
                )
                return 1
            size = int(entry["size"])
            if size < first - 1:
                continue  # covers events retention dropped after they were exported or shipped
            if size not in hashes:
                print(
                    f"TAMPERED: event seq {last + 1}: truncated: signed checkpoint {number} covers"
                    f" {size} events, the log ends at seq {last}"
                )
                return 1
            if hashes[size] != entry["head_hash"]:
                print(f"TAMPERED: event seq {size}: differs from signed checkpoint {number}")
                return 1
            checked += 1
    summary = f"ok: {report.count} events, chain intact, head {report.head_hash[:16]}, {checked} signed checkpoints verified"
    if anchor is not None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(anchor.ts))
        summary += (
            f"; the chain starts at seq {first}: events 1-{first - 1} were {anchor.reason} and then dropped"
            f" by retention ({when}), and a signed cut anchors the rest"
        )
    print(summary)
    return 0


def _missing(first: int, last: int) -> str:
    return f"event seq {first} is missing" if first >= last else f"events seq {first}-{last} are missing"


def _audit_export(args: argparse.Namespace) -> int:
    from proxy.audit_keeper import exported_release
    from proxy.store import audit_snapshot

    db: Path = args.db
    if not db.exists():
        print(f"{db}: no such file", file=sys.stderr)
        return 1
    mark = exported_release(db.with_name("state.db"))
    with audit_snapshot(db) as (cuts, events):
        return _export_events(args, db, cuts, events, mark)


def _export_events(
    args: argparse.Namespace,
    db: Path,
    cuts: Sequence[tuple[int, str, float, str, str]],
    events: Iterator[AuditEvent],
    mark: Release,
) -> int:
    from proxy.audit_keeper import mark_exported

    start, prev_hash = (cuts[-1][0], cuts[-1][1]) if cuts else (1, GENESIS_HASH)
    marked = 0  # how far the previous export mark holds for this chain
    first: int | None = None
    expected = start
    broken: str | None = None
    last, last_hash = args.since, ""
    out = sys.stdout
    for event in events:
        if first is None:
            first = event.seq
            if first == start and start > 1 and args.since < start - 1:
                print(
                    f"note: events 1-{start - 1} were dropped by retention after they were exported or shipped;"
                    f" exporting from seq {start}",
                    file=sys.stderr,
                )
            if mark.seq < first:
                marked = mark.seq
        # The chain is checked on the way (as verify does): what is not intact is exported all the
        # same, for the record, but never counts as exported.
        if broken is None:
            if event.seq != expected or event.prev_hash != prev_hash:
                broken = f"seq {expected}" if event.seq != expected else f"seq {event.seq} (broken link)"
            elif chain_hash(event.prev_hash, event.body()) != event.hash:
                broken = f"seq {event.seq} (edited)"
        prev_hash, expected = event.hash, event.seq + 1
        if event.seq == mark.seq and event.hash == mark.hash:
            marked = mark.seq
        if event.seq > args.since:
            out.write(json.dumps(event.as_dict(), sort_keys=True, separators=(",", ":")) + "\n")
            last, last_hash = event.seq, event.hash
    out.flush()
    if broken is not None:
        print(
            f"warning: the audit chain does not verify at {broken} (run vienna audit verify);"
            " nothing is recorded as exported",
            file=sys.stderr,
        )
        return 1
    # Exported counts only what follows on from what was exported before (an export from a later
    # --since skipped events), and only output that went somewhere: not a terminal, not /dev/null.
    contiguous = args.since <= marked or (first is not None and args.since < first)
    if args.mark and last > marked and contiguous and _kept_output(out):
        mark_exported(db, last, last_hash, time.time())
    return 0


def _kept_output(out: TextIO) -> bool:
    """Whether what went to `out` was kept: a file (synced to disk here), a pipe or a socket."""
    try:
        fd = out.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    if os.isatty(fd) or stat.S_ISCHR(mode):
        return False
    if stat.S_ISREG(mode):
        os.fsync(fd)
    return True


def _call(method: str, url: str, token: str | None, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if urlsplit(url).scheme not in ("http", "https"):
        raise urllib.error.URLError(f"{url}: only http and https API URLs are supported")
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 -- scheme checked above
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310 -- scheme checked above
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": "http", "reason": exc.reason}


def _approvals(args: argparse.Namespace) -> int:
    base = args.api.rstrip("/")
    if "://" not in base:
        base = "http://" + base  # `--api 127.0.0.1:9090` means the plain-HTTP control API
    if not args.token:
        print("an operator token is required: --token or VIENNA_TOKEN", file=sys.stderr)
        return 2
    try:
        if args.approvals_command == "list":
            query = "" if args.status == "all" else f"?status={args.status}"
            status, body = _call("GET", f"{base}/v1/warrant-requests{query}", args.token)
            if status != 200:
                return _fail(status, body)
            items = body if isinstance(body, list) else []
            if args.json:
                print(json.dumps(items, indent=2))
                return 0
            if not items:
                print(f"no {args.status} warrant requests")
                return 0
            print(f"{'ID':<28} {'STATUS':<9} {'TIER':<4} {'VOTES':<5} {'ACTION':<26} {'TARGET':<30} REQUEST")
            for item in items:
                req = item.get("request", {})
                what = f"{req.get('method', '')} {req.get('url', '')}".strip() or "-"
                print(
                    f"{item['id']:<28} {item['status']:<9} {item['tier']:<4} "
                    f"{item['approvals']}/{item['approvals_required']:<3} {item['intent']['action']:<26} "
                    f"{item['intent']['target'][:30]:<30} {what}"
                )
            return 0
        verb = args.approvals_command
        status, body = _call(
            "POST",
            f"{base}/v1/warrant-requests/{args.id}/{verb}",
            args.token,
            {"justification": args.justification},
        )
        if status != 200:
            return _fail(status, body)
        print(
            f"{args.id}: {verb} recorded; status {body.get('status')} ({body.get('approvals')}/{body.get('approvals_required')} approvals)"
        )
        return 0
    except urllib.error.URLError as exc:
        print(f"cannot reach {base}: {exc.reason}", file=sys.stderr)
        return 1


def _fail(status: int, body: Any) -> int:
    why = (body.get("reason") or body.get("error")) if isinstance(body, dict) else body
    print(f"refused ({status}): {why}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
