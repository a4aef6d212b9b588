"""Exact /metrics values after the scripted sequence of a fresh sidecar (DESIGN.md §9)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.audit.conftest import ScriptedRun
from tests.audit.support import Metrics, events


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def test_requests_total_counts_every_decision_by_tier_decision_and_action(scripted: ScriptedRun) -> None:
    assert scripted.metrics_final.by_labels("vienna_requests_total") == {
        _labels(tier="T0", decision="allow", action="demo.read"): 3,
        _labels(tier="T3", decision="warrant_required", action="demo.delete_repo"): 2,
        _labels(tier="deny", decision="denied", action="demo.forbidden"): 1,
        _labels(tier="deny", decision="bad_request", action="unknown"): 1,
        _labels(tier="T3", decision="allow", action="demo.delete_repo"): 1,
        _labels(tier="T3", decision="warrant_invalid", action="demo.delete_repo"): 1,
    }


def test_histograms_count_decisions_and_upstream_calls(scripted: ScriptedRun) -> None:
    final = scripted.metrics_final
    assert final.value("vienna_decision_seconds_count") == 9  # every proxied request
    assert final.value("vienna_upstream_seconds_count") == 4  # 3 reads and the warranted delete
    assert final.value("vienna_decision_seconds_bucket", le="+Inf") == 9
    assert final.value("vienna_upstream_seconds_bucket", le="+Inf") == 4
    assert 0 < final.value("vienna_decision_seconds_sum") < 9 * 1.0
    # explicit buckets, in seconds
    decision_buckets = {dict(labels)["le"] for labels in final.by_labels("vienna_decision_seconds_bucket")}
    assert {"0.001", "0.01", "+Inf"} <= decision_buckets


def test_warrant_approval_and_pending_metrics(scripted: ScriptedRun) -> None:
    assert scripted.metrics_pending.value("vienna_warrant_requests_pending") == 1
    assert scripted.metrics_approved.value("vienna_warrant_requests_pending") == 0
    assert scripted.metrics_final.value("vienna_warrant_requests_pending") == 0
    assert scripted.metrics_pending.by_labels("vienna_approvals_total") == {}
    assert scripted.metrics_final.by_labels("vienna_approvals_total") == {_labels(decision="approve"): 2}
    assert scripted.metrics_final.value("vienna_warrant_checks_total", result="replayed") == 1


def test_a_replayed_warrant_counts_once_as_replayed_and_not_as_valid(scripted: ScriptedRun) -> None:
    assert scripted.metrics_final.by_labels("vienna_warrant_checks_total") == {
        _labels(result="valid"): 1,
        _labels(result="replayed"): 1,
    }


def test_audit_events_total_matches_the_database(scripted: ScriptedRun) -> None:
    expected = {
        "intent": 8,  # one per classified request (the %2F one is refused before classification)
        "decision": 9,
        "execution": 4,
        "warrant_request": 1,
        "approval": 2,
        "warrant": 1,
        "verification": 1,
    }
    assert Counter(event.type for event in events(scripted.db)) == expected
    assert scripted.metrics_final.by_labels("vienna_audit_events_total") == {
        _labels(type=name): count for name, count in expected.items()
    }


def test_policy_metrics(scripted: ScriptedRun) -> None:
    final = scripted.metrics_final
    assert final.value("vienna_policy_rules") == 3
    assert final.by_labels("vienna_policy_reloads_total") == {
        _labels(result="success"): 1
    }  # the start-up load


def test_every_metric_of_the_design_is_exposed(scripted: ScriptedRun) -> None:
    text = scripted.metrics_final.text
    for name in (
        "vienna_requests_total",
        "vienna_decision_seconds",
        "vienna_upstream_seconds",
        "vienna_warrant_checks_total",
        "vienna_warrant_requests_pending",
        "vienna_approvals_total",
        "vienna_audit_events_total",
        "vienna_policy_rules",
        "vienna_policy_reloads_total",
    ):
        assert f"# TYPE {name} " in text, name


_ALLOWED_LABELS = {"tier", "decision", "action", "result", "type", "le"}


@pytest.mark.parametrize("snapshot", ["metrics_pending", "metrics_approved", "metrics_final"])
def test_label_values_are_bounded_never_a_host_or_path(scripted: ScriptedRun, snapshot: str) -> None:
    metrics: Metrics = getattr(scripted, snapshot)
    names = {label for _, labels in metrics.samples for label, _ in labels}
    assert names <= _ALLOWED_LABELS
    for (_, labels), _value in metrics.samples.items():
        for name, value in labels:
            if name == "le":
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.]+", value), (name, value)
            for forbidden in ("127.0.0.1", "localhost", "repos", "acme", "widgets", "items", "forbidden/"):
                assert forbidden not in value, (name, value)
