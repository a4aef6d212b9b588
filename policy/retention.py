"""Audit retention: `--audit-retain` parsing and the plan of what may be dropped (pure, no I/O, no clock).

The shell (proxy/audit_keeper.py) measures the audit (bytes, free space, the oldest events' ages,
how far it was exported or shipped) and asks `plan_retention` what to do: cut through some seq,
refuse everything because the audit is full, or warn that it soon will be.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib|ki|mi|gi|ti)?\s*")
# Durations are lower-case only: `500M` must not quietly mean 500 minutes.
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*")
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
WARN_RATIO = (
    0.8  # warn once the audit holds this share of its size limit, or free space is within twice the floor
)
TARGET_RATIO = 0.9  # a size cut drops down to this share of the limit, so it does not run on every event


def parse_size(text: str) -> int:
    """`2GiB`, `500MB`, `1048576`, `64Mi` (Kubernetes' Ki/Mi/Gi/Ti are binary, as KiB/MiB/GiB/TiB) → bytes."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 2GiB, 500MB, 1048576)")
    value = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
    if value < 1:
        raise ValueError(f"{text!r}: a size must be at least one byte")
    return int(value)


def parse_duration(text: str) -> float:
    """`7d`, `12h`, `30m`, `90s`, `2w` → seconds."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 7d, 12h, 30m)")
    seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be positive")
    return seconds


@dataclass(frozen=True, slots=True)
class Retention:
    """Keep events younger than `max_age` seconds and at most `max_bytes` of them (None: no limit)."""

    max_age: float | None = None
    max_bytes: int | None = None

    @property
    def enabled(self) -> bool:
        return self.max_age is not None or self.max_bytes is not None

    def describe(self) -> str:
        parts = []
        if self.max_age is not None:
            parts.append(f"{self.max_age / 86400:g} days" if self.max_age >= 86400 else f"{self.max_age:g} s")
        if self.max_bytes is not None:
            parts.append(f"{self.max_bytes:,} bytes")
        return " and ".join(parts) or "everything"


def parse_retention(text: str) -> Retention:
    """`7d`, `2GiB`, `7d,2GiB` (either order), or `` / `none` / `0` for keeping everything."""
    text = text.strip()
    if text.lower() in ("", "none", "0", "off", "forever"):
        return Retention()
    max_age: float | None = None
    max_bytes: int | None = None
    for part in (p.strip() for p in text.split(",")):
        if _DURATION.fullmatch(part):
            if max_age is not None:
                raise ValueError(f"--audit-retain {text!r}: two ages")
            max_age = parse_duration(part)
            continue
        try:
            size = parse_size(part)
        except ValueError:
            raise ValueError(
                f"--audit-retain {text!r}: {part!r} is neither an age (7d, 12h) nor a size (2GiB, 500MB)"
            ) from None
        if max_bytes is not None:
            raise ValueError(f"--audit-retain {text!r}: two sizes")
        max_bytes = size
    return Retention(max_age=max_age, max_bytes=max_bytes)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditUsage:
    """What the keeper measured. `first_seq` is the oldest event kept (head_seq + 1 when none is);
    `released_through` the last seq exported or shipped; `aged_through` the last seq older than the
    age limit (0 when none or no age limit); `live_bytes` the bytes the audit's pages hold."""

    first_seq: int
    head_seq: int
    live_bytes: int
    released_through: int
    aged_through: int = 0
    free_bytes: int | None = None
    min_free_bytes: int = 0
    reusable_bytes: int = 0  # pages inside audit.db freed by earlier cuts: new events fill them first


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    cut_through: int | None  # drop every event with seq <= this (None: drop nothing)
    full: str | None  # why nothing more may be recorded (None: it may)
    warning: str | None  # why it soon may not


def plan_retention(retention: Retention, usage: AuditUsage) -> RetentionPlan:
    events = usage.head_seq - usage.first_seq + 1
    # Never drop what is not exported or shipped, and never the newest event: it carries the head.
    releasable = min(usage.released_through, usage.head_seq - 1)
    wanted = 0
    if retention.max_age is not None:
        wanted = max(wanted, usage.aged_through)
    over_limit = retention.max_bytes is not None and usage.live_bytes >= retention.max_bytes
    # Free space counts the pages earlier cuts freed inside audit.db (the file does not shrink;
    # new events reuse them). Below the floor, released events are dropped too, to make room.
    room = None if usage.free_bytes is None else usage.free_bytes + usage.reusable_bytes
    short = room is not None and usage.min_free_bytes > 0 and room < usage.min_free_bytes
    if short and retention.enabled and events > 0 and usage.live_bytes > 0:
        assert room is not None
        per_event = usage.live_bytes / events
        wanted = max(wanted, usage.first_seq - 1 + math.ceil((2 * usage.min_free_bytes - room) / per_event))
    if (
        retention.max_bytes is not None
        and events > 0
        and usage.live_bytes > retention.max_bytes * TARGET_RATIO
    ):
        per_event = usage.live_bytes / events
        excess = usage.live_bytes - retention.max_bytes * TARGET_RATIO
        wanted = max(wanted, usage.first_seq - 1 + math.ceil(excess / per_event))
    through = min(wanted, releasable)
    cut = through if through >= usage.first_seq else None
    full: str | None = None
    warning: str | None = None
    if over_limit and cut is None:
        full = (
            f"the audit holds {usage.live_bytes:,} bytes, its limit is {retention.max_bytes:,}, and nothing"
            f" more may be dropped: events after seq {max(usage.released_through, usage.first_seq - 1)}"
            " are not yet exported or shipped"
        )
    elif (
        retention.max_bytes is not None
        and usage.live_bytes >= retention.max_bytes * WARN_RATIO
        and releasable < usage.first_seq
    ):
        warning = (
            f"the audit holds {usage.live_bytes:,} of its {retention.max_bytes:,} byte limit and nothing"
            " is exported or shipped that could be dropped; requests will be refused (audit.full) at the limit"
        )
    if room is not None and usage.min_free_bytes > 0:
        if short and cut is None:
            full = full or (
                f"the data dir has {room:,} bytes free, below the floor of {usage.min_free_bytes:,}"
                + (
                    ""
                    if retention.enabled
                    else " (with --audit-retain, exported or shipped events are dropped)"
                )
            )
        elif room < 2 * usage.min_free_bytes and warning is None:
            warning = (
                f"the data dir has {room:,} bytes free; below {usage.min_free_bytes:,} every request"
                " is refused (audit.full)"
            )
    return RetentionPlan(cut_through=cut, full=full, warning=warning)
