"""Every Prometheus metric of DESIGN.md §9, on one injected registry; labels are bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_DECISION_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
_UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_MAX_ACTIONS = 200  # action label values come from the policy, but cap them anyway


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vienna_requests_total", "Requests seen by the proxy", ("tier", "decision", "action"), registry=r
        )
        self.decision_seconds = Histogram(
            "vienna_decision_seconds",
            "Time to classify and decide one request",
            buckets=_DECISION_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "vienna_upstream_seconds",
            "Time from forwarding to the upstream's answer",
            buckets=_UPSTREAM_BUCKETS,
            registry=r,
        )
        self.warrant_checks = Counter(
            "vienna_warrant_checks_total", "Warrants presented, by result", ("result",), registry=r
        )
        self.warrant_requests_pending = Gauge(
            "vienna_warrant_requests_pending", "Warrant requests waiting for operators", registry=r
        )
        self.approvals = Counter(
            "vienna_approvals_total", "Operator votes, by decision", ("decision",), registry=r
        )
        self.audit_events = Counter(
            "vienna_audit_events_total", "Audit events written, by type", ("type",), registry=r
        )
        self.policy_rules = Gauge("vienna_policy_rules", "Rules in the active policy", registry=r)
        self.policy_reloads = Counter(
            "vienna_policy_reloads_total", "Policy loads and reloads, by result", ("result",), registry=r
        )
        self.notifications = Counter(
            "vienna_notifications_total",
            "Webhook notification attempts, by result (delivered, retried, failed)",
            ("result",),
            registry=r,
        )
        self.executions = Counter(
            "vienna_executions_total",
            "Handler executions (Vienna Direct), by kind and status",
            ("kind", "status"),
            registry=r,
        )
        self.verification_violations = Counter(
            "vienna_verification_violations_total",
            "Execution reports and warrant checks that did not match their warrant, by reason",
            ("reason",),
            registry=r,
        )
        self._actions: set[str] = set()

    def action_label(self, action: str) -> str:
        if action in self._actions:
            return action
        if len(self._actions) >= _MAX_ACTIONS:
            return "other"
        self._actions.add(action)
        return action

    def render(self) -> bytes:
        return generate_latest(self.registry)
