"""`--secrets-dir`: credentials injected into forwarded requests (§14), read from files the agent
cannot see, re-read when they change (a Kubernetes Secret volume swaps a symlink). A value never
goes to the audit log, the logs, the metrics or an answer."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

_SECRET_REF = re.compile(r"\{secret:([A-Za-z0-9][A-Za-z0-9._-]{0,127})\}")
MAX_SECRET_BYTES = 64 * 1024


class SecretMissing(LookupError):
    """A secret a rule injects is not in the secrets dir (or unreadable): nothing is forwarded."""


@dataclass(frozen=True, slots=True)
class _Cached:
    stamp: tuple[int, int, int, int]
    value: str


class SecretStore:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> str:
        if self.directory is None:
            raise SecretMissing(f"secret {name!r}: no --secrets-dir is set")
        path = self.directory / name
        try:
            info = path.stat()  # follows the symlink a Secret volume swaps on update
        except OSError:
            raise SecretMissing(f"secret {name!r} is not in the secrets dir") from None
        stamp = (info.st_ino, info.st_dev, info.st_mtime_ns, info.st_size)
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and cached.stamp == stamp:
                return cached.value
        if info.st_size > MAX_SECRET_BYTES:
            raise SecretMissing(f"secret {name!r} is larger than {MAX_SECRET_BYTES} bytes")
        try:
            raw = path.read_bytes()
        except OSError:
            raise SecretMissing(f"secret {name!r} cannot be read") from None
        value = raw.decode("utf-8", "replace").removesuffix("\n").removesuffix("\r")
        if any(ch in value for ch in "\r\n\x00"):
            raise SecretMissing(f"secret {name!r} holds a line break or NUL: it cannot go into a header")
        with self._lock:
            self._cache[name] = _Cached(stamp, value)
        return value

    def render(self, template: str) -> str:
        return _SECRET_REF.sub(lambda m: self.get(m.group(1)), template)

    def missing(self, names: frozenset[str]) -> list[str]:
        absent = []
        for name in sorted(names):
            try:
                self.get(name)
            except SecretMissing:
                absent.append(name)
        return absent

    def values(self) -> list[str]:
        """Every value read so far (for tests and redaction of logs)."""
        with self._lock:
            return [cached.value for cached in self._cache.values()]


def secrets_dir_files(directory: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if not entry.name.startswith("."))
