"""Key material and operator identities read from disk: warrant key, audit key, operators file, CA bundle."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import certifi
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from policy.warrants import MIN_KEY_BYTES, WarrantKeys

log = logging.getLogger("vienna")
_HEX64 = frozenset("0123456789abcdef")


class KeyError_(ValueError):
    """A key or operators file that cannot be used; the message names the file."""


def _read_secret(path: Path) -> bytes:
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise KeyError_(f"{path}: cannot read: {exc.strerror}") from None
    # A key written with `echo` ends in a newline that is not part of the secret; a binary key
    # (os.urandom) is used byte for byte, whatever its last byte happens to be.
    try:
        secret.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        secret = secret.removesuffix(b"\n").removesuffix(b"\r")
    if len(secret) < MIN_KEY_BYTES:
        raise KeyError_(f"{path}: a key needs at least {MIN_KEY_BYTES} bytes, this one has {len(secret)}")
    return secret


def _generated_secret(path: Path, what: str) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(48).encode())
        finally:
            os.close(fd)
        log.warning("no %s given: generated a random one at %s (keep the data dir private)", what, path)
    else:
        log.warning("no %s given: using the generated one at %s", what, path)
    return _read_secret(path)


def key_id(secret: bytes) -> str:
    return "k-" + hashlib.sha256(b"vienna-kid:" + secret).hexdigest()[:16]


def load_warrant_keys(key_file: Path | None, data_dir: Path) -> WarrantKeys:
    secret = (
        _read_secret(key_file)
        if key_file
        else _generated_secret(data_dir / "warrant.key", "--warrant-key-file")
    )
    kid = key_id(secret)
    return WarrantKeys(keys={kid: secret}, active_kid=kid)


def load_notify_secret(key_file: Path | None, data_dir: Path) -> bytes:
    """The HMAC secret that signs webhook notifications (Vienna-Signature); receivers hold it too."""
    return (
        _read_secret(key_file)
        if key_file
        else _generated_secret(data_dir / "notify.key", "--notify-secret-file")
    )


def load_audit_key(key_file: Path | None, data_dir: Path) -> bytes:
    return (
        _read_secret(key_file) if key_file else _generated_secret(data_dir / "audit.key", "--audit-key-file")
    )


@dataclass(frozen=True, slots=True)
class Operators:
    """Operator names by the SHA-256 of their bearer token."""

    by_digest: tuple[tuple[bytes, str], ...]

    def authenticate(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        # Compare against every entry so that the time taken does not tell which one matched.
        for known, name in self.by_digest:
            if hmac.compare_digest(known, digest) and found is None:
                found = name
        return found

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.by_digest)


def read_entries(path: Path, key: str, shape: str) -> list[object]:
    """The list under `key` of a YAML file of entries (operators, sidecars); errors name the file."""
    try:
        document = YAML(typ="safe", pure=True).load(path.read_text())
    except OSError as exc:
        raise KeyError_(f"{path}: cannot read: {exc.strerror}") from None
    except YAMLError as exc:
        raise KeyError_(f"{path}: invalid YAML: {exc}") from None
    entries = document.get(key) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeyError_(f"{path}: expected '{key}: [{shape}, ...]'")
    return entries


def load_operators(path: Path | None) -> Operators:
    if path is None:
        return Operators(by_digest=())
    entries = read_entries(path, "operators", "{name, token_sha256}")
    found: list[tuple[bytes, str]] = []
    names: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{path}: operators[{index}]"
        if not isinstance(entry, dict):
            raise KeyError_(f"{where}: must be a mapping with name and token_sha256")
        name, digest = entry.get("name"), str(entry.get("token_sha256", "")).strip().lower()
        if not isinstance(name, str) or not name.strip():
            raise KeyError_(f"{where}.name: must be a non-empty string")
        if len(digest) != 64 or not set(digest) <= _HEX64:
            raise KeyError_(f"{where}.token_sha256: must be 64 hex digits (sha256 of the token)")
        if name in names:
            raise KeyError_(f"{where}.name: {name!r} appears twice")
        names.add(name)
        found.append((bytes.fromhex(digest), name))
    return Operators(by_digest=tuple(found))


def write_ca_bundle(out: Path, ca_cert: Path) -> None:
    """System roots plus the interception CA: what the agent trusts (never the CA's private key)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    bundle = Path(certifi.where()).read_bytes().rstrip() + b"\n" + ca_cert.read_bytes()
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_bytes(bundle)
    temporary.chmod(0o644)
    temporary.replace(out)


SIDECAR_ID_FILE = "sidecar.id"


def load_sidecar_id(data_dir: Path) -> str:
    """This sidecar's lasting identity: one per data dir (and so per single-use store), made once."""
    path = data_dir / SIDECAR_ID_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    made = "sc_" + secrets.token_hex(8)
    path.write_text(made + "\n")
    return made
