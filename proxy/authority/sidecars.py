"""The sidecars file: `sidecars: [{name, token_sha256, agents: [id | "*"]}]` — who may act for which agents."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from proxy.keys import KeyError_, read_entries

_HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class SidecarIdentity:
    name: str
    agents: frozenset[str]

    def may_act_for(self, agent: str) -> bool:
        return "*" in self.agents or agent in self.agents


@dataclass(frozen=True, slots=True)
class Sidecars:
    by_digest: tuple[tuple[bytes, SidecarIdentity], ...]

    def authenticate(self, token: str) -> SidecarIdentity | None:
        digest = hashlib.sha256(token.encode()).digest()
        found: SidecarIdentity | None = None
        for known, identity in self.by_digest:  # every entry compared: the time taken tells nothing
            if hmac.compare_digest(known, digest) and found is None:
                found = identity
        return found

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(identity.name for _, identity in self.by_digest)


def load_sidecars(path: Path | None) -> Sidecars:
    if path is None:
        return Sidecars(by_digest=())
    entries = read_entries(path, "sidecars", "{name, token_sha256, agents}")
    found: list[tuple[bytes, SidecarIdentity]] = []
    names: set[str] = set()
    digests: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{path}: sidecars[{index}]"
        if not isinstance(entry, dict):
            raise KeyError_(f"{where}: must be a mapping with name, token_sha256 and agents")
        name, digest = entry.get("name"), str(entry.get("token_sha256", "")).strip().lower()
        agents = entry.get("agents")
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise KeyError_(f"{where}.name: must be a non-empty string without '/'")
        if len(digest) != 64 or not set(digest) <= _HEX64:
            raise KeyError_(f"{where}.token_sha256: must be 64 hex digits (sha256 of the token)")
        if not isinstance(agents, list) or not agents or not all(isinstance(a, str) and a for a in agents):
            raise KeyError_(f'{where}.agents: must be a non-empty list of agent ids (or "*" for any)')
        if name == "authority":
            raise KeyError_(f"{where}.name: 'authority' is the name of the authority's own chain")
        if name in names:
            raise KeyError_(f"{where}.name: {name!r} appears twice")
        if digest in digests:
            raise KeyError_(f"{where}.token_sha256: the same token is given to two sidecars")
        names.add(name)
        digests.add(digest)
        found.append((bytes.fromhex(digest), SidecarIdentity(name=name, agents=frozenset(agents))))
    return Sidecars(by_digest=tuple(found))
