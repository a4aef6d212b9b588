"""Audit events: canonical JSON, the hash chain and its tamper detection, checkpoints, redaction."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.audit import (
    GENESIS_HASH,
    REDACTED,
    AuditEvent,
    ChainReport,
    EventType,
    canonical_json,
    chain_hash,
    checkpoint_payload,
    link,
    redact,
    redact_headers,
    redact_with_paths,
    sign_checkpoint,
    verify_chain,
    verify_checkpoint,
)

NOW = 1_700_000_000.0
KEY = b"c" * 32


def build_chain(payloads: list[dict[str, object]]) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    for i, payload in enumerate(payloads):
        events.append(
            link(
                prev_hash=events[-1].hash if events else GENESIS_HASH,
                seq=i + 1,
                ts=NOW + i,
                type=EventType.DECISION,
                agent="agent-1",
                policy_revision="rev-abc",
                payload=payload,
            )
        )
    return events


CHAIN = build_chain([{"n": n, "decision": "allow"} for n in range(1, 6)])


# --- canonical JSON -----------------------------------------------------------------------------


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": [1, 2.5], "a": "é"}) == '{"a":"é","b":[1,2.5]}'.encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {"x": [float("-inf")]}])
def test_canonical_json_refuses_non_finite_numbers(bad: object) -> None:
    with pytest.raises(ValueError):
        canonical_json(bad)


# --- linking ------------------------------------------------------------------------------------


def test_first_event_links_to_genesis_and_hash_covers_the_body() -> None:
    first = CHAIN[0]
    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
    assert first.hash == hashlib.sha256(GENESIS_HASH.encode() + canonical_json(first.body())).hexdigest()
    assert first.hash == chain_hash(GENESIS_HASH, first.body())
    assert "hash" not in first.body()
    assert first.as_dict() == {**first.body(), "hash": first.hash}


def test_each_event_links_to_the_previous_hash() -> None:
    assert [e.prev_hash for e in CHAIN[1:]] == [e.hash for e in CHAIN[:-1]]
    assert [e.seq for e in CHAIN] == [1, 2, 3, 4, 5]


def test_linked_payload_is_detached_from_the_callers_objects() -> None:
    payload: dict[str, object] = {"headers": [("a", "b")]}
    event = link(
        prev_hash=GENESIS_HASH, seq=1, ts=NOW, type="intent", agent="a", policy_revision="r", payload=payload
    )
    payload["headers"] = "changed"
    assert event.payload == {"headers": [["a", "b"]]}
    assert verify_chain([event]).ok


@pytest.mark.parametrize(
    "changes",
    [{"type": "gossip"}, {"seq": 0}, {"prev_hash": "abc"}, {"payload": {"x": float("nan")}}],
    ids=["unknown type", "seq zero", "short prev hash", "nan payload"],
)
def test_link_refuses_events_outside_the_schema(changes: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "prev_hash": GENESIS_HASH,
        "seq": 1,
        "ts": NOW,
        "type": "decision",
        "agent": "a",
        "policy_revision": "r",
        "payload": {},
    }
    with pytest.raises(ValueError):
        link(**{**fields, **changes})  # type: ignore[arg-type]


# --- verifying ----------------------------------------------------------------------------------


def test_intact_chain_verifies() -> None:
    assert verify_chain(CHAIN) == ChainReport(True, 5, CHAIN[-1].hash, None, None)


def test_empty_chain_verifies_with_the_genesis_head() -> None:
    assert verify_chain([]) == ChainReport(True, 0, GENESIS_HASH, None, None)


def test_chain_verifies_from_a_later_starting_point() -> None:
    report = verify_chain(CHAIN[2:], start_prev_hash=CHAIN[1].hash, start_seq=3)
    assert (report.ok, report.count, report.head_hash) == (True, 3, CHAIN[-1].hash)


def _edit_payload(events: list[AuditEvent]) -> list[AuditEvent]:
    return [*events[:2], replace(events[2], payload={"n": 3, "decision": "deny"}), *events[3:]]


def _edit_and_rehash(events: list[AuditEvent]) -> list[AuditEvent]:
    forged = replace(events[2], payload={"n": 3, "decision": "deny"})
    forged = replace(forged, hash=chain_hash(forged.prev_hash, forged.body()))
    return [*events[:2], forged, *events[3:]]


def _edit_time(events: list[AuditEvent]) -> list[AuditEvent]:
    return [*events[:2], replace(events[2], ts=events[2].ts + 1), *events[3:]]


TAMPERING = [
    ("edited payload", _edit_payload, 3, "edited", 2),
    ("edited timestamp", _edit_time, 3, "edited", 2),
    ("edited and rehashed", _edit_and_rehash, 4, "broken_link", 3),
    ("deleted middle event", lambda e: [*e[:2], *e[3:]], 4, "sequence_gap", 2),
    ("deleted first event", lambda e: e[1:], 2, "sequence_gap", 0),
    ("swapped two events", lambda e: [e[0], e[2], e[1], *e[3:]], 3, "reordered", 1),
    ("duplicated event", lambda e: [*e[:2], e[1], *e[2:]], 2, "reordered", 2),
    ("moved to the end", lambda e: [e[0], *e[2:], e[1]], 3, "sequence_gap", 1),
]


@pytest.mark.parametrize(
    ("tamper", "first_bad_seq", "problem", "good"), [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING]
)
def test_tampering_is_detected_at_the_first_bad_event(
    tamper: Callable[[list[AuditEvent]], list[AuditEvent]], first_bad_seq: int, problem: str, good: int
) -> None:
    tampered = tamper(CHAIN)
    report = verify_chain(tampered)
    assert (report.ok, report.first_bad_seq, report.problem) == (False, first_bad_seq, problem)
    assert report.count == good
    assert report.head_hash == (tampered[good - 1].hash if good else GENESIS_HASH)


def test_chain_survives_an_export_round_trip() -> None:
    lines = [json.dumps(event.as_dict()) for event in CHAIN]
    assert verify_chain(AuditEvent.from_dict(json.loads(line)) for line in lines).ok


@pytest.mark.parametrize("changes", [{"seq": "1"}, {"ts": True}, {"payload": []}, {"hash": None}], ids=str)
def test_from_dict_refuses_a_bad_shape(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AuditEvent.from_dict({**CHAIN[0].as_dict(), **changes})


def test_unserialisable_stored_payload_counts_as_edited() -> None:
    broken = replace(CHAIN[0], payload={"x": float("nan")})
    assert verify_chain([broken]).problem == "edited"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)
_PAYLOADS = st.lists(st.dictionaries(st.text(), _JSON, max_size=4), min_size=1, max_size=6)


@given(_PAYLOADS)
def test_any_chain_of_json_payloads_verifies(payloads: list[dict[str, object]]) -> None:
    events = build_chain(payloads)
    assert verify_chain(events) == ChainReport(True, len(events), events[-1].hash, None, None)


@given(payloads=_PAYLOADS, data=st.data())
def test_any_payload_edit_is_detected(payloads: list[dict[str, object]], data: st.DataObject) -> None:
    events = build_chain(payloads)
    index = data.draw(st.integers(0, len(events) - 1))
    new_payload = data.draw(st.dictionaries(st.text(), _JSON, max_size=4))
    if canonical_json(new_payload) == canonical_json(events[index].payload):
        return
    events[index] = replace(events[index], payload=new_payload)
    report = verify_chain(events)
    assert (report.ok, report.first_bad_seq, report.problem) == (False, index + 1, "edited")


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_signature_verifies_only_for_the_same_payload_and_key() -> None:
    payload = checkpoint_payload(5, CHAIN[-1].hash, NOW)
    signature = sign_checkpoint(payload, KEY)
    assert verify_checkpoint(payload, signature, KEY)
    assert not verify_checkpoint(checkpoint_payload(4, CHAIN[-2].hash, NOW), signature, KEY)
    assert not verify_checkpoint(payload, signature, b"d" * 32)
    assert not verify_checkpoint(payload, signature.upper(), KEY)
    assert not verify_checkpoint(payload, "é" * 64, KEY)
    assert not verify_checkpoint(payload, "", KEY)


def test_checkpoint_payload_is_canonical() -> None:
    payload = checkpoint_payload(5, "ab" * 32, NOW)
    assert json.loads(payload)["size"] == 5
    assert canonical_json(json.loads(payload)) == payload


def test_checkpoint_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError):
        sign_checkpoint(b"{}", b"")


# --- redaction ----------------------------------------------------------------------------------


def test_secret_headers_are_redacted_case_insensitively() -> None:
    headers = [("Authorization", "Bearer x"), ("accept", "*/*"), ("Vienna-Warrant", "eyJ"), ("Cookie", "a=b")]
    assert redact_headers(headers) == [
        ("Authorization", REDACTED),
        ("accept", "*/*"),
        ("Vienna-Warrant", REDACTED),
        ("Cookie", REDACTED),
    ]


def test_nested_secrets_are_redacted_and_named() -> None:
    event = {
        "request": {
            "headers": {"X-Api-Key": "k", "content-type": "application/json"},
            "header_pairs": [["proxy-authorization", "Basic y"], ["accept", "*/*"]],
        },
        "params": [{"Token": "t", "warrant_id": "w-1"}, {"password": "p", "user": "u"}],
        "warrant": "eyJ...",
    }
    redacted, paths = redact_with_paths(event)
    assert redacted == {
        "request": {
            "headers": {"X-Api-Key": REDACTED, "content-type": "application/json"},
            "header_pairs": [["proxy-authorization", REDACTED], ["accept", "*/*"]],
        },
        "params": [{"Token": REDACTED, "warrant_id": "w-1"}, {"password": REDACTED, "user": "u"}],
        "warrant": REDACTED,
    }
    assert paths == (
        "$.request.headers.X-Api-Key",
        "$.request.header_pairs[0][1]",
        "$.params[0].Token",
        "$.params[1].password",
        "$.warrant",
    )
    assert event["warrant"] == "eyJ..."  # the input is left as it was
    assert redact(event) == redacted


def test_redaction_keeps_tuples_and_plain_values() -> None:
    assert redact((("cookie", "c"), 1, None)) == (("cookie", REDACTED), 1, None)
    assert redact("authorization") == "authorization"


@given(
    agent=st.text(max_size=20),
    revision=st.text(max_size=20),
    seq=st.integers(min_value=1, max_value=2**40),
    ts=st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(min_value=0, max_value=2**40)),
    payload=st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers(), st.text(max_size=8))),
)
def test_link_hash_equals_the_hash_of_the_canonical_body(
    agent: str, revision: str, seq: int, ts: float, payload: dict[str, object]
) -> None:
    event = link(
        prev_hash=GENESIS_HASH,
        seq=seq,
        ts=ts,
        type="decision",
        agent=agent,
        policy_revision=revision,
        payload=payload,
    )
    assert event.hash == chain_hash(GENESIS_HASH, event.body())
