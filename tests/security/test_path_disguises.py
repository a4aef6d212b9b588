"""Path disguises: a denied path, or a warrant's bound path, spelled so that a naive matcher misses it.

Every form is either normalised (so the rule or the binding sees what the upstream will see) or refused
as ambiguous. Requests are written as raw bytes: HTTP client libraries would clean these paths up first.
"""

from __future__ import annotations

import pytest

from policy.model import Tier
from tests.security.support import (
    Binding,
    Sidecar,
    Upstream,
    assert_refused,
    mint_for,
    one,
    raw_request,
    unique,
)

M = "MARK"  # replaced by a unique segment per case, so the upstream's log can be searched for it

# --- against a deny rule: `/admin/**` on 127.0.0.1 is tier deny, every other GET there is T0 ---------

NORMALISED_INTO_DENY = [
    pytest.param(f"/public/../admin/{M}", id="dot-dot-segment"),
    pytest.param(f"/public/./../admin/{M}", id="dot-then-dot-dot"),
    pytest.param(f"/public/%2e%2e/admin/{M}", id="encoded-dot-dot"),
    pytest.param(f"/public/%2E%2E/admin/{M}", id="encoded-dot-dot-upper"),
    pytest.param(f"/public/.%2e/admin/{M}", id="half-encoded-dot-dot"),
    pytest.param(f"/admin/%2e/{M}", id="encoded-single-dot"),
    pytest.param(f"/%61dmin/{M}", id="encoded-unreserved-letter"),
    pytest.param(f"/%61%64%6d%69%6e/{M}", id="fully-encoded-segment"),
    pytest.param(f"//admin/{M}", id="leading-double-slash"),
    pytest.param(f"///admin///{M}", id="repeated-slashes"),
    pytest.param(f"/./admin/{M}", id="leading-dot-segment"),
    pytest.param("/admin/", id="trailing-slash"),
    pytest.param("/admin", id="no-trailing-slash"),
    pytest.param(f"/ADMIN/{M}", id="upper-case"),
    pytest.param(f"/AdMiN/{M}", id="mixed-case"),
    pytest.param(f"/admin/{M}?next=/public", id="query-does-not-matter"),
]

AMBIGUOUS = [
    pytest.param(f"/admin%2F{M}", "request.ambiguous_path", id="encoded-slash"),
    pytest.param(f"/admin%2f{M}", "request.ambiguous_path", id="encoded-slash-lower"),
    pytest.param(f"/public%2F..%2Fadmin/{M}", "request.ambiguous_path", id="encoded-slash-dot-dot"),
    pytest.param(f"/public/%2e%2e%2fadmin/{M}", "request.ambiguous_path", id="encoded-dot-dot-slash"),
    pytest.param(f"/public/%252e%252e/admin/{M}", "request.ambiguous_path", id="double-encoded-dots"),
    pytest.param(f"/%2561dmin/{M}", "request.ambiguous_path", id="double-encoded-letter"),
    pytest.param(f"/admin%252f{M}", "request.ambiguous_path", id="double-encoded-slash"),
    pytest.param(f"/public\\..\\admin/{M}", "request.ambiguous_path", id="backslashes"),
    pytest.param(f"/public/..%5Cadmin/{M}", "request.ambiguous_path", id="encoded-backslash"),
    pytest.param(f"/admin;jsessionid=1/{M}", "request.ambiguous_path", id="matrix-parameter"),
    pytest.param(f"/public/..;/admin/{M}", "request.ambiguous_path", id="tomcat-dot-dot-semicolon"),
    pytest.param(f"/admin/{M};.css", "request.ambiguous_path", id="semicolon-suffix"),
    pytest.param(f"/admin%3B{M}", "request.ambiguous_path", id="encoded-semicolon"),
    pytest.param(f"/public/%c0%ae%c0%ae/admin/{M}", "request.ambiguous_path", id="overlong-utf8-dots"),
    pytest.param(f"/public%c0%afadmin/{M}", "request.ambiguous_path", id="overlong-utf8-slash"),
    pytest.param(
        f"/public/%e0%80%ae%e0%80%ae/admin/{M}", "request.ambiguous_path", id="3-byte-overlong-dots"
    ),
    pytest.param(f"/admin%00/{M}", "request.ambiguous_path", id="encoded-nul"),
    pytest.param(f"/admin/{M}%00.json", "request.ambiguous_path", id="encoded-nul-suffix"),
    pytest.param(f"/admin%09/{M}", "request.ambiguous_path", id="encoded-tab"),
    pytest.param(f"/admin%20/{M}", "request.ambiguous_path", id="segment-with-trailing-encoded-space"),
    pytest.param(f"/%20admin/{M}", "request.ambiguous_path", id="segment-with-leading-encoded-space"),
    pytest.param(f"/../admin/{M}", "request.ambiguous_path", id="climb-above-root"),
    pytest.param(f"/%2e%2e/admin/{M}", "request.ambiguous_path", id="encoded-climb-above-root"),
    pytest.param(f"/admin%u002f{M}", "request.ambiguous_path", id="iis-percent-u"),
    pytest.param(f"/admin/{M}#/public", "request.bad_target", id="fragment"),
]

