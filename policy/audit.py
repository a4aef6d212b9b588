"""Audit event schema, canonical JSON, hash chain link and verify, checkpoints and redaction."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

GENESIS_HASH = "0" * 64
REDACTED = "[redacted]"
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "vienna-warrant", "x-api-key"}
)
SECRET_KEYS = SECRET_HEADERS | {"token", "warrant", "password", "secret"}
CHECKPOINT_KIND = "vienna.audit.checkpoint"
CUT_KIND = "vienna.audit.cut"

_HASH = re.compile(r"[0-9a-f]{64}")


class EventType(StrEnum):
    INTENT = "intent"
    DECISION = "decision"
    WARRANT_REQUEST = "warrant_request"
    APPROVAL = "approval"
    WARRANT = "warrant"
    EXECUTION = "execution"
    VERIFICATION = "verification"
    POLICY = "policy"


def canonical_json(obj: object) -> bytes:
    """The one byte form that is hashed and signed; raises ValueError for NaN and infinities."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    seq: int
    ts: float
    type: str
    agent: str
    policy_revision: str
    payload: Mapping[str, object]
    prev_hash: str
    hash: str
    # The canonical payload text as hashed, kept so that storing the event does not serialise it again.
    payload_json: str = field(default="", compare=False, repr=False)

    def body(self) -> dict[str, object]:
        """What the hash covers: every field but the hash itself."""
        return {
            "seq": self.seq,
            "ts": self.ts,
            "type": str(self.type),
            "agent": self.agent,
            "policy_revision": self.policy_revision,
            "payload": dict(self.payload),
            "prev_hash": self.prev_hash,
        }

    def as_dict(self) -> dict[str, object]:
        return {**self.body(), "hash": self.hash}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> AuditEvent:
        """Rebuild an event from `as_dict` output (an export line); raises ValueError on a bad shape."""
        seq, ts, payload = data.get("seq"), data.get("ts"), data.get("payload")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ValueError("audit event 'seq' must be an integer")
        if not isinstance(ts, int | float) or isinstance(ts, bool):
            raise ValueError("audit event 'ts' must be a number")
        if not isinstance(payload, Mapping):
            raise ValueError("audit event 'payload' must be an object")
        texts = {}
        for key in ("type", "agent", "policy_revision", "prev_hash", "hash"):
            value = data.get(key)
            if not isinstance(value, str):
                raise ValueError(f"audit event {key!r} must be a string")
            texts[key] = value
        return cls(
            seq=seq,
            ts=ts,
            type=texts["type"],
            agent=texts["agent"],
            policy_revision=texts["policy_revision"],
            payload=payload,
            prev_hash=texts["prev_hash"],
            hash=texts["hash"],
        )


def chain_hash(prev_hash: str, body: Mapping[str, object]) -> str:
    return hashlib.sha256(prev_hash.encode("utf-8") + canonical_json(body)).hexdigest()


def link(
    *,
    prev_hash: str,
    seq: int,
    ts: float,
    type: str,
    agent: str,
    policy_revision: str,
    payload: Mapping[str, object],
) -> AuditEvent:
    """Build the event that follows the one whose hash is `prev_hash` (GENESIS_HASH for the first)."""
    if not _HASH.fullmatch(prev_hash):
        raise ValueError("prev_hash must be 64 lower-case hex digits")
    if seq < 1:
        raise ValueError("seq starts at 1")
    event_type = EventType(type)  # raises ValueError for a type outside the schema
    # A JSON round trip detaches the payload from the caller's mutable objects and makes what
    # is stored exactly what was hashed (tuples become lists, keys become strings).
    payload_bytes = canonical_json(payload)
    stored = json.loads(payload_bytes)
    if not isinstance(stored, dict):
        raise ValueError("payload must be a mapping")
    # The body's canonical form, assembled around the payload bytes already serialised: equal to
    # canonical_json(event.body()) (keys in sorted order), without serialising the payload twice.
    text = _json_text
    body = b"".join(
        (
            b'{"agent":',
            text(agent),
            b',"payload":',
            payload_bytes,
            b',"policy_revision":',
            text(policy_revision),
            b',"prev_hash":"',
            prev_hash.encode("ascii"),  # checked above: 64 hex digits need no escaping
            b'","seq":',
            str(seq).encode("ascii"),
            b',"ts":',
            text(ts),
            b',"type":"',
            event_type.value.encode("ascii"),  # schema names: plain ASCII
            b'"}',
        )
    )
    return AuditEvent(
        seq=seq,
        ts=ts,
        type=event_type.value,
        agent=agent,
        policy_revision=policy_revision,
        payload=stored,
        prev_hash=prev_hash,
        hash=hashlib.sha256(prev_hash.encode("utf-8") + body).hexdigest(),
        payload_json=payload_bytes.decode("utf-8"),
    )


