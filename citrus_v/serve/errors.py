"""The server's one error type: answered as an OpenAI-style ``{"error": {...}}`` body with its HTTP status."""

from __future__ import annotations


class ApiError(Exception):
    """An error answered as an OpenAI-style body with ``status``, and ``headers`` added to the answer (such as
    ``Retry-After`` on a 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param
        self.headers = dict(headers or {})
