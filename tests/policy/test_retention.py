"""`--audit-retain` parsing and the retention plan: what may be dropped, when the audit is full."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.retention import (
    AuditUsage,
    Retention,
    parse_duration,
    parse_retention,
    parse_size,
    plan_retention,
)

GIB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * GIB),
        ("500MB", 500_000_000),
        ("1048576", 1048576),
        ("64Mi", 64 * 1024**2),
        ("1.5KiB", 1536),
        ("10 kb", 10_000),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1MB", "2 parsecs", "0", "0.1"])
def test_bad_sizes_say_what_a_size_is(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 604800), ("12h", 43200), ("30m", 1800), ("2w", 1209600)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", Retention(max_age=604800)),
        ("2GiB", Retention(max_bytes=2 * GIB)),
        ("7d,2GiB", Retention(max_age=604800, max_bytes=2 * GIB)),
        ("2GiB, 7d", Retention(max_age=604800, max_bytes=2 * GIB)),
        ("none", Retention()),
        ("", Retention()),
        ("0", Retention()),
    ],
)
def test_retention_by_age_and_or_size(text: str, expected: Retention) -> None:
    assert parse_retention(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("7d,8d", "two ages"),
        ("1GiB,2GiB", "two sizes"),
        ("7x", "neither an age"),
        ("forever and ever", "neither"),
    ],
)
def test_bad_retention_names_the_part(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_retention(text)


def usage(**fields: int) -> AuditUsage:
    values = {"first_seq": 1, "head_seq": 1000, "live_bytes": 500_000, "released_through": 0}
    values.update(fields)
    return AuditUsage(**values)


def test_nothing_released_nothing_dropped_and_full_at_the_limit() -> None:
    plan = plan_retention(Retention(max_bytes=400_000), usage(released_through=0))
    assert plan.cut_through is None
    assert plan.full is not None and "not yet exported or shipped" in plan.full


def test_below_the_limit_is_not_full_but_warns_near_it() -> None:
    plan = plan_retention(Retention(max_bytes=600_000), usage(live_bytes=500_000))
    assert plan.full is None and plan.cut_through is None
    assert plan.warning is not None and "audit.full" in plan.warning


def test_a_size_cut_stops_at_what_was_released() -> None:
    plan = plan_retention(Retention(max_bytes=400_000), usage(released_through=100))
    assert plan.cut_through == 100 and plan.full is None


def test_a_size_cut_drops_down_to_nine_tenths_of_the_limit() -> None:
    # 500 bytes per event; 500,000 held, limit 400,000 → down to 360,000: 280 events go
    plan = plan_retention(Retention(max_bytes=400_000), usage(released_through=1000))
    assert plan.cut_through == 280


def test_the_newest_event_is_never_dropped() -> None:
    plan = plan_retention(Retention(max_age=1), usage(released_through=1000, aged_through=1000))
    assert plan.cut_through == 999


def test_age_drops_only_released_events() -> None:
    retention = Retention(max_age=86400)
    assert plan_retention(retention, usage(aged_through=500, released_through=200)).cut_through == 200
    assert plan_retention(retention, usage(aged_through=500, released_through=900)).cut_through == 500
    assert plan_retention(retention, usage(aged_through=0, released_through=900)).cut_through is None
    # an age limit alone never makes the audit full
    assert plan_retention(retention, usage(aged_through=500, released_through=0)).full is None


def test_after_a_cut_the_plan_starts_from_the_first_event_kept() -> None:
    plan = plan_retention(
        Retention(max_bytes=400_000), usage(first_seq=601, head_seq=1600, released_through=600)
    )
    assert plan.cut_through is None and plan.full is not None


def test_free_space_below_the_floor_is_full_whatever_the_retention() -> None:
    plan = plan_retention(Retention(), usage(free_bytes=1000, min_free_bytes=4096))
    assert plan.full is not None and "bytes free" in plan.full
    near = plan_retention(Retention(), usage(free_bytes=5000, min_free_bytes=4096))
    assert near.full is None and near.warning is not None


@given(
    first=st.integers(1, 10_000),
    events=st.integers(1, 10_000),
    live=st.integers(0, 10**9),
    released=st.integers(0, 30_000),
    aged=st.integers(0, 30_000),
    max_bytes=st.one_of(st.none(), st.integers(1, 10**9)),
    max_age=st.one_of(st.none(), st.floats(1, 1e9)),
)
def test_a_cut_never_reaches_past_what_was_released_or_the_head(
    first: int, events: int, live: int, released: int, aged: int, max_bytes: int | None, max_age: float | None
) -> None:
    head = first + events - 1
    plan = plan_retention(
        Retention(max_age=max_age, max_bytes=max_bytes),
        AuditUsage(
            first_seq=first, head_seq=head, live_bytes=live, released_through=released, aged_through=aged
        ),
    )
    if plan.cut_through is not None:
        assert first <= plan.cut_through <= min(released, head - 1)
    if plan.full is not None:
        assert plan.cut_through is None


@pytest.mark.parametrize("text", ["500M", "7D", "2G"])
def test_ambiguous_units_are_refused_not_guessed(text: str) -> None:
    # `500M` must not quietly mean 500 minutes; sizes spell their unit (500MB, 500Mi, 500MiB)
    with pytest.raises(ValueError, match="neither an age"):
        parse_retention(text)


def test_pages_freed_by_earlier_cuts_count_as_room() -> None:
    # audit.db does not shrink after a cut; new events reuse its free pages
    plan = plan_retention(Retention(), usage(free_bytes=1000, min_free_bytes=4096, reusable_bytes=100_000))
    assert plan.full is None


def test_below_the_floor_released_events_are_dropped_to_make_room() -> None:
    retention = Retention(max_age=86400)
    plan = plan_retention(retention, usage(free_bytes=1000, min_free_bytes=4096, released_through=600))
    assert plan.cut_through is not None and plan.full is None
    # without a retention setting nothing is ever dropped: refused instead
    kept = plan_retention(Retention(), usage(free_bytes=1000, min_free_bytes=4096, released_through=600))
    assert kept.cut_through is None and kept.full is not None
