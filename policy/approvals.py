"""Warrant request lifecycle as a transition table: quorum, justification and separation of duties."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from policy.model import Intent, Tier


class RequestStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self is not RequestStatus.PENDING


class Event(StrEnum):
    """What can happen to a warrant request; `cast_vote` turns a vote into one of these."""

    APPROVE = "approve"  # an approval that does not yet complete the quorum
    QUORUM = "quorum"  # the approval that completes it
    DENY = "deny"
    EXPIRE = "expire"


# Every legal move. A (status, event) pair that is not here is refused, so a finished request
# can never be reopened by a late vote.
TRANSITIONS: dict[tuple[RequestStatus, Event], RequestStatus] = {
    (RequestStatus.PENDING, Event.APPROVE): RequestStatus.PENDING,
    (RequestStatus.PENDING, Event.QUORUM): RequestStatus.APPROVED,
    (RequestStatus.PENDING, Event.DENY): RequestStatus.DENIED,
    (RequestStatus.PENDING, Event.EXPIRE): RequestStatus.EXPIRED,
}

_REQUIRED_APPROVALS = {Tier.T2: 1, Tier.T3: 2}
_JUSTIFIED_TIERS = frozenset({Tier.T3})


def approvals_required(tier: Tier) -> int:
    try:
        return _REQUIRED_APPROVALS[tier]
    except KeyError:
        raise ValueError(f"tier {tier} is not approved by operators") from None


def justification_required(tier: Tier) -> bool:
    return tier in _JUSTIFIED_TIERS


@dataclass(frozen=True, slots=True, kw_only=True)
class Vote:
    operator: str
    approve: bool
    justification: str
    at: float

    @property
    def decision(self) -> str:
        return "approve" if self.approve else "deny"


@dataclass(frozen=True, slots=True, kw_only=True)
class WarrantRequest:
    id: str
    agent: str
    tier: Tier
    intent: Intent
    status: RequestStatus
    created_at: float
    expires_at: float
    votes: tuple[Vote, ...] = ()

    def __post_init__(self) -> None:
        approvals_required(self.tier)  # only T2 and T3 requests exist; raises for the others

    @property
    def approvals_required(self) -> int:
        return approvals_required(self.tier)

    @property
    def approvals(self) -> int:
        return len({vote.operator for vote in self.votes if vote.approve})

    def effective_status(self, now: float) -> RequestStatus:
        # Written as `not (...)` so that a NaN clock counts as expired.
        if self.status is RequestStatus.PENDING and not now < self.expires_at:
            return RequestStatus.EXPIRED
        return self.status


HTTP_STATUS = {
    "approval.not_pending": 409,
    "approval.expired": 409,
    "approval.duplicate_vote": 409,
    "approval.self_approval": 403,
    "approval.justification_required": 400,
}


class ApprovalError(Exception):
    """A refused vote; `http_status` is what the control API answers with."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.http_status = HTTP_STATUS[code]


def transition(status: RequestStatus, event: Event) -> RequestStatus:
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise _closed(status) from None


def _closed(status: RequestStatus) -> ApprovalError:
    code = "approval.expired" if status is RequestStatus.EXPIRED else "approval.not_pending"
    return ApprovalError(code, f"request is {status}, it takes no more votes")


def cast_vote(
    req: WarrantRequest, *, operator: str, approve: bool, justification: str, now: float
) -> WarrantRequest:
    """Record one operator's vote; raises `ApprovalError` when the vote is not allowed."""
    status = req.effective_status(now)
    if status.final:
        raise _closed(status)
    if operator == req.agent:
        raise ApprovalError("approval.self_approval", "an agent cannot vote on its own request")
    if any(vote.operator == operator for vote in req.votes):
        raise ApprovalError("approval.duplicate_vote", f"{operator} has already voted on this request")
    if approve and justification_required(req.tier) and not justification.strip():
        raise ApprovalError(
            "approval.justification_required", f"approving a {req.tier} request needs a justification"
        )
    vote = Vote(operator=operator, approve=approve, justification=justification, at=now)
    votes = (*req.votes, vote)
    if not approve:
        event = Event.DENY
    elif len({v.operator for v in votes if v.approve}) >= req.approvals_required:
        event = Event.QUORUM
    else:
        event = Event.APPROVE
    return replace(req, status=transition(status, event), votes=votes)


def expire(req: WarrantRequest, now: float) -> WarrantRequest:
    """Persistable form of `effective_status`: a pending request past its deadline becomes expired."""
    if req.status is RequestStatus.PENDING and req.effective_status(now) is RequestStatus.EXPIRED:
        return replace(req, status=transition(req.status, Event.EXPIRE))
    return req


def as_dict(req: WarrantRequest, now: float) -> dict[str, object]:
    return {
        "id": req.id,
        "agent": req.agent,
        "status": req.effective_status(now).value,
        "tier": req.tier.value,
        "intent": req.intent.as_dict(),
        "approvals_required": req.approvals_required,
        "approvals": req.approvals,
        "votes": [
            {
                "operator": vote.operator,
                "decision": vote.decision,
                "justification": vote.justification,
                "at": vote.at,
            }
            for vote in req.votes
        ],
        "created_at": req.created_at,
        "expires_at": req.expires_at,
    }
