"""`vienna policy check` and `vienna policy explain`, run as the installed command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

VIENNA = Path(sys.executable).with_name("vienna")
ROOT = Path(__file__).parents[2]
EXAMPLES = sorted((ROOT / "examples" / "policies").glob("*.yaml"))
FIXTURES = ROOT / "tests" / "policy" / "fixtures"


def vienna(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VIENNA), *map(str, args)], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


def test_the_command_is_installed() -> None:
    assert VIENNA.exists(), f"{VIENNA} is missing: pip install -e . in this environment"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_check_accepts_every_example_policy(path: Path) -> None:
    result = vienna("policy", "check", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok: ")
    assert "default_tier" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("bad_tier", "20: rules[3].tier: 'T9' is not one of T0, T1, T2, T3, deny"),
        ("unknown_field", "11: rules[1].priority: unknown field"),
        (
            "uncaptured_target",
            "6: rules[0].target: '{owner}/{repo}' uses repo, which no path template of the rule captures",
        ),
        ("invalid_yaml", "4: invalid YAML: did not find expected ',' or ']'"),
    ],
)
def test_check_refuses_a_broken_policy_with_a_line_precise_message(fixture: str, message: str) -> None:
    path = FIXTURES / "broken" / f"{fixture}.yaml"
    result = vienna("policy", "check", path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {path}:{message}"]
    assert result.stdout == ""


def test_check_prints_lint_warnings_and_still_succeeds() -> None:
    shadowed = FIXTURES / "lint" / "shadowed.yaml"
    result = vienna("policy", "check", shadowed)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        f"warning: {shadowed}:9: rules[1]: rule 'github-delete-repo' is unreachable: "
        "rule 'github-writes' (line 5) matches everything it matches"
    ]
    duplicate = FIXTURES / "lint" / "duplicate_id.yaml"
    result = vienna("policy", "check", duplicate)
    assert result.returncode == 1  # duplicate ids are errors: rules are found again by id
    assert f"error: {duplicate}:7: rules[1].id: duplicate id 'read'" in result.stderr


def test_check_of_a_missing_file_fails() -> None:
    result = vienna("policy", "check", ROOT / "no-such-policy.yaml")
    assert result.returncode == 1
    assert "cannot read" in result.stderr


def test_explain_github_delete_repo_is_T3() -> None:
    github = ROOT / "examples" / "policies" / "github.yaml"
    result = vienna("policy", "explain", github, "DELETE", "https://api.github.com/repos/acme/widgets")
    assert result.returncode == 0, result.stderr
    fields = {
        key: value.strip() for key, value in (line.split(":", 1) for line in result.stdout.splitlines())
    }
    assert fields["request"] == "DELETE https://api.github.com/repos/acme/widgets"
    assert (fields["action"], fields["target"], fields["tier"], fields["rule"]) == (
        "github.delete_repo",
        "acme/widgets",
        "T3",
        "github-delete-repo",
    )
    assert (fields["decision"], fields["reason_code"]) == ("warrant_required", "warrant.required")


@pytest.mark.parametrize(
    ("amount", "tier", "rule"), [("200000", "T3", "stripe-refund-large"), ("50", "T2", "stripe-refund")]
)
def test_explain_reads_body_and_headers(tmp_path: Path, amount: str, tier: str, rule: str) -> None:
    body = tmp_path / "body"
    body.write_text(f"amount={amount}&charge=ch_1")
    result = vienna(
        "policy",
        "explain",
        "--json",
        "--header",
        "Content-Type: application/x-www-form-urlencoded",
        "--body",
        body,
        ROOT / "examples" / "policies" / "stripe.yaml",
        "POST",
        "https://api.stripe.com/v1/refunds",
    )
    assert result.returncode == 0, result.stderr
    explained = json.loads(result.stdout)
    assert (explained["action"], explained["tier"], explained["rule"]) == ("stripe.refund", tier, rule)


def test_explain_of_a_metadata_address_is_deny() -> None:
    result = vienna(
        "policy",
        "explain",
        "--json",
        ROOT / "examples" / "policies" / "default.yaml",
        "GET",
        "http://169.254.169.254/",
    )
    explained = json.loads(result.stdout)
    assert (explained["tier"], explained["decision"], explained["reason_code"]) == (
        "deny",
        "denied",
        "policy.deny",
    )


def test_explain_with_a_broken_policy_fails_like_check() -> None:
    path = FIXTURES / "broken" / "bad_tier.yaml"
    result = vienna("policy", "explain", path, "GET", "https://example.com/")
    assert result.returncode == 1
    assert f"{path}:20: rules[3].tier" in result.stderr


def test_explain_an_action_shows_its_handler() -> None:
    path = ROOT / "examples" / "policies" / "direct-handlers.yaml"
    done = vienna("policy", "explain", path, "--action", "service.restart", "--target", "api")
    assert done.returncode == 0, done.stderr
    assert "tier:            T2" in done.stdout
    assert (
        "restart-api: exec ['kubectl', 'rollout', 'restart', 'deployment/{target}'] (timeout 60s, no shell)"
        in done.stdout
    )
    unhandled = vienna("policy", "explain", path, "--action", "nobody.handles", "--json")
    assert '"handler": "(none: POST /v1/intents answers allowed, nothing runs)"' in unhandled.stdout
