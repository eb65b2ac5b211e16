"""Request ids as plain ASGI middleware: every response carries ``X-Request-Id``, and an unexpected error becomes a
500 whose body names the same id as the log line that holds its traceback.

A 500 means a bug in the server, never bad input (bad input is answered 4xx by the routes and the other
middleware): the operator finds the traceback by the id the client reports. The id is made here (a random
UUID), not taken from the client, so that a log line cannot be forged or made to collide. The route handlers
read it as ``request.state.request_id``.
"""

from __future__ import annotations

import logging
import uuid

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import error_body

REQUEST_ID_HEADER = "X-Request-Id"

logger = logging.getLogger(__name__)


def request_id_of(scope: Scope) -> str | None:
    """The id :class:`RequestIds` gave this request (``None`` outside the middleware)."""
    return (scope.get("state") or {}).get("request_id")


def internal_error(request_id: str, err: BaseException) -> JSONResponse:
    """The 500 answer for an unexpected ``err``: its type and the request id, nothing of its message (which
    may hold server paths or data)."""
    message = (
        f"internal error ({type(err).__name__}) while serving request {request_id}; this is a bug in the server, "
        "not in the request: report the request id to the operator, whose log holds the traceback"
    )
    return JSONResponse(error_body(message, "server_error", "internal_error"), status_code=500)


class RequestIds:
    """Give each HTTP request an id, send it back as ``X-Request-Id``, and answer an unexpected error with a 500
    naming it (logged with the traceback)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER.lower().encode("latin-1"), request_id.encode("latin-1"))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as err:
            logger.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if started:  # the status line is out: the server closes the connection, the client sees it cut
                raise
            await internal_error(request_id, err)(scope, receive, send_with_id)
