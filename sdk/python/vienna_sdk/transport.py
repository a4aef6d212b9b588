"""WarrantTransport: an httpx transport for requests sent through the sidecar. On a passback (a 403
carrying `Vienna-Warrant-Request`) it waits, bounded, for operators to approve, then sends the same
request once more with the warrant. Denied, expired or timed out: the original 403 is returned."""

from __future__ import annotations

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


def _with_warrant(request: httpx.Request, warrant: str) -> httpx.Request:
    headers = httpx.Headers(request.headers)
    headers[WARRANT_HEADER] = warrant
    return httpx.Request(
        request.method, request.url, headers=headers, content=request.content, extensions=request.extensions
    )


class WarrantTransport(httpx.BaseTransport):
    """`httpx.Client(transport=WarrantTransport(vienna, proxy="http://127.0.0.1:8080"))`."""

    def __init__(
        self,
        vienna: Vienna,
        *,
        wait_timeout: float = 300.0,
        proxy: str | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.vienna = vienna
        self.wait_timeout = wait_timeout
        self._inner = transport or httpx.HTTPTransport(proxy=proxy, verify=verify)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # the body is sent twice at most: keep it
        response = self._inner.handle_request(request)
        url = _passback_url(request, response, self.vienna.endpoint)
        if url is None:
            return response
        try:
            view = self.vienna.wait_for(url, self.wait_timeout)
        except (Denied, Expired, WaitTimeout):
            return response
        response.read()
        response.close()
        return self._inner.handle_request(_with_warrant(request, str(view["warrant"])))

    def close(self) -> None:
        self._inner.close()


class AsyncWarrantTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        vienna: AsyncVienna,
        *,
        wait_timeout: float = 300.0,
        proxy: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.vienna = vienna
        self.wait_timeout = wait_timeout
        self._inner = transport or httpx.AsyncHTTPTransport(proxy=proxy, verify=verify)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self._inner.handle_async_request(request)
        url = _passback_url(request, response, self.vienna.endpoint)
        if url is None:
            return response
        try:
            view = await self.vienna.wait_for(url, self.wait_timeout)
        except (Denied, Expired, WaitTimeout):
            return response
        await response.aread()
        await response.aclose()
        return await self._inner.handle_async_request(_with_warrant(request, str(view["warrant"])))

    async def aclose(self) -> None:
        await self._inner.aclose()
