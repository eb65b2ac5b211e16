"""The OpenAI-compatible HTTP server: ``create_app(predictor, settings)`` returns a FastAPI app.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events with ``stream: true``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``. Every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad input (400 malformed JSON, text
that is not Unicode, an unusable image, path or message, or a request field this server does not honour — named
in ``param``; 401 API key, 404 unknown model, 408 a body that stopped arriving, 413 body or image too large, 422
fields of the wrong type or range) and 504 when generation exceeds ``request_timeout``; a bad request never stops
the server. Every response carries an ``X-Request-Id``; a 500 is a bug, logged with its traceback under the id
that its body names.
"""

from __future__ import annotations

import contextlib
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.predictor import CitrusVPredictor
from .chat import ChatService
from .errors import ApiError
from .limits import BodyLimits
from .protocol import (
    BAD_REQUEST_ERRORS,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    error_body,
)
from .request_ids import RequestIds, request_id_of
from .settings import ServerSettings
from .streaming import stream_completion

__all__ = ["ApiError", "ServerSettings", "create_app", "serve"]


def _encodable(text: str | None) -> str | None:
    """``text`` with anything UTF-8 cannot encode (a lone surrogate from the request) written as an escape."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(status: int, message: str, code: str | None, type_: str = "invalid_request_error", param=None):
    return JSONResponse(error_body(_encodable(message), type_, code, _encodable(param)), status_code=status)


_ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed JSON, text that is not Unicode, an unusable image, path or message, or a field this "
        "server does not honour (named)",
        401: "missing or wrong API key",
        404: "unknown model",
        408: "the request body stopped arriving for longer than the body timeout",
        413: "request body or image too large",
        422: "a field of the wrong type or out of range",
        500: "a bug in the server: the message names the request id under which its traceback is logged",
        504: "generation took longer than the request timeout",
    }.items()
}


def _validation_error(err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "invalid JSON")
        return _error(400, f"the request body is not valid JSON: {reason}", "invalid_json")
    unusable = next((e for e in errors if e.get("type") in BAD_REQUEST_ERRORS), None)
    if unusable is not None:  # the field path sits in ctx, below the location of the model that checked it
        below = [str(p) for p in unusable.get("loc", ()) if p != "body"]
        param = ".".join([*below, str((unusable.get("ctx") or {}).get("field", ""))]).strip(".") or None
        return _error(
            400, f"{param or 'body'}: {unusable.get('msg', 'unusable request')}", unusable["type"], param=param
        )
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return _error(422, f"{param or 'body'}: {message}{more}", "invalid_value", param=param)


def _body_error(err: StarletteHTTPException) -> str:
    """The message of the 400 answered when the body cannot even be parsed (FastAPI's says only that)."""
    cause = err.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not UTF-8 text (byte {cause.start}); send JSON encoded as UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body nests arrays or objects too deeply to parse; send flatter JSON"
    reason = f" ({type(cause).__name__})" if cause is not None else ""
    return f"the request body could not be parsed as JSON{reason}; send one JSON object"


def create_app(predictor: CitrusVPredictor, settings: ServerSettings) -> FastAPI:
    """Build the FastAPI app serving ``predictor`` under ``settings.served_model_name``; a client that pauses for
    more than ``settings.body_timeout`` seconds while sending its body is answered 408."""
    chat = ChatService(predictor, settings)
    batcher = chat.batcher

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.close()

    app = FastAPI(
        title="Citrus-V",
        version="1",
        summary="OpenAI-compatible chat completions with boxes and masks in a `grounding` object",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.settings = settings
    app.state.chat = chat  # its memory admission says what requests in flight hold
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout)
    app.add_middleware(RequestIds)  # the outermost: every answer, 413 and 408 included, carries the id
    _add_error_handlers(app)
    _add_model_routes(app, chat)
    _add_chat_route(app, chat)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style body: API errors, invalid requests and HTTP errors. Anything unexpected is
    answered by :class:`~citrus_v.serve.request_ids.RequestIds`, with the request id."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        response = _error(err.status, err.message, err.code, err.type, err.param)
        response.headers.update(err.headers)  # e.g. `Retry-After` on a 429
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = _body_error(err) if err.status_code == 400 else str(err.detail)
        response = _error(err.status_code, message, code)
        response.headers.update(err.headers or {})  # e.g. `Allow` on 405
        return response


def _add_model_routes(app: FastAPI, chat: ChatService) -> None:
    """``GET /health``, ``GET /v1/models`` and ``GET /v1/models/{model_id}``."""
    settings = chat.settings

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(model=settings.served_model_name, queued=chat.batcher.queued)

    @app.get(
        "/v1/models", response_model=ModelList, dependencies=[Depends(chat.require_key)], responses=_ERROR_RESPONSES
    )
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.served_model_name, created=chat.created)])

    @app.get(
        "/v1/models/{model_id}",
        response_model=ModelCard,
        dependencies=[Depends(chat.require_key)],
        responses=_ERROR_RESPONSES,
    )
    async def get_model(model_id: str) -> ModelCard:
        chat.check_model(model_id)
        return ModelCard(id=settings.served_model_name, created=chat.created)


def _add_chat_route(app: FastAPI, chat: ChatService) -> None:
    """``POST /v1/chat/completions``: one JSON answer, or server-sent events with ``stream: true``."""

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        dependencies=[Depends(chat.require_key)],
        responses={**_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        with chat.batcher.arriving():  # a batch being gathered waits for this request
            jobs = await run_in_threadpool(chat.jobs, body)  # image decoding stays off the event loop
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_completion(chat, jobs, completion_id, body.model, include_usage, request_id_of(request.scope)),
                media_type="text/event-stream",
            )
        return await chat.complete(jobs, completion_id, body.model)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=host, port=port, log_level=log_level)
