"""`GET /v1/openapi.json`: OpenAPI 3.1 of the sidecar's control API, every route and error body.
Schemas are JSON Schema 2020-12; objects allow more fields than they name (answers grow compatibly)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "a bad request (reason_code names the problem)",
        401: "no or an unrecognised operator token",
        403: "refused: denied, or a warrant that does not cover it",
        404: "no such warrant request",
        409: "a conflict: a second vote, no handler, or decided at the authority",
        413: "the body is too large",
        429: "too many pending requests or failed authentications",
        503: "the audit store or the authority is unavailable (fail closed)",
    }
    return {str(status): _json(_ref("Error"), text[status]) for status in statuses}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


OPERATOR: list[dict[str, list[str]]] = [{"operatorToken": []}]
STR = {"type": "string"}
NSTR = {"type": ["string", "null"]}
NUM = {"type": "number"}
INT = {"type": "integer"}
OBJ = {"type": "object"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "reason"],
        "properties": {
            "error": STR,
            "reason": STR,
            "reason_code": STR,
            "tier": STR,
            "intent": _ref("Intent"),
            "warrant_request": _ref("WarrantRequestSummary"),
            "decision_id": STR,
        },
    },
    "Intent": {
        "type": "object",
        "required": ["action", "target"],
        "properties": {"action": STR, "target": STR, "rule": NSTR},
    },
    "IntentSubmission": {
        "type": "object",
        "required": ["action"],
        "properties": {"action": STR, "target": STR, "agent_id": STR, "params": OBJ},
    },
    "WarrantRequestSummary": {
        "type": "object",
        "required": ["id", "status", "approvals_required", "url"],
        "properties": {
            "id": STR,
            "status": {"enum": ["pending", "approved", "denied", "expired"]},
            "approvals_required": INT,
            "approvals": INT,
            "url": STR,
            "expires_at": NUM,
        },
    },
    "IntentAnswer": {
        "type": "object",
        "required": ["mode", "status", "tier", "intent"],
        "properties": {
            "mode": {"enum": ["direct", "passback"]},
            "status": {"enum": ["succeeded", "failed", "allowed", "pending_approval", "approved"]},
            "execution_id": NSTR,
            "result": OBJ,
            "error": STR,
            "tier": STR,
            "intent": _ref("Intent"),
            "instruction": OBJ,
            "constraints": OBJ,
            "warrant_request": _ref("WarrantRequestSummary"),
            "warrant_id": STR,
            "warrant": STR,
            "policy_revision": STR,
        },
    },
    "Vote": {
        "type": "object",
        "required": ["operator", "decision", "justification", "at"],
        "properties": {
            "operator": STR,
            "decision": {"enum": ["approve", "deny"]},
            "justification": STR,
            "at": NUM,
        },
    },
    "WarrantRequest": {
        "type": "object",
        "required": [
            "id",
            "agent",
            "status",
            "tier",
            "intent",
            "approvals_required",
            "approvals",
            "votes",
            "url",
        ],
        "properties": {
            "id": STR,
            "agent": STR,
            "status": {"enum": ["pending", "approved", "denied", "expired"]},
            "tier": STR,
            "intent": _ref("Intent"),
            "approvals_required": INT,
            "approvals": INT,
            "votes": {"type": "array", "items": _ref("Vote")},
            "created_at": NUM,
            "expires_at": NUM,
            "url": STR,
            "request": OBJ,
            "rule": NSTR,
            "sidecar": STR,
            "warrant_id": STR,
            "warrant_expires_at": {"type": ["number", "null"]},
            "warrant_uses": INT,
            "warrant": STR,
        },
    },
    "Justification": {"type": "object", "properties": {"justification": STR}},
    "AuditEvent": {
        "type": "object",
        "required": ["seq", "ts", "type", "agent", "policy_revision", "payload", "prev_hash", "hash"],
        "properties": {
            "seq": INT,
            "ts": NUM,
            "type": {
                "enum": [
                    "intent",
                    "decision",
                    "warrant_request",
                    "approval",
                    "warrant",
                    "execution",
                    "verification",
                    "policy",
                ]
            },
            "agent": STR,
            "policy_revision": STR,
            "payload": OBJ,
            "prev_hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
    },
    "AuditPage": {
        "type": "object",
        "required": ["events", "next_after", "head_seq"],
        "properties": {
            "events": {"type": "array", "items": _ref("AuditEvent")},
            "next_after": INT,
            "head_seq": INT,
            "first_seq": INT,
        },
    },
    "Execution": {
        "type": "object",
        "required": ["warrant"],
        "properties": {"warrant": STR, "params": OBJ},
    },
    "Report": {
        "type": "object",
        "required": ["warrant", "status"],
        "properties": {
            "warrant": STR,
            "status": {"enum": ["succeeded", "failed"]},
            "result": OBJ,
            "action": STR,
            "target": STR,
            "params": OBJ,
        },
    },
    "ReportAnswer": {
        "type": "object",
        "required": ["recorded", "verification_id", "valid", "violations"],
        "properties": {
            "recorded": {"const": True},
            "verification_id": STR,
            "valid": {"type": "boolean"},
            "violations": {"type": "array", "items": STR},
            "warrant_id": NSTR,
        },
    },
    "Verify": {
        "type": "object",
        "required": ["warrant"],
        "properties": {
            "warrant": STR,
            "action": STR,
            "target": STR,
            "params": OBJ,
            "consume": {"type": "boolean"},
        },
    },
    "VerifyAnswer": {
        "type": "object",
        "required": ["valid", "reason_code", "reason"],
        "properties": {
            "valid": {"type": "boolean"},
            "reason_code": STR,
            "reason": STR,
            "warrant_id": STR,
            "consumed": {"type": "boolean"},
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "Started": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"enum": ["started", "starting"]}},
    },
    "Ready": {
        "type": "object",
        "required": ["status", "policy_revision", "policy_rules", "proxy_listening", "api_listening"],
        "properties": {
            "status": {"enum": ["ready", "not_ready"]},
            "policy_revision": STR,
            "policy_rules": INT,
            "proxy_listening": {"type": "boolean"},
            "api_listening": {"type": "boolean"},
            "authority": OBJ,
            "reason_code": {"enum": ["audit.full", "audit.unavailable"]},
            "audit": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"enum": ["ok", "audit.full", "audit.unavailable"]},
                    "reason": STR,
                    "warning": STR,
                    "first_seq": INT,
                },
            },
        },
    },
}


def _text(kind: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {kind: {"schema": {"type": "string"}}}}


PATHS: dict[str, Any] = {
    "/healthz": {"get": {"summary": "liveness", "responses": {"200": _json(_ref("Health"), "alive")}}},
    "/startupz": {
        "get": {
            "summary": "started (listening, policy loaded), whatever the audit's state: for startup probes",
            "responses": {
                "200": _json(_ref("Started"), "started"),
                "503": _json(_ref("Started"), "starting"),
            },
        }
    },
    "/readyz": {
        "get": {
            "summary": "readiness: policy loaded, proxy and API listening",
            "responses": {"200": _json(_ref("Ready"), "ready"), "503": _json(_ref("Ready"), "not ready")},
        }
    },
    "/metrics": {
        "get": {"summary": "Prometheus metrics", "responses": {"200": _text("text/plain", "the text format")}}
    },
    "/v1/ca.pem": {
        "get": {
            "summary": "the interception CA certificate",
            "responses": {"200": _text("application/x-pem-file", "PEM"), **_errors(503)},
        }
    },
    "/v1/openapi.json": {
        "get": {"summary": "this document", "responses": {"200": _json(OBJ, "OpenAPI 3.1")}}
    },
    "/console": {
        "get": {
            "summary": "the approvals console (one static page)",
            "responses": {"200": _text("text/html", "HTML")},
        }
    },
    "/console/console.js": {
        "get": {
            "summary": "the console's script",
            "responses": {"200": _text("text/javascript", "JavaScript")},
        }
    },
    "/console/console.css": {
        "get": {"summary": "the console's style sheet", "responses": {"200": _text("text/css", "CSS")}}
    },
    "/v1/intents": {
        "post": {
            "summary": "submit an intent: direct (runs its handler, or is allowed) or passback",
            "requestBody": _body("IntentSubmission"),
            "responses": {
                "200": _json(_ref("IntentAnswer"), "direct or passback"),
                **_errors(400, 403, 429, 503),
            },
        }
    },
    "/v1/warrant-requests": {
        "get": {
            "summary": "list warrant requests (paged: X-Total-Count, Link rel=next)",
            "security": OPERATOR,
            "parameters": [
                {
                    "name": "status",
                    "in": "query",
                    "schema": {"enum": ["pending", "approved", "denied", "expired"]},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
            ],
            "responses": {
                "200": _json({"type": "array", "items": _ref("WarrantRequest")}, "the requests"),
                **_errors(400, 401, 409, 429),
            },
        }
    },
    "/v1/warrant-requests/{id}": {
        "parameters": [{"name": "id", "in": "path", "required": True, "schema": STR}],
        "get": {
            "summary": "a warrant request's status, with the warrant once approved (the id is the capability)",
            "responses": {"200": _json(_ref("WarrantRequest"), "the request"), **_errors(404, 503)},
        },
    },
    "/v1/warrant-requests/{id}/approve": {
        "parameters": [{"name": "id", "in": "path", "required": True, "schema": STR}],
        "post": {
            "summary": "approve (T3: a justification is required)",
            "security": OPERATOR,
            "requestBody": _body("Justification"),
            "responses": {
                "200": _json(_ref("WarrantRequest"), "the request after the vote"),
                **_errors(400, 401, 403, 404, 409, 429),
            },
        },
    },
    "/v1/warrant-requests/{id}/deny": {
        "parameters": [{"name": "id", "in": "path", "required": True, "schema": STR}],
        "post": {
            "summary": "deny: ends the request",
            "security": OPERATOR,
            "requestBody": _body("Justification"),
            "responses": {
                "200": _json(_ref("WarrantRequest"), "the request after the vote"),
                **_errors(400, 401, 403, 404, 409, 429),
            },
        },
    },
    "/v1/audit": {
        "get": {
            "summary": "audit events after a sequence number",
            "security": OPERATOR,
            "parameters": [
                {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                },
            ],
            "responses": {"200": _json(_ref("AuditPage"), "a page of events"), **_errors(400, 401, 429)},
        }
    },
    "/v1/executions": {
        "post": {
            "summary": "execute an approved handler intent, once, with exactly the approved params",
            "requestBody": _body("Execution"),
            "responses": {"200": _json(_ref("IntentAnswer"), "the execution"), **_errors(400, 403, 409, 503)},
        }
    },
    "/v1/executions/report": {
        "post": {
            "summary": "report an agent-executed passback; a mismatch is recorded as a violation",
            "requestBody": _body("Report"),
            "responses": {"200": _json(_ref("ReportAnswer"), "recorded"), **_errors(400, 413, 503)},
        }
    },
    "/v1/warrants/verify": {
        "post": {
            "summary": "check a warrant before executing, optionally consuming one use",
            "requestBody": _body("Verify"),
            "responses": {
                "200": _json(_ref("VerifyAnswer"), "valid or not, with the reason"),
                **_errors(400, 503),
            },
        }
    },
}


def document(server_url: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Vienna sidecar control API",
            "version": "2",
            "description": "Intents, warrant requests and approvals, audit, Vienna Direct executions and verification (DESIGN.md §7, §12, §13).",
        },
        "servers": [{"url": server_url}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "operatorToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an operator's token (operators file)",
                }
            },
        },
    }


def add_openapi_route(app: web.Application, server_url: str) -> None:
    spec = document(server_url)

    async def serve(request: web.Request) -> web.Response:
        return web.json_response(spec)

    app.router.add_get("/v1/openapi.json", serve)
