"""Warrant request lifecycle: quorum, justification, separation of duties, expiry."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.approvals import (
    TRANSITIONS,
    ApprovalError,
    Event,
    RequestStatus,
    WarrantRequest,
    approvals_required,
    as_dict,
    cast_vote,
    expire,
    transition,
)
from policy.model import Intent, Tier

NOW = 1_700_000_000.0
AGENT = "agent-1"
INTENT = Intent(action="github.delete_repo", target="acme/site", rule="github-delete-repo")


def pending(tier: Tier = Tier.T2, **changes: Any) -> WarrantRequest:
    fields: dict[str, Any] = {
        "id": "wr-1",
        "agent": AGENT,
        "tier": tier,
        "intent": INTENT,
        "status": RequestStatus.PENDING,
        "created_at": NOW,
        "expires_at": NOW + 3600,
    }
    fields.update(changes)
    return WarrantRequest(**fields)


def vote(
    req: WarrantRequest, operator: str, *, approve: bool = True, why: str = "ticket OPS-1", at: float = NOW
) -> WarrantRequest:
    return cast_vote(req, operator=operator, approve=approve, justification=why, now=at)


def refusal(req: WarrantRequest, operator: str, **kwargs: Any) -> ApprovalError:
    with pytest.raises(ApprovalError) as caught:
        vote(req, operator, **kwargs)
    return caught.value


@pytest.mark.parametrize(("tier", "required"), [(Tier.T2, 1), (Tier.T3, 2)])
def test_quorum_is_one_for_T2_and_two_for_T3(tier: Tier, required: int) -> None:
    assert approvals_required(tier) == required
    assert pending(tier).approvals_required == required


@pytest.mark.parametrize("tier", [Tier.T0, Tier.T1, Tier.DENY])
def test_tiers_without_warrants_have_no_approval_requests(tier: Tier) -> None:
    with pytest.raises(ValueError):
        approvals_required(tier)
    with pytest.raises(ValueError):
        pending(tier)


def test_T2_is_approved_by_one_operator() -> None:
    req = vote(pending(Tier.T2), "alice", why="")
    assert req.status is RequestStatus.APPROVED
    assert req.approvals == 1


def test_T3_needs_two_distinct_operators_with_justification() -> None:
    once = vote(pending(Tier.T3), "alice")
    assert once.status is RequestStatus.PENDING
    assert once.approvals == 1
    twice = vote(once, "bob", why="verified with the repo owner")
    assert twice.status is RequestStatus.APPROVED
    assert twice.approvals == 2
    assert [v.operator for v in twice.votes] == ["alice", "bob"]


def test_same_operator_twice_is_a_409_conflict() -> None:
    error = refusal(vote(pending(Tier.T3), "alice"), "alice")
    assert (error.code, error.http_status) == ("approval.duplicate_vote", 409)


def test_operator_cannot_switch_an_approval_into_a_deny() -> None:
    error = refusal(vote(pending(Tier.T3), "alice"), "alice", approve=False)
    assert error.code == "approval.duplicate_vote"


@pytest.mark.parametrize("approve", [True, False])
def test_agent_cannot_vote_on_its_own_request(approve: bool) -> None:
    error = refusal(pending(), AGENT, approve=approve)
    assert (error.code, error.http_status) == ("approval.self_approval", 403)


@pytest.mark.parametrize("why", ["", "   ", "\n\t"])
def test_T3_approval_without_justification_is_a_400(why: str) -> None:
    error = refusal(pending(Tier.T3), "alice", why=why)
    assert (error.code, error.http_status) == ("approval.justification_required", 400)


def test_T3_deny_needs_no_justification() -> None:
    assert vote(pending(Tier.T3), "alice", approve=False, why="").status is RequestStatus.DENIED


def test_one_deny_ends_a_request_even_after_an_approval() -> None:
    req = vote(vote(pending(Tier.T3), "alice"), "bob", approve=False, why="not during the freeze")
    assert req.status is RequestStatus.DENIED
    assert req.approvals == 1


@pytest.mark.parametrize(
    ("finished", "code"),
    [
        (lambda: vote(pending(Tier.T2), "alice"), "approval.not_pending"),
        (lambda: vote(pending(Tier.T2), "alice", approve=False), "approval.not_pending"),
        (lambda: pending(status=RequestStatus.EXPIRED), "approval.expired"),
    ],
    ids=["approved", "denied", "expired"],
)
@pytest.mark.parametrize("approve", [True, False])
def test_votes_after_the_end_are_refused(
    finished: Callable[[], WarrantRequest], code: str, approve: bool
) -> None:
    error = refusal(finished(), "carol", approve=approve)
    assert (error.code, error.http_status) == (code, 409)


def test_vote_after_the_deadline_is_refused_as_expired() -> None:
    req = pending()
    error = refusal(req, "alice", at=req.expires_at)
    assert (error.code, error.http_status) == ("approval.expired", 409)
    assert vote(req, "alice", at=req.expires_at - 1).status is RequestStatus.APPROVED


def test_pending_request_reads_as_expired_past_its_deadline() -> None:
    req = pending()
    assert req.effective_status(req.expires_at - 0.001) is RequestStatus.PENDING
    assert req.effective_status(req.expires_at) is RequestStatus.EXPIRED
    assert req.effective_status(float("nan")) is RequestStatus.EXPIRED


def test_expire_persists_the_deadline_and_leaves_live_or_finished_requests_alone() -> None:
    req = pending()
    assert expire(req, req.expires_at).status is RequestStatus.EXPIRED
    assert expire(req, NOW) is req
    approved = vote(req, "alice")
    assert expire(approved, req.expires_at + 10) is approved


@pytest.mark.parametrize("status", list(RequestStatus))
@pytest.mark.parametrize("event", list(Event))
def test_only_pending_requests_move(status: RequestStatus, event: Event) -> None:
    if status is RequestStatus.PENDING:
        assert transition(status, event) is TRANSITIONS[(status, event)]
    else:
        with pytest.raises(ApprovalError):
            transition(status, event)


def test_as_dict_is_json_and_names_each_vote() -> None:
    req = vote(pending(Tier.T3), "alice", why="OPS-1")
    data = as_dict(req, NOW)
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "id": "wr-1",
        "agent": AGENT,
        "status": "pending",
        "tier": "T3",
        "intent": INTENT.as_dict(),
        "approvals_required": 2,
        "approvals": 1,
        "votes": [{"operator": "alice", "decision": "approve", "justification": "OPS-1", "at": NOW}],
        "created_at": NOW,
        "expires_at": NOW + 3600,
    }
    assert as_dict(req, NOW + 3600)["status"] == "expired"


_VOTES = st.lists(
    st.tuples(
        st.sampled_from(["alice", "bob", "carol", AGENT]),
        st.booleans(),
        st.sampled_from(["", " ", "OPS-1"]),
        st.floats(NOW, NOW + 4000),
    ),
    max_size=8,
)


@given(tier=st.sampled_from([Tier.T2, Tier.T3]), votes=_VOTES)
def test_any_vote_sequence_keeps_the_quorum_rules(
    tier: Tier, votes: list[tuple[str, bool, str, float]]
) -> None:
    req = pending(tier)
    for operator, approve, why, at in votes:
        try:
            req = cast_vote(req, operator=operator, approve=approve, justification=why, now=at)
        except ApprovalError as error:
            assert error.http_status in (400, 403, 409)
    operators = [v.operator for v in req.votes]
    assert len(operators) == len(set(operators))
    assert AGENT not in operators
    assert all(v.at < req.expires_at for v in req.votes)
    denied = any(not v.approve for v in req.votes)
    if tier is Tier.T3:
        assert all(v.justification.strip() for v in req.votes if v.approve)
    if denied:
        assert req.status is RequestStatus.DENIED
        assert not req.votes[-1].approve  # nothing is accepted after a deny
    elif req.approvals >= req.approvals_required:
        assert req.status is RequestStatus.APPROVED
        assert req.approvals == req.approvals_required  # nothing is accepted after the quorum
    else:
        assert req.status is RequestStatus.PENDING
