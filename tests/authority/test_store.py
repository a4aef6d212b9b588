"""The authority's store, the same suite on SQLite and on a real PostgreSQL: warrant requests,
votes and quorum, single use, chains checked on arrival, signing keys, migrations."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest

from policy.approvals import ApprovalError, RequestStatus
from policy.audit import GENESIS_HASH, AuditEvent, link, verify_chain
from policy.model import Intent, Tier
from proxy.authority.db import MIGRATIONS, StoreError, migrate, open_database
from proxy.authority.store import AUTHORITY_CHAIN, AuthorityStore, Minted, RequestRow

NOW = 1_800_000_000.0
CONSTRAINTS = {
    "method": "DELETE",
    "scheme": "https",
    "host": "api.example.com",
    "port": 443,
    "path": "/x",
    "max_uses": 1,
}


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[AuthorityStore]:
    opened = AuthorityStore(await open_database(store_url))
    yield opened
    await opened.close()


async def _open(store: AuthorityStore, *, agent: str = "agent-1", fingerprint: str = "f1", tier: Tier = Tier.T3,
                now: float = NOW, max_pending: int = 100) -> tuple[RequestRow, bool] | None:  # fmt: skip
    return await store.open_request(
        sidecar="sc1",
        agent=agent,
        fingerprint=fingerprint,
        tier=tier,
        intent=Intent(action="repo.delete", target="o/r", rule="delete"),
        request={"method": "DELETE", "url": "https://api.example.com/x"},
        rule_id="delete",
        terms={"ttl_seconds": 300},
        constraints=CONSTRAINTS,
        now=now,
        pending_ttl=3600,
        max_pending=max_pending,
        policy_revision="rev",
    )


def _minter(count: list[int]) -> Callable[[RequestRow, float], Minted]:
    def mint(row: RequestRow, now: float) -> Minted:
        count.append(1)
        return Minted(token=f"token-{len(count)}", jti=f"wt_{len(count)}", exp=now + 300, kid="ed-1")

    return mint


async def test_open_reuses_the_pending_request_and_caps_pending(store: AuthorityStore) -> None:
    first = await _open(store)
    again = await _open(store)
    assert first is not None and again is not None
    assert first[1] is True and again[1] is False and again[0].state.id == first[0].state.id
    other = await _open(store, fingerprint="f2", max_pending=1)
    assert other is None  # the agent already has one pending request
    assert await store.count_pending(NOW) == 1
    assert await store.count_pending(NOW + 7200) == 0  # expired


async def test_quorum_mints_once_and_votes_count_once(store: AuthorityStore) -> None:
    opened = await _open(store)
    assert opened is not None
    request_id = opened[0].state.id
    minted: list[int] = []
    first = await store.vote(
        request_id, operator="alice", approve=True, justification="yes", now=NOW + 1, mint=_minter(minted)
    )
    assert first.state.status is RequestStatus.PENDING and first.warrant is None
    with pytest.raises(ApprovalError) as twice:
        await store.vote(
            request_id, operator="alice", approve=True, justification="yes", now=NOW + 2, mint=_minter(minted)
        )
    assert twice.value.code == "approval.duplicate_vote"
    with pytest.raises(ApprovalError) as unjustified:
        await store.vote(
            request_id, operator="bob", approve=True, justification=" ", now=NOW + 2, mint=_minter(minted)
        )
    assert unjustified.value.code == "approval.justification_required"
    second = await store.vote(
        request_id, operator="bob", approve=True, justification="ok", now=NOW + 3, mint=_minter(minted)
    )
    assert second.state.status is RequestStatus.APPROVED and second.warrant == "token-1"
    with pytest.raises(ApprovalError) as late:
        await store.vote(
            request_id, operator="carol", approve=True, justification="ok", now=NOW + 4, mint=_minter(minted)
        )
    assert late.value.code == "approval.not_pending"
    assert len(minted) == 1
    stored = await store.get_request(request_id)
    assert stored is not None and [v.operator for v in stored.state.votes] == ["alice", "bob"]
    # An approved request with a usable warrant is handed out again rather than opened anew.
    reused = await _open(store, now=NOW + 5)
    assert reused is not None and reused[1] is False and reused[0].warrant == "token-1"


async def test_concurrent_votes_on_one_request_mint_one_warrant(store: AuthorityStore) -> None:
    opened = await _open(store)
    assert opened is not None
    minted: list[int] = []

    async def vote(n: int) -> str:
        try:
            await store.vote(
                opened[0].state.id,
                operator=f"op{n}",
                approve=True,
                justification="j",
                now=NOW + 1,
                mint=_minter(minted),
            )
            return "ok"
        except ApprovalError as exc:
            return exc.code

    results = await asyncio.gather(*(vote(n) for n in range(20)))
    assert results.count("ok") == 2 and len(minted) == 1
    assert set(results) <= {"ok", "approval.not_pending"}


async def test_unknown_request_and_deny(store: AuthorityStore) -> None:
    with pytest.raises(KeyError):
        await store.vote("wr_nope", operator="a", approve=True, justification="j", now=NOW, mint=_minter([]))
    opened = await _open(store)
    assert opened is not None
    denied = await store.vote(
        opened[0].state.id, operator="alice", approve=False, justification="no", now=NOW + 1, mint=_minter([])
    )
    assert denied.state.status is RequestStatus.DENIED


async def test_consume_never_passes_max_uses_even_concurrently(store: AuthorityStore) -> None:
    results = await asyncio.gather(
        *(store.consume("wt_a", 3, sidecar="sc", agent="agent-1", now=NOW) for _ in range(12))
    )
    assert sum(1 for counted, _ in results if counted) == 3
    assert await store.uses("wt_a") == 3
    assert await store.consume("wt_a", 3, sidecar="sc", agent="agent-1", now=NOW) == (False, 3)


async def test_receive_creates_nothing_for_an_empty_batch_and_dedupes_problems(store: AuthorityStore) -> None:
    got = await store.receive("sc1/empty", "sc1", [], NOW)
    assert (got.accepted, got.head_seq) == (0, 0) and await store.chains() == []
    events = _chain(3)
    for _ in range(3):  # the same bad batch, retried
        assert (await store.receive("sc1/d", "sc1", events[1:], NOW)).problem == "sequence_gap"
    assert (await store.chains())[0].problems == 1


async def test_consumes_are_recorded_in_the_authority_chain(store: AuthorityStore) -> None:
    await store.consume("wt_v", 1, sidecar="sc1", agent="agent-1", now=NOW)
    await store.consume("wt_v", 1, sidecar="sc2", agent="agent-1", now=NOW)
    own = [event for _, event in await store.events(AUTHORITY_CHAIN, after=0, limit=10)]
    assert [(e.type, e.payload["event"], e.payload["sidecar"]) for e in own] == [
        ("verification", "warrant_consumed", "sc1"),
        ("verification", "warrant_replayed", "sc2"),
    ]


def _chain(count: int, start: int = 1, prev: str = GENESIS_HASH) -> list[AuditEvent]:
    events = []
    for seq in range(start, start + count):
        event = link(prev_hash=prev, seq=seq, ts=NOW + seq, type="decision", agent="agent-1",
                     policy_revision="rev", payload={"n": seq, "text": "é"})  # fmt: skip
        events.append(event)
        prev = event.hash
    return events


async def test_receive_accepts_in_order_and_is_idempotent(store: AuthorityStore) -> None:
    events = _chain(10)
    got = await store.receive("sc1/a", "sc1", events[:6], NOW)
    assert (got.accepted, got.duplicates, got.head_seq, got.problem) == (6, 0, 6, None)
    again = await store.receive("sc1/a", "sc1", events[3:], NOW)  # an answer lost: the batch sent twice
    assert (again.accepted, again.duplicates, again.head_seq, again.problem) == (4, 3, 10, None)
    served = [event for _, event in await store.events("sc1/a", after=0, limit=100)]
    assert [e.hash for e in served] == [e.hash for e in events]
    assert verify_chain(served).ok
    assert await store.chains_of("sc1") == ["sc1/a"]  # a sidecar's name finds its chains
    assert [e.seq for _, e in await store.events("sc1/a", after=8, limit=100)] == [9, 10]
    assert await store.head("sc1/a") == (10, events[-1].hash)


@pytest.mark.parametrize("problem", ["sequence_gap", "edited", "broken_link", "conflict"])
async def test_receive_reports_a_gap_or_bad_link_and_stores_nothing_after_it(
    store: AuthorityStore, problem: str
) -> None:
    events = _chain(6)
    await store.receive("sc1/b", "sc1", events[:3], NOW)
    if problem == "sequence_gap":
        batch = events[4:]
    elif problem == "edited":
        batch = [dataclasses.replace(events[3], payload={"n": 999}), *events[4:]]
    elif problem == "broken_link":
        forged = link(
            prev_hash="f" * 64,
            seq=4,
            ts=NOW,
            type="decision",
            agent="agent-1",
            policy_revision="rev",
            payload={},
        )
        batch = [forged]
    else:
        batch = [_chain(1, start=1, prev="e" * 64)[0]]  # seq 1 again, another hash
    got = await store.receive("sc1/b", "sc1", batch, NOW)
    assert got.problem == problem and got.head_seq == 3
    chains = {c.chain: c for c in await store.chains()}
    assert chains["sc1/b"].problems == 1 and chains["sc1/b"].recent_problems[0]["kind"] == problem
    assert len(await store.events("sc1/b", after=0, limit=100)) == 3


async def test_own_chain_records_requests_votes_and_the_warrant(store: AuthorityStore) -> None:
    opened = await _open(store, tier=Tier.T2)
    assert opened is not None
    await store.vote(
        opened[0].state.id, operator="alice", approve=True, justification="", now=NOW + 1, mint=_minter([])
    )
    own = [event for _, event in await store.events(AUTHORITY_CHAIN, after=0, limit=100)]
    assert [e.type for e in own] == ["warrant_request", "approval", "warrant"]
    assert verify_chain(own).ok


async def test_jwks_keeps_a_retired_key_until_its_last_warrant_expires(store: AuthorityStore) -> None:
    await store.register_key("ed-old", {"kid": "ed-old"}, NOW)
    opened = await _open(store, tier=Tier.T2)
    assert opened is not None

    def mint(row: RequestRow, now: float) -> Minted:
        return Minted(token="t", jti="wt_old", exp=NOW + 1000, kid="ed-old")

    await store.vote(opened[0].state.id, operator="alice", approve=True, justification="", now=NOW, mint=mint)
    await store.register_key("ed-new", {"kid": "ed-new"}, NOW + 500)
    assert [k["kid"] for k in await store.jwks(NOW + 500)] == ["ed-old", "ed-new"]
    # The old key is no longer used by any replica (not seen for long) but its warrant still lives:
    assert [k["kid"] for k in await store.jwks(NOW + 900)] == ["ed-old"]
    await store.register_key("ed-new", {"kid": "ed-new"}, NOW + 900)
    assert [k["kid"] for k in await store.jwks(NOW + 1001)] == ["ed-new"]


async def test_migrations_are_versioned_and_run_once(store_url: str) -> None:
    database = await open_database(store_url)
    try:
        assert await migrate(database) == MIGRATIONS[-1][0]  # a second start changes nothing
        async with database.transaction() as tx:
            rows = await tx.all("SELECT version FROM schema_migrations ORDER BY version")
            assert [r[0] for r in rows] == [m[0] for m in MIGRATIONS]
            await tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (%s, %s, %s)",
                (999, "from the future", NOW),
            )
        with pytest.raises(StoreError, match="newer than this vienna"):
            await migrate(database)
    finally:
        await database.close()


async def test_bad_store_urls_are_refused() -> None:
    for url in ("mysql://x", "sqlite://relative.db", "postgresql://postgres@127.0.0.1:1/none"):
        with pytest.raises(StoreError):
            await open_database(url)
