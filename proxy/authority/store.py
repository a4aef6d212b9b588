"""The authority's state on SQLite or PostgreSQL: warrant requests and votes, warrant uses, one audit
chain per sidecar (each link checked on arrival), the authority's own chain, signing keys.

Every method is one transaction. Where replicas race, the database decides: a request row is locked
(FOR UPDATE) while a vote is counted and a warrant minted, a vote's primary key makes one operator's
vote count once, and a use is counted by a conditional upsert that never passes `max_uses`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from policy import approvals
from policy.approvals import RequestStatus, Vote, WarrantRequest
from policy.audit import GENESIS_HASH, AuditEvent, chain_hash, link
from policy.model import Intent, Tier
from proxy.authority.db import Database, Tx
from proxy.notify import INSERT_SQL

AUTHORITY_CHAIN = "authority"  # the authority's own events: requests opened, votes, warrants minted
MAX_CHAINS_PER_SIDECAR = 1000  # each sidecar instance (data dir) has one; a flood of made-up ids stops here
KEY_SEEN_WINDOW = 120.0  # a key a replica signs with is refreshed every 30 s; listed while seen recently


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRow:
    state: WarrantRequest
    sidecar: str
    fingerprint: str
    request: Mapping[str, Any]
    rule_id: str | None
    terms: Mapping[str, Any]
    constraints: Mapping[str, Any]
    warrant: str | None = None
    warrant_id: str | None = None
    warrant_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Minted:
    token: str
    jti: str
    exp: float
    kid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """What became of one shipped batch: stored, already held (idempotent), and the first problem."""

    accepted: int
    duplicates: int
    head_seq: int
    head_hash: str
    problem: str | None = None
    problem_seq: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Chain:
    chain: str
    sidecar: str
    head_seq: int
    head_hash: str
    problems: int
    updated_at: float
    recent_problems: tuple[dict[str, Any], ...] = field(default=())


_REQUEST_COLUMNS = (
    "id, sidecar, agent, fingerprint, tier, intent, request, rule_id, terms, constraints, status,"
    " created_at, expires_at, warrant, warrant_id, warrant_expires_at"
)


class AuthorityStore:
    def __init__(self, database: Database) -> None:
        self.db = database

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        async with self.db.transaction() as tx:
            await tx.one("SELECT 1")

    # --- signing keys --------------------------------------------------------------------------

    async def register_key(self, kid: str, jwk: Mapping[str, Any], now: float) -> None:
        async with self.db.transaction() as tx:
            updated = await tx.execute("UPDATE signing_keys SET seen_at = %s WHERE kid = %s", (now, kid))
            if not updated:
                await tx.execute(
                    "INSERT INTO signing_keys (kid, jwk, created_at, seen_at, last_exp) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (kid) DO UPDATE SET seen_at = excluded.seen_at",
                    (kid, json.dumps(dict(jwk), sort_keys=True), now, now, 0.0),
                )

    async def jwks(self, now: float) -> list[dict[str, Any]]:
        """Keys some replica signs with now, and retired keys until the last warrant they signed expires."""
        async with self.db.transaction() as tx:
            rows = await tx.all(
                "SELECT jwk FROM signing_keys WHERE seen_at > %s OR last_exp > %s ORDER BY created_at, kid",
                (now - KEY_SEEN_WINDOW, now),
            )
        return [json.loads(row[0]) for row in rows]

    # --- warrant requests ----------------------------------------------------------------------

    async def open_request(
        self,
        *,
        sidecar: str,
        agent: str,
        fingerprint: str,
        tier: Tier,
        intent: Intent,
        request: Mapping[str, Any],
        rule_id: str | None,
        terms: Mapping[str, Any],
        constraints: Mapping[str, Any],
        now: float,
        pending_ttl: float,
        max_pending: int,
        policy_revision: str,
        announce: Announce | None = None,
    ) -> tuple[RequestRow, bool] | None:
        """The open request for this agent and exact request (reused), or a new one; None when the
        agent has `max_pending` pending requests already."""
        async with self.db.transaction() as tx:
            if tx.dialect == "postgresql":
                # Opens for one agent one at a time, across replicas: no duplicate request, no
                # pending count read before another replica's insert commits.
                await tx.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("vienna-open:" + agent,))
            rows = await tx.all(
                f"SELECT {_REQUEST_COLUMNS} FROM warrant_requests"  # noqa: S608 -- fixed column list
                " WHERE agent = %s AND fingerprint = %s AND status IN ('pending', 'approved') ORDER BY created_at DESC",
                (agent, fingerprint),
            )
            for row in rows:
                found = _row(row)
                status = found.state.effective_status(now)
                if status is RequestStatus.PENDING:
                    return found, False
                if status is RequestStatus.APPROVED and await _usable(tx, found, now):
                    return found, False
            if max_pending:
                count = await tx.one(
                    "SELECT COUNT(*) FROM warrant_requests WHERE agent = %s AND status = 'pending' AND expires_at > %s",
                    (agent, now),
                )
                if count is not None and int(count[0]) >= max_pending:
                    return None
            state = WarrantRequest(
                id="wr_" + secrets.token_urlsafe(16),
                agent=agent,
                tier=tier,
                intent=intent,
                status=RequestStatus.PENDING,
                created_at=now,
                expires_at=now + pending_ttl,
            )
            stored = RequestRow(
                state=state,
                sidecar=sidecar,
                fingerprint=fingerprint,
                request=dict(request),
                rule_id=rule_id,
                terms=dict(terms),
                constraints=dict(constraints),
            )
            await tx.execute(
                f"INSERT INTO warrant_requests ({_REQUEST_COLUMNS}) VALUES"  # noqa: S608 -- fixed column list
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    state.id,
                    sidecar,
                    agent,
                    fingerprint,
                    tier.value,
                    json.dumps(intent.as_dict()),
                    json.dumps(dict(request)),
                    rule_id,
                    json.dumps(dict(terms)),
                    json.dumps(dict(constraints)),
                    state.status.value,
                    state.created_at,
                    state.expires_at,
                    None,
                    None,
                    None,
                ),
            )
            await append_own(
                tx,
                "warrant_request",
                agent=agent,
                now=now,
                policy_revision=policy_revision,
                payload={
                    "warrant_request_id": state.id,
                    "sidecar": sidecar,
                    "tier": tier.value,
                    "intent": intent.as_dict(),
                    "request": dict(request),
                    "approvals_required": state.approvals_required,
                    "expires_at": state.expires_at,
                },
            )
            await _enqueue(tx, announce, "warrant_request.created", stored, now)
            return stored, True

    async def get_request(self, request_id: str) -> RequestRow | None:
        async with self.db.transaction() as tx:
            row = await tx.one(
                f"SELECT {_REQUEST_COLUMNS} FROM warrant_requests WHERE id = %s",  # noqa: S608 -- fixed column list
                (request_id,),
            )
            return await _with_votes(tx, _row(row)) if row else None

    async def list_requests(
        self, status: str | None, now: float, *, limit: int, offset: int
    ) -> tuple[list[RequestRow], int]:
        where, params = _status_filter(status, now)
        async with self.db.transaction() as tx:
            rows = await tx.all(
                f"SELECT {_REQUEST_COLUMNS} FROM warrant_requests {where}"  # noqa: S608 -- fixed fragments
                " ORDER BY created_at DESC, id LIMIT %s OFFSET %s",
                (*params, limit, offset),
            )
            total = await tx.one(f"SELECT COUNT(*) FROM warrant_requests {where}", params)  # noqa: S608
            found = [await _with_votes(tx, _row(row)) for row in rows]
        return found, int(total[0]) if total else 0

    async def count_pending(self, now: float) -> int:
        async with self.db.transaction() as tx:
            row = await tx.one(
                "SELECT COUNT(*) FROM warrant_requests WHERE status = 'pending' AND expires_at > %s", (now,)
            )
        return int(row[0]) if row else 0

    async def vote(
        self,
        request_id: str,
        *,
        operator: str,
        approve: bool,
        justification: str,
        now: float,
        mint: Callable[[RequestRow, float], Minted],
        announce: Announce | None = None,
    ) -> RequestRow:
        """Count one vote and, on quorum, mint the one warrant of this request — all in one transaction
        on the locked request row. Raises KeyError (no such request) or approvals.ApprovalError."""
        async with self.db.transaction() as tx:
            row = await tx.one(
                f"SELECT {_REQUEST_COLUMNS} FROM warrant_requests WHERE id = %s FOR UPDATE",  # noqa: S608
                (request_id,),
            )
            if row is None:
                raise KeyError(request_id)
            found = await _with_votes(tx, _row(row))
            state = approvals.cast_vote(
                found.state, operator=operator, approve=approve, justification=justification, now=now
            )
            # The primary key (request, operator) counts an operator once even if a lock were missed.
            await tx.execute(
                "INSERT INTO votes (request_id, operator, approve, justification, at) VALUES (%s, %s, %s, %s, %s)",
                (request_id, operator, 1 if approve else 0, justification, now),
            )
            updated = replace(found, state=state)
            decision = "approve" if approve else "deny"
            await append_own(
                tx,
                "approval",
                agent=state.agent,
                now=now,
                payload={
                    "warrant_request_id": state.id,
                    "operator": operator,
                    "decision": decision,
                    "justification": justification,
                    "approvals": state.approvals,
                    "approvals_required": state.approvals_required,
                    "status": state.status.value,
                },
            )
            if state.status is RequestStatus.APPROVED:
                minted = mint(updated, now)
                updated = replace(
                    updated, warrant=minted.token, warrant_id=minted.jti, warrant_expires_at=minted.exp
                )
                await tx.execute(
                    "UPDATE signing_keys SET last_exp = %s WHERE kid = %s AND last_exp < %s",
                    (minted.exp, minted.kid, minted.exp),
                )
                await append_own(
                    tx,
                    "warrant",
                    agent=state.agent,
                    now=now,
                    payload={
                        "warrant_id": minted.jti,
                        "warrant_request_id": state.id,
                        "tier": state.tier.value,
                        "intent": state.intent.as_dict(),
                        "constraints": dict(found.constraints),
                        "approvals": [v.operator for v in state.votes if v.approve],
                        "exp": minted.exp,
                        "kid": minted.kid,
                    },
                )
            # Conditional on the status read under the lock: a second writer can never flip it back.
            changed = await tx.execute(
                "UPDATE warrant_requests SET status = %s, warrant = %s, warrant_id = %s, warrant_expires_at = %s"
                " WHERE id = %s AND status = 'pending'",
                (
                    state.status.value,
                    updated.warrant,
                    updated.warrant_id,
                    updated.warrant_expires_at,
                    request_id,
                ),
            )
            if changed != 1:
                raise approvals.ApprovalError("approval.not_pending", "request was decided meanwhile")
            if state.status is RequestStatus.APPROVED:
                await _enqueue(tx, announce, "warrant_request.approved", updated, now)
            elif state.status is RequestStatus.DENIED:
                await _enqueue(tx, announce, "warrant_request.denied", updated, now)
            return updated

    async def expire_due(self, now: float, announce: Announce | None = None) -> int:
        """Mark pending requests past their deadline expired (each once, whichever replica gets there
        first), announcing each in the same transaction; the number marked."""
        async with self.db.transaction() as tx:
            rows = await tx.all(
                f"SELECT {_REQUEST_COLUMNS} FROM warrant_requests"  # noqa: S608 -- fixed column list
                " WHERE status = 'pending' AND expires_at <= %s ORDER BY expires_at LIMIT 200",
                (now,),
            )
            marked = 0
            for row in rows:
                found = await _with_votes(tx, _row(row))
                changed = await tx.execute(
                    "UPDATE warrant_requests SET status = 'expired' WHERE id = %s AND status = 'pending'",
                    (found.state.id,),
                )
                if changed == 1:
                    expired = replace(found, state=approvals.expire(found.state, now))
                    await _enqueue(tx, announce, "warrant_request.expired", expired, now)
                    marked += 1
            return marked

    # --- single use ----------------------------------------------------------------------------

    async def consume(
        self, jti: str, max_uses: int, *, sidecar: str, agent: str, now: float
    ) -> tuple[bool, int]:
        """Count one use of `jti` across every sidecar and replica: (counted, uses after). Every
        attempt lands in the authority's chain as a `verification` event, so the uses can be
        checked against what each sidecar's chain says it forwarded."""
        async with self.db.transaction() as tx:
            row = await tx.one(
                "INSERT INTO warrant_uses (jti, uses, max_uses, first_used_at, last_sidecar)"
                " VALUES (%s, 1, %s, %s, %s)"
                " ON CONFLICT (jti) DO UPDATE SET uses = warrant_uses.uses + 1, last_sidecar = excluded.last_sidecar"
                " WHERE warrant_uses.uses < warrant_uses.max_uses RETURNING uses",
                (jti, max_uses, now, sidecar),
            )
            if row is not None:
                counted, uses = True, int(row[0])
            else:
                used = await tx.one("SELECT uses FROM warrant_uses WHERE jti = %s", (jti,))
                counted, uses = False, int(used[0]) if used else 0
            await append_own(
                tx,
                "verification",
                agent=agent,
                now=now,
                payload={
                    "event": "warrant_consumed" if counted else "warrant_replayed",
                    "warrant_id": jti,
                    "sidecar": sidecar,
                    "uses": uses,
                    "max_uses": max_uses,
                },
            )
            return counted, uses

    async def uses(self, jti: str) -> int:
        async with self.db.transaction() as tx:
            row = await tx.one("SELECT uses FROM warrant_uses WHERE jti = %s", (jti,))
        return int(row[0]) if row else 0

    # --- audit chains --------------------------------------------------------------------------

    async def receive(self, chain: str, sidecar: str, events: Sequence[AuditEvent], now: float) -> Received:
        """Store shipped events in order, each checked against the head of its chain. Events already
        held are skipped when identical (a retry) and reported when not; a gap or a bad link stops
        the batch. What came before the first problem is kept; the problem itself is recorded."""
        accepted = duplicates = 0
        problem: tuple[str, int, str] | None = None
        if not events:
            seq, hash_ = await self.head(chain)  # an empty batch creates nothing
            return Received(accepted=0, duplicates=0, head_seq=seq, head_hash=hash_)
        async with self.db.transaction() as tx:
            known = await tx.one("SELECT 1 FROM chains WHERE chain = %s", (chain,))
            if known is None:
                count = await tx.one("SELECT COUNT(*) FROM chains WHERE sidecar = %s", (sidecar,))
                if count is not None and int(count[0]) >= MAX_CHAINS_PER_SIDECAR:
                    return Received(
                        accepted=0,
                        duplicates=0,
                        head_seq=0,
                        head_hash=GENESIS_HASH,
                        problem="too_many_chains",
                        problem_seq=events[0].seq,
                        detail=f"sidecar {sidecar!r} already has {MAX_CHAINS_PER_SIDECAR} chains",
                    )
            head_seq, head_hash = await _lock_chain(tx, chain, sidecar, now)
            rows: list[tuple[Any, ...]] = []
            for event in events:
                if event.seq <= head_seq:
                    held = await tx.one(
                        "SELECT hash FROM audit_events WHERE chain = %s AND seq = %s", (chain, event.seq)
                    )
                    if held is not None and held[0] == event.hash:
                        duplicates += 1
                        continue
                    problem = (
                        "conflict",
                        event.seq,
                        "an event with this seq and another hash is already held",
                    )
                    break
                if event.seq != head_seq + 1:
                    problem = ("sequence_gap", event.seq, f"expected seq {head_seq + 1}, got {event.seq}")
                    break
                try:
                    recomputed = chain_hash(event.prev_hash, event.body())
                except (TypeError, ValueError):
                    recomputed = ""
                if recomputed != event.hash:
                    problem = ("edited", event.seq, "the event's hash does not match its content")
                    break
                if event.prev_hash != head_hash:
                    problem = ("broken_link", event.seq, "prev_hash is not the hash of the event before")
                    break
                rows.append(
                    (
                        chain,
                        event.seq,
                        event.ts,
                        event.type,
                        event.agent,
                        event.policy_revision,
                        json.dumps(
                            dict(event.payload), sort_keys=True, separators=(",", ":"), ensure_ascii=False
                        ),
                        event.prev_hash,
                        event.hash,
                    )
                )
                head_seq, head_hash = event.seq, event.hash
                accepted += 1
            if rows:
                await tx.executemany(
                    "INSERT INTO audit_events (chain, seq, ts, type, agent, policy_revision, payload, prev_hash, hash)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    rows,
                )
            new_problem = 0
            if problem is not None:
                # One row per (chain, seq, kind): a sidecar retrying the same bad batch adds nothing.
                problem_id = (
                    "ap_" + hashlib.sha256(f"{chain}\n{problem[1]}\n{problem[0]}".encode()).hexdigest()[:24]
                )
                new_problem = await tx.execute(
                    "INSERT INTO audit_problems (id, chain, seq, kind, detail, at) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING",
                    (problem_id, chain, problem[1], problem[0], problem[2], now),
                )
            await tx.execute(
                "UPDATE chains SET head_seq = %s, head_hash = %s, updated_at = %s, problems = problems + %s WHERE chain = %s",
                (head_seq, head_hash, now, 1 if new_problem > 0 else 0, chain),
            )
        if problem is None:
            return Received(accepted=accepted, duplicates=duplicates, head_seq=head_seq, head_hash=head_hash)
        return Received(
            accepted=accepted,
            duplicates=duplicates,
            head_seq=head_seq,
            head_hash=head_hash,
            problem=problem[0],
            problem_seq=problem[1],
            detail=problem[2],
        )

    async def head(self, chain: str) -> tuple[int, str]:
        async with self.db.transaction() as tx:
            row = await tx.one("SELECT head_seq, head_hash FROM chains WHERE chain = %s", (chain,))
        return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)

    async def chains(self, *, limit: int = 1000, offset: int = 0) -> list[Chain]:
        async with self.db.transaction() as tx:
            rows = await tx.all(
                "SELECT chain, sidecar, head_seq, head_hash, problems, updated_at FROM chains ORDER BY chain"
                " LIMIT %s OFFSET %s",
                (limit, offset),
            )
            found = []
            for chain, sidecar, seq, hash_, problems, updated in rows:
                recent = await tx.all(
                    "SELECT seq, kind, detail, at FROM audit_problems WHERE chain = %s ORDER BY at DESC LIMIT 10",
                    (chain,),
                )
                found.append(
                    Chain(
                        chain=str(chain),
                        sidecar=str(sidecar),
                        head_seq=int(seq),
                        head_hash=str(hash_),
                        problems=int(problems),
                        updated_at=float(updated),
                        recent_problems=tuple(
                            {"seq": int(s), "kind": str(k), "detail": str(d), "at": float(a)}
                            for s, k, d, a in recent
                        ),
                    )
                )
        return found

    async def chains_of(self, selector: str) -> list[str]:
        """The chain named `selector`, else the chains of the sidecar named so."""
        async with self.db.transaction() as tx:
            exact = await tx.one("SELECT chain FROM chains WHERE chain = %s", (selector,))
            if exact is not None:
                return [str(exact[0])]
            rows = await tx.all(
                "SELECT chain FROM chains WHERE sidecar = %s ORDER BY chain LIMIT 1001", (selector,)
            )
        return [str(row[0]) for row in rows]

    async def events(self, chain: str, *, after: int, limit: int) -> list[tuple[str, AuditEvent]]:
        """Events of one chain after `after`, in order."""
        async with self.db.transaction() as tx:
            rows = await tx.all(
                "SELECT chain, seq, ts, type, agent, policy_revision, payload, prev_hash, hash FROM audit_events"
                " WHERE chain = %s AND seq > %s ORDER BY seq LIMIT %s",
                (chain, after, limit),
            )
        return [
            (
                str(row[0]),
                AuditEvent(
                    seq=int(row[1]),
                    ts=float(row[2]),
                    type=str(row[3]),
                    agent=str(row[4]),
                    policy_revision=str(row[5]),
                    payload=json.loads(row[6]),
                    prev_hash=str(row[7]),
                    hash=str(row[8]),
                ),
            )
            for row in rows
        ]