RAW_BYTES = [
    pytest.param(b"/admin\x00/MARK", "request.ambiguous_path", id="raw-nul"),
    pytest.param(b"/admin\x1b/MARK", "request.ambiguous_path", id="raw-escape"),
    pytest.param(b"/admin\x7f/MARK", "request.ambiguous_path", id="raw-del"),
    pytest.param(b"/admin\t/MARK", "request.bad_target", id="raw-tab"),
    pytest.param(b"/admin /MARK", "request.bad_target", id="raw-space"),
    pytest.param("/ädmin/MARK".encode(), "request.bad_target", id="raw-utf8"),
]


@pytest.mark.parametrize("path", NORMALISED_INTO_DENY)
def test_disguised_path_still_hits_the_deny_rule(main: Sidecar, upstream: Upstream, path: str) -> None:
    marker = unique("p")
    answer = one(main.exchange(raw_request("GET", upstream.authority, path.replace(M, marker))))
    body = assert_refused(answer, 403, "policy.deny", "denied")
    assert body["intent"]["rule"] == "admin-deny"
    assert not upstream.seen_containing(marker)


@pytest.mark.parametrize(("path", "code"), AMBIGUOUS)
def test_ambiguous_path_is_refused(main: Sidecar, upstream: Upstream, path: str, code: str) -> None:
    marker = unique("p")
    answer = one(main.exchange(raw_request("GET", upstream.authority, path.replace(M, marker))))
    assert_refused(answer, 400, code, "bad_request")
    assert not upstream.seen_containing(marker)


@pytest.mark.parametrize(("path", "code"), RAW_BYTES)
def test_raw_control_or_non_ascii_bytes_in_the_path_are_refused(
    main: Sidecar, upstream: Upstream, path: bytes, code: str
) -> None:
    marker = unique("p")
    answer = one(
        main.exchange(raw_request("GET", upstream.authority, path.replace(b"MARK", marker.encode())))
    )
    assert_refused(answer, 400, code, "bad_request")
    assert not upstream.seen_containing(marker)


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        pytest.param("/public/./docs//a/../MARK", "/public/docs/MARK", id="dots-and-slashes"),
        pytest.param("/%70ublic/MARK", "/public/MARK", id="encoded-letter-decoded"),
        pytest.param("/public/%7eMARK", "/public/~MARK", id="encoded-tilde-decoded"),
        pytest.param("/public/caf%c3%a9/MARK", "/public/caf%C3%A9/MARK", id="utf8-escape-upper-cased"),
        pytest.param("/public/a%20b/MARK", "/public/a%20b/MARK", id="encoded-space-kept-encoded"),
    ],
)
def test_allowed_path_is_forwarded_exactly_as_normalised(
    main: Sidecar, upstream: Upstream, path: str, forwarded: str
) -> None:
    marker = unique("p")
    answer = one(main.exchange(raw_request("GET", upstream.authority, path.replace("MARK", marker))))
    assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
    assert [seen.path for seen in upstream.seen_containing(marker)] == [forwarded.replace("MARK", marker)]


# --- against a warrant's binding: T3 `DELETE /repos/{owner}/{repo}`, warrant bound to one exact path ---


