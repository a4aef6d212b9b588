"""Vienna and AsyncVienna: the sidecar's intent API (DESIGN.md §7 and §13), typed and small."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

WARRANT_HEADER = "Vienna-Warrant"


class ViennaError(Exception):
    """Vienna answered with an error: `status`, `reason_code` and the whole JSON `body`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.reason_code = str(body.get("reason_code") or body.get("error") or "")
        self.reason = str(body.get("reason") or f"HTTP {status}")
        super().__init__(f"{status} {self.reason_code}: {self.reason}")


class Denied(ViennaError):
    """The policy denies the intent, or an operator denied its warrant request."""


class Expired(ViennaError):
    """The warrant request expired before operators decided."""


class WaitTimeout(TimeoutError):
    """Operators did not decide within the time `wait` was given."""


@dataclass(frozen=True)
class Answer:
    """Vienna's answer to an intent, with the fields of the seed SDK (and what was submitted)."""

    mode: str
    status: str
    tier: str | None = None
    intent: dict[str, Any] = field(default_factory=dict)
    execution_id: str | None = None
    warrant_id: str | None = None
    warrant: str | None = field(default=None, repr=False)
    constraints: dict[str, Any] = field(default_factory=dict)
    instruction: dict[str, Any] = field(default_factory=dict)
    warrant_request: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    action: str = ""
    target: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, body: dict[str, Any], *, action: str, target: str, params: dict[str, Any]) -> Answer:
        return cls(
            mode=str(body.get("mode", "")),
            status=str(body.get("status", "")),
            tier=body.get("tier"),
            intent=dict(body.get("intent") or {}),
            execution_id=body.get("execution_id"),
            warrant_id=body.get("warrant_id"),
            warrant=body.get("warrant"),
            constraints=dict(body.get("constraints") or {}),
            instruction=dict(body.get("instruction") or {}),
            warrant_request=dict(body.get("warrant_request") or {}),
            result=body.get("result"),
            action=action,
            target=target,
            params=params,
            raw=body,
        )

    @property
    def approved(self) -> bool:
        return self.warrant is not None


