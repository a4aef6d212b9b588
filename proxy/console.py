"""`GET /console`: the approvals console, one static page served from the package with a strict
Content-Security-Policy (same origin only, no inline script or style, no framing)."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_FILES = {
    "/console": ("console.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
}
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _read(name: str) -> bytes:
    return resources.files("proxy").joinpath("static", name).read_bytes()


def add_console_routes(app: web.Application) -> None:
    contents = {path: (_read(name), kind) for path, (name, kind) in _FILES.items()}

    async def serve(request: web.Request) -> web.Response:
        body, kind = contents[request.path]
        return web.Response(body=body, headers={**_HEADERS, "Content-Type": kind})

    for path in _FILES:
        app.router.add_get(path, serve)
