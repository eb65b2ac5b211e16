"""Request-body limits as plain ASGI middleware: the body is read in full before the app sees it, bounded in size
(413) and in the time the client may pause while sending it (408).

uvicorn's ``timeout_keep_alive`` only closes idle connections between requests: a client that sends the headers
and part of the body, then stops, would otherwise hold its connection and a buffer for ever. The timeout applies
to each pause, not to the whole body, so that a slow but steady upload is never cut.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import error_body

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0


class _Stalled(Exception):
    """The client sent nothing for ``body_timeout`` seconds in the middle of its body."""


class BodyLimits:
    """Refuse bodies over ``max_bytes`` (by ``Content-Length`` up front, else while reading) with a 413, and
    bodies whose client pauses more than ``body_timeout`` seconds with a 408 that closes the connection."""

    def __init__(
        self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES, body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    ) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.body_timeout = float(body_timeout)

    def _too_large(self, size: int | None) -> JSONResponse:
        said = f"{size} bytes" if size is not None else f"more than {self.max_bytes} bytes"
        return JSONResponse(
            error_body(
                f"the request body is {said}, over this server's limit of {self.max_bytes} bytes; send smaller images",
                "invalid_request_error",
                "request_too_large",
            ),
            status_code=413,
        )

    def _stalled(self, received: int) -> JSONResponse:
        return JSONResponse(
            error_body(
                f"the request body stopped arriving: nothing came for {self.body_timeout:g} s after {received} "
                "bytes (the server's --body_timeout); send the whole body without pausing",
                "invalid_request_error",
                "body_timeout",
            ),
            status_code=408,
            headers={"Connection": "close"},  # the rest of the body may still come: do not read it as a request
        )

    async def _next(self, receive: Receive) -> Message:
        try:
            return await asyncio.wait_for(receive(), self.body_timeout)
        except asyncio.TimeoutError:  # the built-in TimeoutError from Python 3.11 on
            raise _Stalled from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(int(declared))(scope, receive, send)
            return
        # Buffer the body (the app reads all of it anyway) so that a body without a length is bounded too.
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                message = await self._next(receive)
            except _Stalled:
                await self._stalled(total)(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._too_large(None)(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