async def append_own(
    tx: Tx,
    type: str,
    *,
    agent: str,
    now: float,
    payload: Mapping[str, object],
    policy_revision: str = "",
) -> AuditEvent:
    """Link one of the authority's own events into its chain, in the caller's transaction (the chain
    row is locked, so replicas append one after the other and the chain stays gap-free)."""
    head_seq, head_hash = await _lock_chain(tx, AUTHORITY_CHAIN, AUTHORITY_CHAIN, now)
    event = link(
        prev_hash=head_hash,
        seq=head_seq + 1,
        ts=now,
        type=type,
        agent=agent,
        policy_revision=policy_revision,
        payload=payload,
    )
    await tx.execute(
        "INSERT INTO audit_events (chain, seq, ts, type, agent, policy_revision, payload, prev_hash, hash)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            AUTHORITY_CHAIN,
            event.seq,
            event.ts,
            event.type,
            event.agent,
            event.policy_revision,
            event.payload_json,
            event.prev_hash,
            event.hash,
        ),
    )
    await tx.execute(
        "UPDATE chains SET head_seq = %s, head_hash = %s, updated_at = %s WHERE chain = %s",
        (event.seq, event.hash, now, AUTHORITY_CHAIN),
    )
    return event


async def _lock_chain(tx: Tx, chain: str, sidecar: str, now: float) -> tuple[int, str]:
    """The chain's head, its row locked until the transaction ends (created first when new)."""
    row = await tx.one("SELECT head_seq, head_hash FROM chains WHERE chain = %s FOR UPDATE", (chain,))
    if row is None:
        await tx.execute(
            "INSERT INTO chains (chain, sidecar, head_seq, head_hash, problems, updated_at)"
            " VALUES (%s, %s, 0, %s, 0, %s) ON CONFLICT (chain) DO NOTHING",
            (chain, sidecar, GENESIS_HASH, now),
        )
        row = await tx.one("SELECT head_seq, head_hash FROM chains WHERE chain = %s FOR UPDATE", (chain,))
    assert row is not None
    return int(row[0]), str(row[1])


