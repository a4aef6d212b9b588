"""WarrantTransport: an httpx transport for requests sent through the sidecar. On a passback (a 403
carrying `Vienna-Warrant-Request`) it waits, bounded, for operators to approve, then sends the same
request once more with the warrant. Denied, expired or timed out: the original 403 is returned."""

from __future__ import annotations

import os
import ssl

import httpx

from vienna_sdk.client import AsyncVienna, Denied, Expired, Vienna, WaitTimeout

REQUEST_HEADER = "Vienna-Warrant-Request"
REQUEST_URL_HEADER = "Vienna-Warrant-Request-Url"
WARRANT_HEADER = "Vienna-Warrant"


def _passback_url(request: httpx.Request, response: httpx.Response, endpoint: str) -> str | None:
    """The warrant request to wait for: only on the sidecar's own refusal, and only at the sidecar's
    API (`endpoint`); a URL elsewhere is never fetched."""
    if response.status_code != 403 or WARRANT_HEADER in request.headers:
        return None
    if response.headers.get("Vienna-Decision") != "deny" or REQUEST_HEADER not in response.headers:
        return None
    url = str(response.headers.get(REQUEST_URL_HEADER) or "")
    if not url.startswith(endpoint.rstrip("/") + "/v1/warrant-requests/"):
        return None
    return url


def _env_proxy(scheme: str, host: str) -> str | None:
    """The agent's own HTTP(S)_PROXY for a URL (httpx ignores the environment once a transport is
    given, so the transport reads it itself), honouring NO_PROXY host names and suffixes."""
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")))):
            return None
    names = ("HTTPS_PROXY", "https_proxy") if scheme == "https" else ("HTTP_PROXY", "http_proxy")
    for name in (*names, "ALL_PROXY", "all_proxy"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def _with_warrant(request: httpx.Request, warrant: str) -> httpx.Request:
    headers = httpx.Headers(request.headers)
    headers[WARRANT_HEADER] = warrant
    return httpx.Request(
        request.method, request.url, headers=headers, content=request.content, extensions=request.extensions
    )


class WarrantTransport(httpx.BaseTransport):
    """`httpx.Client(transport=WarrantTransport(vienna))`: requests go through the sidecar (the `proxy`
    given, else the agent's HTTP(S)_PROXY), and a passback becomes a bounded wait plus one retry."""

    def __init__(
        self,
        vienna: Vienna,
        *,
        wait_timeout: float = 300.0,
        proxy: str | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
        trust_env: bool = True,
    ) -> None:
        self.vienna = vienna
        self.wait_timeout = wait_timeout
        self._explicit = transport or (httpx.HTTPTransport(proxy=proxy, verify=verify) if proxy else None)
        self._verify = verify
        self._trust_env = trust_env
        self._by_proxy: dict[str | None, httpx.HTTPTransport] = {}

    def _inner(self, request: httpx.Request) -> httpx.BaseTransport:
        if self._explicit is not None:
            return self._explicit
        proxy = _env_proxy(request.url.scheme, request.url.host) if self._trust_env else None
        if proxy not in self._by_proxy:
            self._by_proxy[proxy] = httpx.HTTPTransport(proxy=proxy, verify=self._verify)
        return self._by_proxy[proxy]

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # the body is sent twice at most: keep it
        inner = self._inner(request)
        response = inner.handle_request(request)
        url = _passback_url(request, response, self.vienna.endpoint)
        if url is None:
            return response
        try:
            view = self.vienna.wait_for(url, self.wait_timeout)
        except (Denied, Expired, WaitTimeout):
            return response
        response.read()
        response.close()
        return inner.handle_request(_with_warrant(request, str(view["warrant"])))

    def close(self) -> None:
        if self._explicit is not None:
            self._explicit.close()
        for transport in self._by_proxy.values():
            transport.close()


class AsyncWarrantTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        vienna: AsyncVienna,
        *,
        wait_timeout: float = 300.0,
        proxy: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
        trust_env: bool = True,
    ) -> None:
        self.vienna = vienna
        self.wait_timeout = wait_timeout
        self._explicit = transport or (
            httpx.AsyncHTTPTransport(proxy=proxy, verify=verify) if proxy else None
        )
        self._verify = verify
        self._trust_env = trust_env
        self._by_proxy: dict[str | None, httpx.AsyncHTTPTransport] = {}

    def _inner(self, request: httpx.Request) -> httpx.AsyncBaseTransport:
        if self._explicit is not None:
            return self._explicit
        proxy = _env_proxy(request.url.scheme, request.url.host) if self._trust_env else None
        if proxy not in self._by_proxy:
            self._by_proxy[proxy] = httpx.AsyncHTTPTransport(proxy=proxy, verify=self._verify)
        return self._by_proxy[proxy]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        inner = self._inner(request)
        response = await inner.handle_async_request(request)
        url = _passback_url(request, response, self.vienna.endpoint)
        if url is None:
            return response
        try:
            view = await self.vienna.wait_for(url, self.wait_timeout)
        except (Denied, Expired, WaitTimeout):
            return response
        await response.aread()
        await response.aclose()
        return await inner.handle_async_request(_with_warrant(request, str(view["warrant"])))

    async def aclose(self) -> None:
        if self._explicit is not None:
            await self._explicit.aclose()
        for transport in self._by_proxy.values():
            await transport.aclose()