@pytest.mark.parametrize(
    ("sent", "status", "code"),
    [
        pytest.param("/repos/acme/REPO/../OTHER", 403, "warrant.mismatch.path", id="dot-dot-to-sibling"),
        pytest.param("/repos/acme/OTHER", 403, "warrant.mismatch.path", id="plain-sibling"),
        pytest.param(
            "/repos/acme/%2e%2e/evil/OTHER", 403, "warrant.mismatch.path", id="encoded-dot-dot-owner"
        ),
        pytest.param("/repos/acme/REPO/", 403, "warrant.mismatch.path", id="trailing-slash"),
        pytest.param("/repos/ACME/REPO", 403, "warrant.mismatch.path", id="case-variant"),
        pytest.param("/repos/acme/REPO%2F..%2FOTHER", 400, "request.ambiguous_path", id="encoded-slashes"),
        pytest.param("/repos/acme/REPO;/../OTHER", 400, "request.ambiguous_path", id="semicolon"),
        pytest.param("/repos/acme/REPO\\..\\OTHER", 400, "request.ambiguous_path", id="backslashes"),
        pytest.param("/repos/acme/REPO%00", 400, "request.ambiguous_path", id="nul"),
        pytest.param("/repos/acme/%252e%252e/OTHER", 400, "request.ambiguous_path", id="double-encoding"),
        pytest.param(
            "/repos/acme/REPO/%c0%ae%c0%ae/OTHER", 400, "request.ambiguous_path", id="overlong-utf8"
        ),
    ],
)
def test_warrant_binding_cannot_be_stretched_by_a_disguised_path(
    main: Sidecar, upstream: Upstream, sent: str, status: int, code: str
) -> None:
    repo, other = unique("repo"), unique("other")
    token = mint_for(main, Binding(method="DELETE", path=f"/repos/acme/{repo}", port=upstream.port))
    target = sent.replace("REPO", repo).replace("OTHER", other)
    answer = one(
        main.exchange(raw_request("DELETE", upstream.authority, target, headers=[("Vienna-Warrant", token)]))
    )
    assert_refused(answer, status, code)
    assert not upstream.seen_containing(repo) and not upstream.seen_containing(other)


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param("//repos/acme/REPO", id="double-slash"),
        pytest.param("/repos/./acme/REPO", id="dot-segment"),
        pytest.param("/repos/%61cme/REPO", id="encoded-letter"),
        pytest.param("/repos/acme/decoy/../REPO", id="dot-dot-back-to-it"),
    ],
)
def test_warrant_holds_for_a_spelling_of_its_own_path_and_the_normalised_one_is_forwarded(
    main: Sidecar, upstream: Upstream, sent: str
) -> None:
    repo = unique("repo")
    token = mint_for(main, Binding(method="DELETE", path=f"/repos/acme/{repo}", port=upstream.port))
    answer = one(
        main.exchange(
            raw_request(
                "DELETE", upstream.authority, sent.replace("REPO", repo), headers=[("Vienna-Warrant", token)]
            )
        )
    )
    assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
    seen = upstream.seen_containing(repo)
    assert [(s.method, s.path) for s in seen] == [("DELETE", f"/repos/acme/{repo}")]
    assert seen[0].header("vienna-warrant") is None


# A path-prefix warrant (T2 `PUT /files/**`) covers `/files/public` and what lies under it, nothing else.


@pytest.mark.parametrize(
    ("sent", "status", "code"),
    [
        pytest.param("/files/public/../private/MARK", 403, "warrant.mismatch.path", id="dot-dot-out"),
        pytest.param(
            "/files/public/%2e%2e/private/MARK", 403, "warrant.mismatch.path", id="encoded-dot-dot-out"
        ),
        pytest.param("/files/publicity/MARK", 403, "warrant.mismatch.path", id="prefix-not-on-segment"),
        pytest.param("/files/PUBLIC/MARK", 403, "warrant.mismatch.path", id="case-variant"),
        pytest.param(
            "/files/public%2F..%2Fprivate/MARK", 400, "request.ambiguous_path", id="encoded-slashes"
        ),
        pytest.param(
            "/files/public/..%5Cprivate/MARK", 400, "request.ambiguous_path", id="encoded-backslash"
        ),
    ],
)
def test_path_prefix_warrant_does_not_reach_outside_its_prefix(
    main: Sidecar, upstream: Upstream, sent: str, status: int, code: str
) -> None:
    marker = unique("f")
    body = b"contents"
    token = mint_for(
        main,
        Binding(
            method="PUT", path=None, path_prefix="/files/public", port=upstream.port, body=body, query=None
        ),
        tier=Tier.T2,
    )
    request = raw_request(
        "PUT",
        upstream.authority,
        sent.replace("MARK", marker),
        headers=[("Vienna-Warrant", token)],
        body=body,
    )
    assert_refused(one(main.exchange(request)), status, code)
    assert not upstream.seen_containing(marker)


def test_path_prefix_warrant_covers_a_normalised_path_under_it(main: Sidecar, upstream: Upstream) -> None:
    marker = unique("f")
    body = b"contents"
    token = mint_for(
        main,
        Binding(
            method="PUT", path=None, path_prefix="/files/public", port=upstream.port, body=body, query=None
        ),
        tier=Tier.T2,
    )
    request = raw_request(
        "PUT", upstream.authority, f"/files/public/./{marker}", headers=[("Vienna-Warrant", token)], body=body
    )
    answer = one(main.exchange(request))
    assert (answer.status, answer.header("vienna-decision")) == (200, "allow"), answer
    assert [(s.path, s.body) for s in upstream.seen_containing(marker)] == [(f"/files/public/{marker}", body)]
