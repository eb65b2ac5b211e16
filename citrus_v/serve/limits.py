"""Request-body size limit as plain ASGI middleware: answers 413 before the body reaches the app."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import error_body

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` (by ``Content-Length`` up front, else while reading) with a 413."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

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
            message = await receive()
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