def _raise_for(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = {"reason": response.text[:500]}
    if not isinstance(body, dict):
        body = {"reason": str(body)[:500]}
    if response.status_code >= 400:
        if body.get("error") == "denied" and response.status_code == 403:
            raise Denied(response.status_code, body)
        raise ViennaError(response.status_code, body)
    return body


def _request_state(body: dict[str, Any]) -> str:
    return str(body.get("status", ""))


class Vienna:
    """`Vienna("http://127.0.0.1:9090", agent_id="…")`: the sidecar's API (never through its proxy)."""

    def __init__(
        self,
        endpoint: str,
        *,
        agent_id: str | None = None,
        timeout: float = 30.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.agent_id = agent_id
        self._http = client or httpx.Client(timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Vienna:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def submit(self, action: str, target: str = "", params: dict[str, Any] | None = None) -> Answer:
        """Announce an intent: `mode` "direct" (ran, or allowed) or "passback" (wait for operators)."""
        params = dict(params or {})
        body: dict[str, Any] = {"action": action, "target": target, "params": params}
        if self.agent_id:
            body["agent_id"] = self.agent_id
        answer = _raise_for(self._http.post(self.endpoint + "/v1/intents", json=body))
        return Answer.of(answer, action=action, target=target, params=params)

    def status(self, answer_or_url: Answer | str) -> dict[str, Any]:
        url = answer_or_url if isinstance(answer_or_url, str) else answer_or_url.warrant_request["url"]
        return _raise_for(self._http.get(url))

    def wait(self, answer: Answer, timeout: float = 300.0, *, interval: float = 1.0) -> Answer:
        """Poll the warrant request until operators decide (bounded by `timeout`); the approved answer."""
        if answer.approved or answer.mode != "passback":
            return answer
        view = self.wait_for(answer.warrant_request["url"], timeout, interval=interval)
        return replace(answer, status="approved", warrant=view["warrant"], warrant_id=view.get("warrant_id"))

    def wait_for(self, url: str, timeout: float, *, interval: float = 1.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            view = self.status(url)
            state = _request_state(view)
            if state == "approved" and view.get("warrant"):
                return view
            if state == "denied":
                raise Denied(
                    403,
                    {
                        "error": "denied",
                        "reason_code": "warrant_request.denied",
                        "reason": f"operators denied {view.get('id')}",
                    },
                )
            if state == "expired":
                raise Expired(
                    410,
                    {
                        "error": "expired",
                        "reason_code": "warrant_request.expired",
                        "reason": f"{view.get('id')} expired undecided",
                    },
                )
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"warrant request {view.get('id')} still {state} after {timeout:g}s")
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    def execute(self, answer: Answer) -> Answer:
        """Have Vienna run the approved intent's handler (once, with exactly the approved params)."""
        if answer.mode == "direct":
            return answer
        if answer.warrant is None:
            raise ValueError("no warrant yet: wait(answer) first")
        body = _raise_for(
            self._http.post(
                self.endpoint + "/v1/executions", json={"warrant": answer.warrant, "params": answer.params}
            )
        )
        return Answer.of(body, action=answer.action, target=answer.target, params=answer.params)

    def report(self, answer: Answer, status: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record that the agent executed an approved passback itself (`succeeded` or `failed`)."""
        if answer.warrant is None:
            raise ValueError("no warrant to report against: wait(answer) first")
        body = {
            "warrant": answer.warrant,
            "status": status,
            "result": result or {},
            "action": answer.action,
            "target": answer.target,
            "params": answer.params,
        }
        return _raise_for(self._http.post(self.endpoint + "/v1/executions/report", json=body))

    def verify(
        self,
        warrant: str,
        *,
        action: str,
        target: str = "",
        params: dict[str, Any] | None = None,
        consume: bool = False,
    ) -> dict[str, Any]:
        body = {
            "warrant": warrant,
            "action": action,
            "target": target,
            "params": params or {},
            "consume": consume,
        }
        return _raise_for(self._http.post(self.endpoint + "/v1/warrants/verify", json=body))


class AsyncVienna:
    """The same API for asyncio agents."""

    def __init__(
        self,
        endpoint: str,
        *,
        agent_id: str | None = None,
        timeout: float = 30.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.agent_id = agent_id
        self._http = client or httpx.AsyncClient(timeout=timeout, trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncVienna:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def submit(self, action: str, target: str = "", params: dict[str, Any] | None = None) -> Answer:
        params = dict(params or {})
        body: dict[str, Any] = {"action": action, "target": target, "params": params}
        if self.agent_id:
            body["agent_id"] = self.agent_id
        answer = _raise_for(await self._http.post(self.endpoint + "/v1/intents", json=body))
        return Answer.of(answer, action=action, target=target, params=params)

    async def status(self, answer_or_url: Answer | str) -> dict[str, Any]:
        url = answer_or_url if isinstance(answer_or_url, str) else answer_or_url.warrant_request["url"]
        return _raise_for(await self._http.get(url))

    async def wait(self, answer: Answer, timeout: float = 300.0, *, interval: float = 1.0) -> Answer:  # noqa: ASYNC109 -- §13 names it
        if answer.approved or answer.mode != "passback":
            return answer
        view = await self.wait_for(answer.warrant_request["url"], timeout, interval=interval)
        return replace(answer, status="approved", warrant=view["warrant"], warrant_id=view.get("warrant_id"))

    async def wait_for(self, url: str, timeout: float, *, interval: float = 1.0) -> dict[str, Any]:  # noqa: ASYNC109 -- as wait()
        deadline = time.monotonic() + timeout
        while True:
            view = await self.status(url)
            state = _request_state(view)
            if state == "approved" and view.get("warrant"):
                return view
            if state == "denied":
                raise Denied(
                    403,
                    {
                        "error": "denied",
                        "reason_code": "warrant_request.denied",
                        "reason": f"operators denied {view.get('id')}",
                    },
                )
            if state == "expired":
                raise Expired(
                    410,
                    {
                        "error": "expired",
                        "reason_code": "warrant_request.expired",
                        "reason": f"{view.get('id')} expired undecided",
                    },
                )
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"warrant request {view.get('id')} still {state} after {timeout:g}s")
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    async def execute(self, answer: Answer) -> Answer:
        if answer.mode == "direct":
            return answer
        if answer.warrant is None:
            raise ValueError("no warrant yet: await wait(answer) first")
        body = _raise_for(
            await self._http.post(
                self.endpoint + "/v1/executions", json={"warrant": answer.warrant, "params": answer.params}
            )
        )
        return Answer.of(body, action=answer.action, target=answer.target, params=answer.params)

    async def report(
        self, answer: Answer, status: str, result: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if answer.warrant is None:
            raise ValueError("no warrant to report against: await wait(answer) first")
        body = {
            "warrant": answer.warrant,
            "status": status,
            "result": result or {},
            "action": answer.action,
            "target": answer.target,
            "params": answer.params,
        }
        return _raise_for(await self._http.post(self.endpoint + "/v1/executions/report", json=body))
