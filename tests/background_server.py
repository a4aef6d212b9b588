"""An aiohttp app served on its own event loop in a daemon thread: the recording upstreams of the tests."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the recording upstream parsed it."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)

    @property
    def header_names(self) -> set[str]:
        return {key for key, _ in self.headers}


async def read_seen(request: web.Request) -> Seen:
    """Read the whole request and describe it as received (raw path, lower-case header names)."""
    body = await request.read()
    path, _, query = request.raw_path.partition("?")
    headers = tuple((key.lower(), value) for key, value in request.headers.items())
    return Seen(method=request.method, path=path, query=query, headers=headers, body=body)


class BackgroundServer:
    """Subclasses answer in `_handle` and open their listeners in `_open_sites`; `start` returns once
    they listen, `stop` closes everything."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{self._name} did not start")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def _open_sites(self, runner: web.AppRunner) -> None:
        raise NotImplementedError

    async def _close_extra(self) -> None:
        """Anything `_open_sites` opened besides the runner's sites."""

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(self._open_sites(runner))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._close_extra())
            loop.run_until_complete(runner.cleanup())
            loop.close()
