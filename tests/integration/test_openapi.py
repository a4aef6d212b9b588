"""§13: `GET /v1/openapi.json` is a valid OpenAPI 3.1 document naming every route of the control API,
and real responses of every route — successes and error bodies — validate against its schemas."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from tests.direct_support import intent
from tests.integration.harness import TOKENS, Sidecar, new_session

pytestmark = pytest.mark.slow
ALICE = {"Authorization": f"Bearer {TOKENS['alice']}"}


def spec_of(sidecar: Sidecar) -> dict[str, Any]:
    answer = new_session().get(sidecar.api_url + "/v1/openapi.json", timeout=10)
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def template_for(spec: dict[str, Any], path: str) -> str:
    for template in spec["paths"]:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path):
            return str(template)
    raise AssertionError(f"{path} is not in the OpenAPI document")


def check(
    spec: dict[str, Any], method: str, path: str, answer: requests.Response, seen: set[tuple[str, str, int]]
) -> None:
    template = template_for(spec, path.split("?")[0])
    operation = spec["paths"][template][method.lower()]
    responses = operation["responses"]
    assert str(answer.status_code) in responses, (
        f"{method} {template} answered {answer.status_code}, not documented"
    )
    media = responses[str(answer.status_code)]["content"]
    kind = answer.headers.get("Content-Type", "").split(";")[0]
    assert kind in media, f"{method} {template} {answer.status_code}: {kind} not documented"
    if kind == "application/json":
        schema = {**media[kind]["schema"], "components": spec["components"]}
        errors = sorted(Draft202012Validator(schema).iter_errors(answer.json()), key=str)
        assert not errors, (
            f"{method} {template} {answer.status_code}: {errors[0].message} at {list(errors[0].absolute_path)}"
        )
    seen.add((method.upper(), template, answer.status_code))


def test_the_document_is_valid_and_names_every_route(direct: Sidecar) -> None:
    spec = spec_of(direct)
    validate(spec)  # OpenAPI 3.1
    assert spec["openapi"] == "3.1.0"
    from proxy.control.app import make_app

    class _Fake:  # just enough of a Sidecar for make_app to build its routes
        class settings:
            api_base_url = "http://x"

    app = make_app(_Fake(), ca_cert=direct.data_dir / "none.pem")  # type: ignore[arg-type]
    routes = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routes == documented


def test_real_responses_of_every_route_match_the_document(direct: Sidecar) -> None:
    spec = spec_of(direct)
    http = new_session()
    api = direct.api_url
    seen: set[tuple[str, str, int]] = set()

    def call(method: str, path: str, **kwargs: Any) -> requests.Response:
        answer = http.request(method, api + path, timeout=30, **kwargs)
        check(spec, method, path, answer, seen)
        return answer

    for path in (
        "/healthz",
        "/readyz",
        "/startupz",
        "/metrics",
        "/v1/ca.pem",
        "/v1/openapi.json",
        "/console",
        "/console/console.js",
        "/console/console.css",
    ):
        assert call("GET", path).status_code == 200
    ran = call("POST", "/v1/intents", json={"action": "demo.echo", "params": {"word": "hi"}})
    assert ran.json()["status"] == "succeeded"
    call("POST", "/v1/intents", json={"action": "demo.read"})
    call("POST", "/v1/intents", json={"action": "demo.echo", "params": {}})  # 400
    call("POST", "/v1/intents", json={"action": "db.drop"})  # 403
    passback = call(
        "POST",
        "/v1/intents",
        json={"action": "service.restart", "target": "openapi", "params": {"reason": "r"}},
    ).json()
    request_id = passback["warrant_request"]["id"]
    call("GET", "/v1/warrant-requests?status=pending", headers=ALICE)
    call("GET", "/v1/warrant-requests")  # 401
    call("GET", "/v1/warrant-requests?status=nope", headers=ALICE)  # 400
    call("GET", f"/v1/warrant-requests/{request_id}")
    call("GET", "/v1/warrant-requests/wr_nope")  # 404
    call("POST", "/v1/warrant-requests/wr_nope/approve", headers=ALICE, json={})  # 404
    call("POST", f"/v1/warrant-requests/{request_id}/approve", headers=ALICE, json={"justification": "ok"})
    call(
        "POST", f"/v1/warrant-requests/{request_id}/approve", headers=ALICE, json={"justification": "ok"}
    )  # 409
    other = call(
        "POST",
        "/v1/intents",
        json={"action": "service.restart", "target": "deny-me", "params": {"reason": "r"}},
    ).json()
    call(
        "POST",
        f"/v1/warrant-requests/{other['warrant_request']['id']}/deny",
        headers=ALICE,
        json={"justification": "no"},
    )
    call("GET", "/v1/audit?after=0&limit=5", headers=ALICE)
    call("GET", "/v1/audit?limit=0", headers=ALICE)  # 400
    warrant = http.get(f"{api}/v1/warrant-requests/{request_id}", timeout=10).json()["warrant"]
    call(
        "POST",
        "/v1/warrants/verify",
        json={
            "warrant": warrant,
            "action": "service.restart",
            "target": "openapi",
            "params": {"target": "openapi", "reason": "r"},
        },
    )
    call("POST", "/v1/warrants/verify", json={"warrant": "x.y.z"})
    call("POST", "/v1/warrants/verify", json={"warrant": warrant, "consume": "yes"})  # 400
    call("POST", "/v1/executions", json={"warrant": warrant})
    call("POST", "/v1/executions", json={"warrant": warrant})  # 403 replayed
    call("POST", "/v1/executions/report", json={"warrant": warrant, "status": "succeeded", "result": {}})
    call("POST", "/v1/executions/report", json={"warrant": warrant, "status": "maybe"})  # 400
    documented = {(m.upper(), p) for p, item in spec["paths"].items() for m in item if m != "parameters"}
    assert {(m, p) for m, p, _ in seen} == documented, documented - {(m, p) for m, p, _ in seen}
    assert {s for _, _, s in seen} >= {200, 400, 401, 403, 404, 409}
    assert intent(direct, "demo.echo", word="done").status_code == 200