Announce = Callable[[str, RequestRow, float], list[tuple[Any, ...]]]


async def _enqueue(tx: Tx, announce: Announce | None, event: str, row: RequestRow, now: float) -> None:
    """The notification rows of one event, written in the transaction that makes the change."""
    if announce is None:
        return
    rows = announce(event, row, now)
    if rows:
        await tx.executemany(INSERT_SQL, rows)


async def _with_votes(tx: Tx, found: RequestRow) -> RequestRow:
    votes = await tx.all(
        "SELECT operator, approve, justification, at FROM votes WHERE request_id = %s ORDER BY at, operator",
        (found.state.id,),
    )
    state = replace(
        found.state,
        votes=tuple(
            Vote(operator=str(o), approve=bool(a), justification=str(j), at=float(t)) for o, a, j, t in votes
        ),
    )
    return replace(found, state=state)


async def _usable(tx: Tx, found: RequestRow, now: float) -> bool:
    if found.warrant_id is None:
        return False
    if found.warrant_expires_at is not None and now >= found.warrant_expires_at:
        return False
    row = await tx.one("SELECT uses, max_uses FROM warrant_uses WHERE jti = %s", (found.warrant_id,))
    return row is None or int(row[0]) < int(row[1])


def _status_filter(status: str | None, now: float) -> tuple[str, tuple[object, ...]]:
    if status == "pending":
        return "WHERE status = 'pending' AND expires_at > %s", (now,)
    if status == "expired":
        return "WHERE status = 'expired' OR (status = 'pending' AND expires_at <= %s)", (now,)
    if status is not None:
        return "WHERE status = %s", (status,)
    return "", ()


def _row(row: Sequence[Any]) -> RequestRow:
    (
        id_,
        sidecar,
        agent,
        fingerprint,
        tier,
        intent,
        request,
        rule_id,
        terms,
        constraints,
        status,
        created_at,
        expires_at,
        warrant,
        warrant_id,
        warrant_expires_at,
    ) = row
    intent_data = json.loads(intent)
    return RequestRow(
        state=WarrantRequest(
            id=str(id_),
            agent=str(agent),
            tier=Tier.parse(str(tier)),
            intent=Intent(
                action=intent_data["action"], target=intent_data["target"], rule=intent_data.get("rule")
            ),
            status=RequestStatus(status),
            created_at=float(created_at),
            expires_at=float(expires_at),
        ),
        sidecar=str(sidecar),
        fingerprint=str(fingerprint),
        request=json.loads(request),
        rule_id=rule_id,
        terms=json.loads(terms),
        constraints=json.loads(constraints),
        warrant=warrant,
        warrant_id=warrant_id,
        warrant_expires_at=float(warrant_expires_at) if warrant_expires_at is not None else None,
    )
