"""§7's warrant-request list, paged the same way on a sidecar and on the authority."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

STATUSES = ("pending", "approved", "denied", "expired")


@dataclass(frozen=True, slots=True)
class ListQuery:
    status: str | None
    limit: int
    offset: int


def list_query(request: web.Request) -> ListQuery:
    """`?status=&limit=&offset=`; raises ValueError with the message a 400 carries."""
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise ValueError("status must be pending, approved, denied or expired")
    try:
        limit = int(request.query.get("limit", "500"))
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        raise ValueError("limit and offset must be integers") from None
    if not 1 <= limit <= 1000 or not 0 <= offset < 2**62:
        raise ValueError("limit must be 1-1000 and offset >= 0")
    return ListQuery(status, limit, offset)


def page_headers(request: web.Request, query: ListQuery, shown: int, total: int) -> dict[str, str]:
    """A bare JSON array; a longer list is paged (X-Total-Count, Link rel=next), never cut silently."""
    headers = {"X-Total-Count": str(total)}
    if query.offset + shown < total:
        following = {**request.query, "offset": str(query.offset + shown), "limit": str(query.limit)}
        headers["Link"] = f'<{request.rel_url.with_query(following)}>; rel="next"'
    return headers