def _json_text(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class ChainReport:
    """`count` events verified; `head_hash` is the hash of the last good one."""

    ok: bool
    count: int
    head_hash: str
    first_bad_seq: int | None
    problem: str | None


def verify_chain(
    events: Iterable[AuditEvent], *, start_prev_hash: str = GENESIS_HASH, start_seq: int = 1
) -> ChainReport:
    """Walk the chain in order; stops at the first event that does not verify.

    Streams with one event of look-ahead, which is what tells a swap ("reordered") from a
    deletion ("sequence_gap"). Truncation at the tail needs a signed checkpoint to be seen.
    """
    iterator = iter(events)
    prev_hash, expected_seq, count = start_prev_hash, start_seq, 0
    event = next(iterator, None)
    while event is not None:
        following = next(iterator, None)
        problem = _chain_problem(event, prev_hash, expected_seq, following)
        if problem is not None:
            return ChainReport(False, count, prev_hash, event.seq, problem)
        prev_hash, expected_seq, count = event.hash, event.seq + 1, count + 1
        event = following
    return ChainReport(True, count, prev_hash, None, None)


def _chain_problem(
    event: AuditEvent, prev_hash: str, expected_seq: int, following: AuditEvent | None
) -> str | None:
    try:
        recomputed = chain_hash(event.prev_hash, event.body())
    except (TypeError, ValueError):
        return "edited"  # a body that cannot even be serialised was not written by `link`
    if event.hash != recomputed:
        return "edited"
    if event.seq < expected_seq:
        return "reordered"
    if event.seq > expected_seq:
        swapped = following is not None and following.seq == expected_seq
        return "reordered" if swapped else "sequence_gap"
    if event.prev_hash != prev_hash:
        return "broken_link"
    return None


def checkpoint_payload(size: int, head_hash: str, ts: float) -> bytes:
    """What a checkpoint signs: the chain length and head, so truncation and rewrites show."""
    return canonical_json({"kind": CHECKPOINT_KIND, "size": size, "head_hash": head_hash, "ts": ts})


def cut_payload(first_seq: int, prev_hash: str, ts: float, reason: str) -> bytes:
    """What a retention cut signs: the chain now starts at `first_seq`, after the event whose hash
    is `prev_hash`; the dropped events were exported or shipped first (`reason` says which)."""
    return canonical_json(
        {"kind": CUT_KIND, "first_seq": first_seq, "prev_hash": prev_hash, "ts": ts, "reason": reason}
    )


def sign_checkpoint(payload: bytes, key: bytes) -> str:
    if not key:
        raise ValueError("a checkpoint key must not be empty")
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify_checkpoint(payload: bytes, sig: str, key: bytes) -> bool:
    expected = sign_checkpoint(payload, key).encode("ascii")
    return hmac.compare_digest(expected, sig.encode("utf-8", "replace"))


def redact_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, REDACTED if name.lower() in SECRET_HEADERS else value) for name, value in headers]


def redact(obj: object) -> object:
    """A copy of `obj` with secret-named keys and secret header pairs replaced by REDACTED."""
    return redact_with_paths(obj)[0]


def redact_with_paths(obj: object) -> tuple[object, tuple[str, ...]]:
    """Like `redact`, also naming what was redacted (`$.request.headers[0][1]`) for the event."""
    found: list[str] = []
    return _redact(obj, (), found), tuple(found)


def _path_text(path: tuple[str | int, ...]) -> str:
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def _redact(obj: object, path: tuple[str | int, ...], found: list[str]) -> object:
    # Paths are kept as tuples and only turned into text for what is redacted: this runs on every
    # audit event, and almost nothing in a payload is a secret.
    if isinstance(obj, Mapping):
        result: dict[object, object] = {}
        for key, value in obj.items():
            if isinstance(key, str) and key.lower() in SECRET_KEYS:
                found.append(_path_text((*path, key)))
                result[key] = REDACTED
            elif isinstance(value, Mapping | list | tuple):
                result[key] = _redact(value, (*path, str(key)), found)
            else:
                result[key] = value
        return result
    if isinstance(obj, list | tuple):
        # Headers are often kept as [name, value] pairs rather than a mapping.
        if len(obj) == 2 and isinstance(obj[0], str) and obj[0].lower() in SECRET_HEADERS:
            found.append(_path_text((*path, 1)))
            items: list[object] = [obj[0], REDACTED]
        else:
            items = [
                _redact(item, (*path, i), found) if isinstance(item, Mapping | list | tuple) else item
                for i, item in enumerate(obj)
            ]
        return tuple(items) if isinstance(obj, tuple) else items
    return obj
